"""A FlexiAST exported to Hugging Face at another patch size: `from_pretrained` gives the logits of
`model.apply(..., patch=(P, P))`; bad patch sizes are one clear error through `python -m ast_jax.convert`."""

from __future__ import annotations

import dataclasses
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

from ast_jax.convert import hf, model_dir  # noqa: E402
from ast_jax.models import build_model, init_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEL_BINS, FRAMES = 64, 100  # configs/fsdd.py:flexi's input


def flexi_bundle(stride: int = 16) -> model_dir.ModelBundle:
  """A tiny FlexiAST-style AST (stored 16x16 patches, width 64, depth 2, 2 heads) with random parameters: N(0, 0.05)
  (LayerNorm scales 1 + N(0, 0.05)), drawn in NumPy on the model's parameter shapes (nothing compiled)."""
  model = dict(variant="", width=64, depth=2, num_heads=2, patch_size=16, fstride=stride, tstride=stride,
               flexi_patch_sizes=(8, 12, 16))
  config = model_dir.bundle_config(model, dict(num_mel_bins=MEL_BINS, target_length=FRAMES, mean=-6.0, std=4.0), 10)
  model = build_model(config)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), jnp.zeros((1, FRAMES, MEL_BINS))))
  noise = np.random.default_rng(stride)

  def draw(path, leaf):
    values = 0.05 * noise.standard_normal(leaf.shape).astype(np.float32)
    return values + 1.0 if path[-1].key == "scale" else values

  return model_dir.ModelBundle(jax.tree_util.tree_map_with_path(draw, shapes), config,
                               [f"digit{i}" for i in range(10)])


def hf_logits(path: str, spectrogram: np.ndarray) -> np.ndarray:
  loaded, info = transformers.ASTForAudioClassification.from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  with torch.inference_mode():
    return loaded.eval()(torch.from_numpy(spectrogram)).logits.numpy()


def test_export_at_patch_matches_the_model_run_at_that_patch(tmp_path):
  """Non-overlapping patches (configs/fsdd.py:flexi) at 8, 12, the stored 16 and 32 (the only one whose grid
  shrinks, 4x6 -> 2x3, where the table's resize rule shows); the command-line test exports an overlapping model."""
  bundle = flexi_bundle(16)
  model = build_model(bundle.config)
  spectrogram = 0.5 * np.random.default_rng(1).standard_normal((2, FRAMES, MEL_BINS)).astype(np.float32)
  apply = jax.jit(model.apply, static_argnames="patch")
  for patch in (8, 12, 16, 32):
    path = str(tmp_path / f"hf{patch}")
    hf.save_hf(path, bundle, patch=patch)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert (config["patch_size"], config["frequency_stride"], config["time_stride"]) == (patch, patch, patch)
    ours, _ = apply({"params": bundle.params}, jnp.asarray(spectrogram), patch=(patch, patch))
    theirs = hf_logits(path, spectrogram)
    print(f"patch {patch}: max |HF - ast_jax| {np.abs(theirs - np.asarray(ours)).max():.2e}")
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)


def test_re_expressed_bundle_stores_the_patch_it_runs_at():
  bundle = flexi_bundle(8)
  moved = hf.at_patch(bundle, 12)
  assert moved.params["patch_embed"]["proj"]["kernel"].shape == (12, 12, 1, 64)
  assert moved.params["pos_embed"].shape == (1, 2 + 9 * 15, 64)  # (64 - 12) // 6 + 1 by (100 - 12) // 6 + 1
  assert (moved.config.model.patch_size, moved.config.model.fstride, moved.config.model.tstride) == (12, 6, 6)
  assert bundle.config.model.patch_size == 16 and bundle.params["pos_embed"].shape == (1, 2 + 7 * 11, 64)
  assert hf.at_patch(bundle, 16) is bundle


def test_family_without_flexi_patch_is_refused(monkeypatch):
  from ast_jax.models import ast

  monkeypatch.setattr(ast, "FAMILY", dataclasses.replace(ast.FAMILY, options=frozenset()))
  with pytest.raises(ValueError, match=r"'ast' models run only at the patch they store; families that run at any "
                                       r"patch \(flexi_patch\): $"):
    hf.save_hf("/nonexistent/never-written", flexi_bundle(), patch=8)


def test_rectangular_stored_patch_needs_a_square_export(tmp_path):
  bundle = flexi_bundle()
  bundle.config.model.patch_time = 8  # 16 mel bins x 8 frames
  with pytest.raises(ValueError, match="holds square patches only; this model stores 16x8 patches"):
    hf.save_hf(str(tmp_path / "hf"), bundle)
  assert not (tmp_path / "hf").exists()


# The command line's main with its flags parsed, one argv after another, in one process of its own (the command's
# absl flags would collide with other commands' in the test process).
DRIVER = """
import json, sys
from absl import flags
from absl.testing import flagsaver
from ast_jax.convert import __main__ as convert
results = []
for argv in json.loads(sys.argv[1]):
  with flagsaver.flagsaver():
    try:
      convert.main(flags.FLAGS(["convert", *argv]))
      results.append([0, ""])
    except SystemExit as exit:
      results.append([1, str(exit.code)])
print(json.dumps(results))
"""


def test_command_line_exports_at_a_patch_and_names_each_bad_patch_size(tmp_path):
  bundle = flexi_bundle(8)  # overlapping by half: stride 8 of 16, as configs/fsdd.py's AST
  model_dir.save_model_dir(str(tmp_path / "model"), bundle)
  source = str(tmp_path / "model")

  def args(patch, target="hf"):
    return ["--from=ast_jax", f"--to={target}", f"--patch_size={patch}", source, str(tmp_path / f"out_{patch}")]

  expected = {
      "12": "",
      "8x16": "--patch_size=8x16: Hugging Face's ASTConfig holds square patches only; give one size P",
      "0": "--patch_size=0: a patch size must be a positive integer",
      "-4": "--patch_size=-4: a patch size must be a positive integer",
      "big": "--patch_size=big: not a patch size; give one positive integer P (P x P patches)",
      "80": "patch size 80x80: spectrogram 64 mel bins x 100 frames is smaller than one 80x80 patch",
      "9": "patch size 9x9: patch (9, 9) does not scale the frequency stride 8 of the stored 16x16 patch to a whole",
  }
  argvs = [args(patch) for patch in expected] + [args(12, "ast_jax")]
  result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  outcomes = json.loads(result.stdout.strip().splitlines()[-1])
  for (patch, message), (status, text) in zip(expected.items(), outcomes):
    assert (status, text.startswith(f"error: {message}")) == ((1, True) if message else (0, False)), (patch, text)
  assert outcomes[-1] == [1, "error: --patch_size applies to --to=hf, not --to=ast_jax"]
  assert not (tmp_path / "out_80").exists() and not (tmp_path / "out_0").exists()
  config = json.loads((tmp_path / "out_12" / "config.json").read_text())
  assert (config["patch_size"], config["frequency_stride"], config["time_stride"]) == (12, 6, 6)  # 8 * 12 / 16
  spectrogram = 0.5 * np.random.default_rng(3).standard_normal((1, FRAMES, MEL_BINS)).astype(np.float32)
  apply = jax.jit(build_model(bundle.config).apply, static_argnames="patch")
  ours, _ = apply({"params": bundle.params}, jnp.asarray(spectrogram), patch=(12, 12))
  np.testing.assert_allclose(hf_logits(str(tmp_path / "out_12"), spectrogram), np.asarray(ours), atol=1e-4, rtol=0)
