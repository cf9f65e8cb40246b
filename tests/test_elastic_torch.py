"""ElasticAST exported to plain PyTorch (`convert --to=torch`, convert/elastic_torch.py) gives our logits."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.convert import model_dir
from ast_jax.data.packer import pack
from ast_jax.models import build_model, example_inputs, init_params
from ast_jax.models.tokens import TokenLayout
from configs.common import base_config, elastic

torch = pytest.importorskip("torch")
ElasticAST = pytest.importorskip("ast_jax.convert.elastic_torch").ElasticAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEL_BINS, MAX_FRAMES, ROW_TOKENS, MAX_CLIPS = 64, 128, 48, 4
CLIP_FRAMES = (48, 80, 16, 128, 32)  # 5 clips of 3, 5, 1, 8 and 2 16-frame patches: 2 rows with padding, 1 empty slot
TOLERANCE = 1e-4


def elastic_config(pooling, positions, patch_time=0, scale_logits=True):
  config = base_config()
  config.model.update(variant="", width=64, depth=2, num_heads=2)
  config.model.patch_time = patch_time
  config.audio.update(num_mel_bins=MEL_BINS, target_length=MAX_FRAMES)
  config.num_classes = 5
  elastic(config, rows=2, row_tokens=ROW_TOKENS, max_clips=MAX_CLIPS, max_frames=MAX_FRAMES)
  config.model.update(pooling=pooling, positions=positions, scale_logits=scale_logits, layer_norm_eps=1e-5,
                      head_layer_norm_eps=1e-6)
  return config


def model_directory(config, path):
  """A model directory of random parameters moved off their initial values (LayerNorm scales of one, zero biases
  and the like would hide a swapped or transposed tensor)."""
  model = build_model(config)
  params = init_params(model, jax.random.key(0), *example_inputs(config))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda leaf: (np.asarray(leaf) + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32), params)
  names = [f"class_{index}" for index in range(config.num_classes)]
  model_dir.save_model_dir(str(path), model_dir.ModelBundle(params, config, names))
  return model, params


def packed_rows(patch):
  """Slots `[rows, clips, frames, mel_bins]` (noise past each clip, in empty slots too) and the packer's layout."""
  patch_freq, patch_time = patch
  grids = [(MEL_BINS // patch_freq, frames // patch_time) for frames in CLIP_FRAMES]
  rows = pack(grids, ROW_TOKENS * 16 // patch_time, MAX_CLIPS, num_rows=2)  # the same clips at any patch
  rng = np.random.default_rng(4)
  slots = rng.normal(size=(2, MAX_CLIPS, MAX_FRAMES, MEL_BINS)).astype(np.float32)
  time_patches = np.ones((2, MAX_CLIPS), np.int32)
  for row, slot in zip(*np.nonzero(rows.clips >= 0)):
    time_patches[row, slot] = grids[rows.clips[row, slot]][1]
  layout = TokenLayout(rows.segment_ids, rows.freq_positions, rows.time_positions, time_patches)
  assert (rows.segment_ids == 0).any() and (rows.clips < 0).any() and (rows.clips >= 0).sum(1).max() > 2
  return slots, layout, rows.clips >= 0


def compare(model, params, module, patch):
  """Max |logit difference| of real clips in packed rows, and of single clips (one not a whole number of patches)."""
  slots, layout, real = packed_rows(patch)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, slots, layout)[0])
  with torch.no_grad():
    theirs = module(slots, layout.segment_ids, layout.freq_positions, layout.time_positions,
                    layout.time_patches).numpy()
  assert theirs.shape == ours.shape == (2, MAX_CLIPS, 5) and np.abs(ours[real]).max() > 0.1
  packed = np.abs(theirs - ours)[real].max()
  clips = np.random.default_rng(5).normal(size=(2, 90, MEL_BINS)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(clips))[0])
  with torch.no_grad():
    theirs = module(clips).numpy()
  assert theirs.shape == ours.shape == (2, 5)
  return packed, np.abs(theirs - ours).max()


