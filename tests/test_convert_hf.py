"""Weights in and out, against transformers' PyTorch AST: HF export loads with `from_pretrained` (no missing or
unexpected keys) and gives our logits; HF import gives theirs; the upstream `.pth` round trip is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ast_jax.convert import hf, model_dir, original  # noqa: E402
from ast_jax.convert.init import initial_params  # noqa: E402
from ast_jax.models import build_model, init_params  # noqa: E402

SIZES = {"tiny": (192, 3), "base": (768, 12)}


def random_hf_model(size: str, stride: int, frames: int, num_labels: int = 7):
  """transformers' AST with every tensor randomised (its own init leaves LayerNorms at 1/0 and tokens at 0)."""
  width, heads = SIZES[size]
  config = transformers.ASTConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width,
                                  frequency_stride=stride, time_stride=stride, max_length=frames,
                                  num_labels=num_labels)
  torch.manual_seed(stride + frames)
  model = transformers.ASTForAudioClassification(config).eval()
  with torch.no_grad():
    for tensor in model.parameters():
      tensor.add_(0.05 * torch.randn_like(tensor))
  return model


def our_logits(bundle: model_dir.ModelBundle, features: np.ndarray) -> np.ndarray:
  model = build_model(bundle.config)
  logits, _ = jax.jit(model.apply)({"params": bundle.params}, jnp.asarray(features))
  return np.asarray(logits)


def their_logits(model, features: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(features)).logits.numpy()


# Every stride and length at tiny; base at the AudioSet shape and one stride-16 case, its others in the slow suite.
CASES = [pytest.param(size, stride, frames, marks=[pytest.mark.slow] if size == "base" and (stride, frames) != (16, 128)
                      else [])
         for size in ("tiny", "base") for stride in (10, 16) for frames in (1024, 512, 128)]


@pytest.mark.parametrize("size,stride,frames", CASES)
def test_hf_import_and_export_match_transformers(tmp_path, size, stride, frames):
  reference = random_hf_model(size, stride, frames)
  reference.save_pretrained(tmp_path / "hf_in")
  features = np.random.default_rng(0).standard_normal((2, frames, 128)).astype(np.float32) * 0.5

  bundle, unused = hf.load_hf(str(tmp_path / "hf_in"))
  assert unused == []
  ours = our_logits(bundle, features)
  np.testing.assert_allclose(ours, their_logits(reference, features), atol=1e-4, rtol=0)

  hf.save_hf(str(tmp_path / "hf_out"), bundle)
  loaded, info = transformers.ASTForAudioClassification.from_pretrained(str(tmp_path / "hf_out"),
                                                                         output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  np.testing.assert_allclose(their_logits(loaded.eval(), features), ours, atol=1e-4, rtol=0)


def native_bundle(num_classes=5, frames=128, stride=10) -> model_dir.ModelBundle:
  """An ast_jax model as training makes it (backbone eps 1e-6, head eps 1e-5), with randomised parameters."""
  config = model_dir.bundle_config(dict(variant="", width=64, depth=2, num_heads=2, fstride=stride, tstride=stride),
                                   dict(target_length=frames, mean=-5.0, std=4.0), num_classes)
  model = build_model(config)
  params = init_params(model, jax.random.key(0), jnp.zeros((1, frames, 128)))
  noise = np.random.default_rng(1)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * noise.standard_normal(p.shape).astype(np.float32), params)
  return model_dir.ModelBundle(params, config, [f"label{i}" for i in range(num_classes)])


def test_native_model_exports_to_hf_with_its_front_end_and_labels(tmp_path):
  bundle = native_bundle()
  hf.save_hf(str(tmp_path / "hf"), bundle)
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  preprocessor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
  assert (config["max_length"], config["frequency_stride"], config["layer_norm_eps"]) == (128, 10, 1e-6)
  assert config["id2label"]["3"] == "label3" and (preprocessor["mean"], preprocessor["std"]) == (-5.0, 4.0)
  loaded = transformers.ASTForAudioClassification.from_pretrained(str(tmp_path / "hf")).eval()
  features = np.random.default_rng(2).standard_normal((3, 128, 128)).astype(np.float32)
  # HF has one LayerNorm epsilon; our head's 1e-5 against its 1e-6 moves logits far less than the tolerance.
  np.testing.assert_allclose(their_logits(loaded, features), our_logits(bundle, features), atol=1e-4, rtol=0)


def test_model_directory_with_fused_attention_kernels_loads_per_head(tmp_path):
  """Model directories written before the attention kernels were split per head hold qkv kernel [D, 3D], bias [3D]
  and proj kernel [D, D] (C-order flattenings of today's [D, 3, heads, head_dim], [heads, head_dim, D])."""
  bundle = native_bundle()
  fused = jax.tree.map(np.asarray, bundle.params)
  for index in range(2):
    attn = fused["encoder"][f"blocks_{index}"]["attn"]
    attn["qkv"] = {"kernel": attn["qkv"]["kernel"].reshape(64, 192), "bias": attn["qkv"]["bias"].reshape(192)}
    attn["proj"] = {**attn["proj"], "kernel": attn["proj"]["kernel"].reshape(64, 64)}
  model_dir.save_model_dir(str(tmp_path / "fused"), model_dir.ModelBundle(fused, bundle.config, bundle.label_names))
  loaded = model_dir.load_model_dir(str(tmp_path / "fused"))
  assert loaded.params["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"].shape == (64, 3, 2, 32)
  assert jax.tree.structure(loaded.params) == jax.tree.structure(bundle.params)
  for ours, back in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(ours, back)