def check_config(module, config, path):
  exported = json.loads((path / "config.json").read_text())
  assert exported["model"]["max_time_patches"] == MAX_FRAMES // (config.model.patch_time or 16)
  assert exported["audio"]["num_mel_bins"] == MEL_BINS and exported["packing"]["max_frames"] == MAX_FRAMES
  assert module.label_names == [f"class_{index}" for index in range(5)] and exported["scores"] == "sigmoid"
  assert module.blocks[0].norm1.eps == 1e-5 and module.mlp_head[0].eps == 1e-6


@pytest.mark.slow  # 6 s in a subprocess; the same export through formats.write is in the default suite
def test_export_command_runs_in_plain_pytorch(tmp_path):
  """`python -m ast_jax.convert --from=ast_jax --to=torch`: attention pooling, integer positions, square patches."""
  config = elastic_config("attention", "integer")
  model, params = model_directory(config, tmp_path / "model")
  subprocess.run([sys.executable, "-m", "ast_jax.convert", "--from=ast_jax", "--to=torch", str(tmp_path / "model"),
                  str(tmp_path / "torch")], cwd=ROOT, check=True, capture_output=True, timeout=300)
  module = ElasticAST.from_pretrained(str(tmp_path / "torch"))
  check_config(module, config, tmp_path / "torch")
  packed, single = compare(model, params, module, (16, 16))
  print(f"attention/integer/16x16: max |logit difference| packed {packed:.2e}, single {single:.2e}")
  assert packed <= TOLERANCE and single <= TOLERANCE


# (pooling, positions, patch_time, scale_logits): the default run covers each option's two values.
CASES = [("mean", "fractional", 8, False), ("attention", "integer", 0, True)]
SLOW_CASES = [("attention", "fractional", 8, True), ("mean", "fractional", 0, False), ("mean", "integer", 0, True),
              ("attention", "integer", 8, False), ("mean", "integer", 8, False), ("attention", "fractional", 0, False)]


@pytest.mark.parametrize("pooling, positions, patch_time, scale_logits",
                         CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_exported_options_match(tmp_path, pooling, positions, patch_time, scale_logits):
  """Every pooling, positions, patch shape and logit scaling (exported through `convert.formats.write`)."""
  from ast_jax.convert.formats import write

  config = elastic_config(pooling, positions, patch_time, scale_logits)
  model, params = model_directory(config, tmp_path / "model")
  write("torch", model_dir.load_model_dir(str(tmp_path / "model")), str(tmp_path / "torch"))
  module = ElasticAST.from_pretrained(str(tmp_path / "torch"))
  check_config(module, config, tmp_path / "torch")
  packed, single = compare(model, params, module, (16, patch_time or 16))
  print(f"{pooling}/{positions}/16x{patch_time or 16}/scale={scale_logits}: max |logit difference| packed "
        f"{packed:.2e}, single {single:.2e}")
  assert packed <= TOLERANCE and single <= TOLERANCE


def test_bad_input_is_one_clear_error(tmp_path):
  """An AST model directory is refused by --to=torch naming the formats it does export to; the PyTorch module names
  a missing export and a layout past its tables."""
  from ast_jax.convert.formats import write

  config = base_config()  # an AST: the family is refused before any weight is read
  config.num_classes = 3
  bundle = model_dir.ModelBundle({}, config, ["a", "b", "c"])
  with pytest.raises(ValueError) as error:
    write("torch", bundle, str(tmp_path / "torch"))
  assert str(error.value) == ("--to=torch does not hold 'ast' models; they export with --to=ast_jax or --to=hf or "
                              "--to=original")
  assert not (tmp_path / "torch").exists()
  with pytest.raises(FileNotFoundError, match="not an ElasticAST PyTorch export"):
    ElasticAST.from_pretrained(str(tmp_path))
  module = ElasticAST(num_classes=3, width=32, depth=1, num_heads=2, max_freq_patches=4, max_time_patches=4).eval()
  with pytest.raises(ValueError, match="past the table's 4 rows: cut clips to 4 time patches"):
    module(np.zeros((1, 80, 64), np.float32))  # 5 time patches
  with pytest.raises(ValueError, match="need segment_ids"):
    module(np.zeros((1, 2, 64, 64), np.float32))