def test_original_pth_round_trip_is_exact(tmp_path):
  bundle = native_bundle(frames=1024)
  original.save_original(str(tmp_path / "audioset_10_10_0.5000.pth"), bundle.params)
  state = torch.load(tmp_path / "audioset_10_10_0.5000.pth", weights_only=True)
  assert state["module.v.blocks.1.attn.qkv.weight"].shape == (192, 64)
  assert state["module.mlp_head.1.weight"].shape == (5, 64) and state["module.v.head_dist.weight"].shape == (1000, 64)
  template = jax.tree.map(np.zeros_like, bundle.params)
  params, report = original.load_original(str(tmp_path / "audioset_10_10_0.5000.pth"), template,
                                          bundle.config.model, 128, 1024)
  assert report.fresh == [] and report.adapted == [] and set(report.unused) == {
      "head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
  for ours, back in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(ours, back)


def test_audioset_checkpoint_initialises_an_esc50_model(tmp_path):
  """The AudioSet -> ESC-50 path: 12x101 grid cut to 12x50, 527-way head replaced by a fresh 50-way head."""
  audioset = native_bundle(num_classes=527, frames=1024)
  path = str(tmp_path / "audioset_10_10_0.4593.pth")
  original.save_original(path, audioset.params)
  esc50 = native_bundle(num_classes=50, frames=512)
  config = esc50.config
  config.init_from = f"original:{path}"
  template = jax.tree.map(np.asarray, esc50.params)
  params = initial_params(config.init_from, template, config)
  from ast_jax.models.positions import resize_table

  np.testing.assert_array_equal(params["pos_embed"],
                                resize_table(audioset.params["pos_embed"], (12, 101), (12, 50), rule="upstream"))
  np.testing.assert_array_equal(params["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"],
                                audioset.params["encoder"]["blocks_1"]["mlp"]["fc2"]["kernel"])
  np.testing.assert_array_equal(params["head"]["dense"]["kernel"], template["head"]["dense"]["kernel"])  # fresh


def test_mismatched_backbone_is_an_error_naming_the_tensor(tmp_path):
  small = native_bundle(frames=1024)
  path = str(tmp_path / "audioset_10_10_0.1.pth")
  original.save_original(path, small.params)
  wider = model_dir.bundle_config(dict(variant="", width=96, depth=2, num_heads=2), dict(target_length=1024), 5)
  template = init_params(build_model(wider), jax.random.key(0), jnp.zeros((1, 1024, 128)))
  with pytest.raises(ValueError, match=r"cls_token: checkpoint \(1, 1, 64\), model \(1, 1, 96\)"):
    original.load_original(path, jax.tree.map(np.asarray, template), wider.model, 128, 1024)


def test_convert_command_round_trips_through_every_format(tmp_path):
  """ast_jax -> hf -> ast_jax -> original -> ast_jax with the command line; the weights come back bit-exact."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bundle = native_bundle(frames=128)
  bundle.config.model.layer_norm_eps = bundle.config.model.head_layer_norm_eps = 1e-12  # HF's single epsilon
  model_dir.save_model_dir(str(tmp_path / "start"), bundle)

  def convert(source_format, target_format, source, target, *extra):
    subprocess.run([sys.executable, "-m", "ast_jax.convert", f"--from={source_format}", f"--to={target_format}",
                    *extra, str(source), str(target)], cwd=root, check=True, capture_output=True)

  convert("ast_jax", "hf", tmp_path / "start", tmp_path / "hf")
  convert("hf", "ast_jax", tmp_path / "hf", tmp_path / "back")
  back = model_dir.load_model_dir(str(tmp_path / "back"))
  assert back.label_names == bundle.label_names and back.config.audio.mean == -5.0
  convert("ast_jax", "original", tmp_path / "back", tmp_path / "model.pth")
  overrides = ["--config=configs/demo.py", "--config.num_classes=5", "--config.model.width=64",
               "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.fstride=10",
               "--config.model.tstride=10", "--config.audio.num_mel_bins=128", "--config.audio.target_length=128"]
  convert("original", "ast_jax", tmp_path / "model.pth", tmp_path / "from_pth", *overrides)
  for final in (back, model_dir.load_model_dir(str(tmp_path / "from_pth"))):
    for a, b in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(final.params)):
      np.testing.assert_array_equal(a, b)


def test_model_files_are_readable_as_the_umask_allows(tmp_path):
  """safetensors creates its files 0600; a model directory (and a Hugging Face export) follows the umask instead."""
  import os

  bundle = native_bundle()
  previous = os.umask(0o022)
  try:
    model_dir.save_model_dir(str(tmp_path / "model"), bundle)
    hf.save_hf(str(tmp_path / "hf"), bundle)
    os.umask(0o027)
    model_dir.save_model_dir(str(tmp_path / "group"), bundle)
  finally:
    os.umask(previous)
  for path, mode in ((tmp_path / "model" / "model.safetensors", 0o644), (tmp_path / "model" / "ast_jax.json", 0o644),
                     (tmp_path / "hf" / "model.safetensors", 0o644), (tmp_path / "group" / "model.safetensors", 0o640)):
    assert oct(path.stat().st_mode & 0o777) == oct(mode), path
