"""Serving artifacts (`python -m ast_jax.export`): a stablehlo artifact reloaded with `jax.export.deserialize` gives
predict's logits on real FSDD recordings at two batch sizes and two input lengths, for AST, FlexiAST at another
patch size, AuM, and the packed-row families one clip per row; the ONNX graph run by onnxruntime gives our
logits; bad input is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from ast_jax import export
from ast_jax.audio import load_audio, model_input, remove_mean
from ast_jax.convert import model_dir
from ast_jax.models import build_model, example_inputs, init_params
from ast_jax.inference import PackedPredictor
from ast_jax.predict import Predictor
from configs import fsdd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDINGS = os.path.join(ROOT, os.pardir, "shared", "data", "fsdd", "recordings")
FILES = ("0_george_0.wav", "3_jackson_12.wav", "7_theo_3.wav", "9_nicolas_40.wav", "5_yweweler_8.wav")
TINY = dict(variant="", width=64, depth=2)


def random_params(config) -> dict:
  """Parameters of the config's model drawn directly (shapes from `eval_shape`: no init program to compile): norm
  scales near 1, everything else small and non-zero, so every tensor moves the outputs."""
  model = build_model(config)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *example_inputs(config))["params"]))
  noise = np.random.default_rng(1)

  def draw(path, leaf):
    centre = 1.0 if jax.tree_util.keystr(path).endswith(("'scale']", "'weight']")) else 0.0
    return (centre + 0.1 * noise.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_model_dir(path, arg: str | None = None, **model) -> str:
  """A tiny model of configs/fsdd.py:`arg` (64 mel bins, 100 frames; width 64, depth 2), saved as a model
  directory."""
  config = fsdd.get_config(arg)
  config.model.update({**TINY, **model})
  labels = [f"digit{i}" for i in range(config.num_classes)]
  model_dir.save_model_dir(str(path), model_dir.ModelBundle(random_params(config), config, labels))
  return str(path)


@pytest.fixture(scope="module")
def recordings() -> list[np.ndarray]:
  if not os.path.isdir(RECORDINGS):
    pytest.skip(f"FSDD recordings not found at {RECORDINGS}")
  return [remove_mean(load_audio(os.path.join(RECORDINGS, name), 16000)) for name in FILES]


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory) -> str:
  return tiny_model_dir(tmp_path_factory.mktemp("ast") / "model", num_heads=2)


def padded(waveforms: list[np.ndarray], samples: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`rows` rows (default: one per waveform) zero-padded or cut to `samples`, with their real lengths."""
  batch = np.zeros((rows or len(waveforms), samples), np.float32)
  lengths = np.zeros(len(batch), np.int32)
  for row, waveform in enumerate(waveforms):
    batch[row, :min(samples, len(waveform))] = waveform[:samples]
    lengths[row] = min(samples, len(waveform))
  return batch, lengths


def predict_reference(bundle):
  """What `ast_jax.predict` computes for one window per clip: waveforms -> (logits, embeddings)."""
  predictor = Predictor(bundle)
  return lambda waveforms: predictor(*padded(waveforms, predictor.input_samples))


def check_batches(run, waveforms, reference, lengths=(20000, 6000)) -> list[float]:
  """The artifact at two batch sizes and two padded lengths (one past the model's input, one that cuts some clips)
  against `reference(waveforms) -> (logits, embeddings)`; returns the largest differences."""
  worst = [0.0, 0.0]
  for rows, samples in ((waveforms[:3], lengths[0]), (waveforms[3:], lengths[1])):
    expected = reference([waveform[:samples] for waveform in rows])
    actual = run(*padded(rows, samples))
    for index in range(2):
      assert actual[index].shape == expected[index].shape
      worst[index] = max(worst[index], float(np.abs(actual[index] - expected[index]).max()))
  print(f"max |difference|: logits {worst[0]:.2e}, embeddings {worst[1]:.2e}")
  assert worst[0] <= 1e-4 and worst[1] <= 1e-4, worst
  return worst


def test_ast_artifact_matches_predict_at_any_batch_and_length(tmp_path, recordings, ast_dir):
  description = export.export(ast_dir, "stablehlo", str(tmp_path / "ast.shlo"))
  with open(tmp_path / "ast.shlo", "rb") as handle:  # the documented plain call, no ast_jax needed
    exported = jax.export.deserialize(bytearray(handle.read()))
  assert [str(aval.shape) for aval in exported.in_avals] == ["(batch, samples)", "(batch,)"]

  def run(waveforms, lengths):
    return tuple(np.asarray(out) for out in exported.call(waveforms, lengths))

  reference = predict_reference(model_dir.load_model_dir(ast_dir))
  check_batches(run, recordings, reference)
  rows, lengths = padded(recordings[3:], 6000)
  for served, within in zip(run(rows, lengths + 1000), run(rows, lengths)):  # lengths past the row are clipped
    np.testing.assert_array_equal(served, within)
  # Each row's mean is removed inside, over its real samples: a DC offset (a file predict would centre) is no input.
  offset = np.where(np.arange(rows.shape[1])[None, :] < lengths[:, None], rows + 0.25, 0.0).astype(np.float32)
  for served, centred in zip(run(offset, lengths), run(rows, lengths)):
    np.testing.assert_allclose(served, centred, atol=1e-5)
  on_disk = json.loads((tmp_path / "ast.shlo.json").read_text())
  assert on_disk == json.loads(json.dumps(description))
  assert on_disk["label_names"][3] == "digit3" and on_disk["sample_rate"] == 16000 and on_disk["family"] == "ast"
  assert on_disk["outputs"][0]["shape"] == ["batch", 10] and on_disk["outputs"][1]["shape"] == ["batch", 64]
  assert on_disk["front_end"]["num_mel_bins"] == 64 and on_disk["patch"] == [16, 16] and on_disk["strides"] == [8, 8]
  assert on_disk["input_samples"] == 400 + 160 * 99 and on_disk["platforms"] == ["cpu"]

  # Every platform in one artifact, traced on this CPU host with plain-JAX kernels; its CPU part runs.
  export.export(ast_dir, "stablehlo", str(tmp_path / "all.shlo"), platforms=["cpu", "cuda", "tpu"])
  logits, embeddings = export.load(str(tmp_path / "all.shlo"))(*padded(recordings[:3], 20000))
  expected = reference(recordings[:3])
  with pytest.raises(ValueError, match=r"all.shlo takes audio at 16000 Hz, not 8000 Hz: resample it first"):
    export.load(str(tmp_path / "all.shlo"))(*padded(recordings[:3], 20000), sample_rate=8000)
  worst = max(np.abs(logits - expected[0]).max(), np.abs(embeddings - expected[1]).max())
  print(f"cpu,cuda,tpu artifact on CPU: max |difference| {worst:.2e}")
  assert worst <= 1e-4


def test_flexiast_artifact_runs_at_another_patch_size(tmp_path, recordings):
  path = tiny_model_dir(tmp_path / "flexi", "flexi", num_heads=2)
  bundle = model_dir.load_model_dir(path)
  description = export.export(path, "stablehlo", str(tmp_path / "p8.shlo"), patch_size=8)
  assert description["patch"] == [8, 8] and description["strides"] == [8, 8]
  model, audio = build_model(bundle.config), bundle.config.audio.to_dict()

  @jax.jit
  def at_patch(waveforms, lengths):
    logits, intermediates = model.apply({"params": bundle.params}, model_input(waveforms, lengths, audio), patch=(8, 8))
    return logits, intermediates["embedding"]

  def reference(rows):  # one program for every batch: rows padded to 3
    return tuple(np.asarray(out)[:len(rows)] for out in at_patch(*padded(rows, 16240, rows=3)))

  check_batches(export.load(str(tmp_path / "p8.shlo")), recordings, reference)
  stored = predict_reference(bundle)(recordings[:3])[0]
  assert np.abs(reference(recordings[:3])[0] - stored).max() > 1e-2  # the patch size reached the model


def test_aum_artifact_matches_predict(tmp_path, recordings):
  bundle = model_dir.load_model_dir(tiny_model_dir(tmp_path / "aum", "aum_smoke"))
  assert bundle.config.model.name == "aum"
  export.export(str(tmp_path / "aum"), "stablehlo", str(tmp_path / "aum.shlo"))
  check_batches(export.load(str(tmp_path / "aum.shlo")), recordings, predict_reference(bundle))


PACKED = [pytest.param("elastic", dict(num_heads=2), 400 + 160 * 319, id="elastic"),  # 160 tokens / 8 = 20 x 16
          pytest.param("aum_packed", {}, 400 + 160 * 239, id="aum_packed", marks=pytest.mark.slow)]  # 15-row table


@pytest.mark.parametrize("arg,model,longest", PACKED)
def test_packed_families_run_each_clip_at_its_own_length(tmp_path, recordings, arg, model, longest):
  """ElasticAST and packed AuM: one clip per row, masked past its end, equals the model on that clip alone and
  predict's packed rows."""
  bundle = model_dir.load_model_dir(tiny_model_dir(tmp_path / arg, arg, **model))
  description = export.export(str(tmp_path / arg), "stablehlo", str(tmp_path / "packed.shlo"))
  assert description["input_samples"] == longest
  network, audio = build_model(bundle.config), bundle.config.audio.to_dict()
  patch_time = bundle.config.model.get("patch_time") or bundle.config.model.patch_size
  apply = jax.jit(network.apply)

  def alone(waveform):  # the clip's whole patches of frames as a whole-clip row
    frames = max(patch_time, ((len(waveform) - 400) // 160 + 1) // patch_time * patch_time)
    one_row = padded([waveform], 20000)  # one front-end program per frame count
    spectrogram = model_input(*one_row, audio, window_shifts=np.array([160]), frames=frames)
    logits, intermediates = apply({"params": bundle.params}, spectrogram)
    return np.asarray(logits[0]), np.asarray(intermediates["embedding"][0])

  def reference(rows):
    outputs = [alone(waveform) for waveform in rows]
    return np.stack([logits for logits, _ in outputs]), np.stack([embedding for _, embedding in outputs])

  run = export.load(str(tmp_path / "packed.shlo"))
  check_batches(run, recordings, reference, lengths=(longest + 5000, 6000))
  logits, embeddings, _ = PackedPredictor(bundle).run(recordings[:3])
  served = run(*padded(recordings[:3], longest + 5000))  # a shape check_batches compiled
  worst = max(np.abs(served[0] - logits).max(), np.abs(served[1] - embeddings).max())
  print(f"against predict's packed rows: max |difference| {worst:.2e}")
  assert worst <= 1e-4


def test_onnx_graph_gives_our_logits_in_onnxruntime(tmp_path, recordings, ast_dir):
  """The ONNX input is the normalised spectrogram (HF's feature extractor's `input_values`)."""
  onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements-test.txt)")
  pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (requirements-test.txt)")
  description = export.export(ast_dir, "onnx", str(tmp_path / "ast.onnx"))
  assert description["inputs"] == [{"name": "input_values", "shape": ["batch", 100, 64], "dtype": "float32"}]
  assert description["external_data"] is None and sorted(os.listdir(tmp_path)) == ["ast.onnx", "ast.onnx.json"]
  bundle = model_dir.load_model_dir(ast_dir)
  reference, audio = predict_reference(bundle), bundle.config.audio.to_dict()
  session = onnxruntime.InferenceSession(str(tmp_path / "ast.onnx"), providers=["CPUExecutionProvider"])
  worst = 0.0
  for rows in (recordings[:1], recordings[1:4]):
    features = np.asarray(model_input(*padded(rows, 16240), audio))
    outputs = session.run(["logits", "embedding"], {"input_values": features})
    for served, ours in zip(outputs, reference(rows)):
      assert served.shape == ours.shape
      worst = max(worst, float(np.abs(served - ours).max()))
  print(f"onnx max |difference|: {worst:.2e}")
  assert worst <= 1e-4


def test_bad_input_is_one_clear_error(tmp_path, ast_dir):
  out = str(tmp_path / "model.shlo")
  aum = tiny_model_dir(tmp_path / "aum", "aum_smoke")
  flexi = tiny_model_dir(tmp_path / "flexi", "flexi", num_heads=2)
  cases = [
      ((str(tmp_path / "missing"), "stablehlo", out), {}, r"--checkpoint=.*missing: no such directory"),
      ((str(tmp_path), "stablehlo", out), {}, r"--checkpoint=.*not an ast_jax model directory"),
      ((ast_dir, "tflite", out), {}, r"--format=tflite: unknown format; choose one of stablehlo, onnx"),
      ((aum, "stablehlo", out), dict(patch_size=8), r"--patch_size=8: a 'aum' model runs at its own 16x16 .*ast"),
      ((ast_dir, "stablehlo", out), dict(patch_size=7), r"--patch_size=7: patch \(7, 7\) does not scale the frequency"),
      ((flexi, "stablehlo", out), dict(patch_size=80), r"--patch_size=80: spectrogram 64 mel bins .* too few mel bins"),
      ((ast_dir, "stablehlo", out), dict(patch_size=0), r"--patch_size=0: a patch size is a positive"),
      ((aum, "onnx", out), {}, r"--format=onnx exports AST models .* 'aum' model exports with --format=stablehlo"),
      ((ast_dir, "stablehlo", out), dict(platforms=["cpu", "metal"]), r"--platforms=cpu,metal: choose from cpu, cuda"),
      ((ast_dir, "stablehlo", str(tmp_path / "no" / "a.shlo")), {}, r"--out=.*a.shlo: the folder .* does not exist"),
  ]
  for args, options, message in cases:
    with pytest.raises(export.ExportError, match=message):
      export.export(*args, **options)
  assert not os.path.exists(out)
  with pytest.raises(export.ExportError, match="not a jax.export artifact"):
    export.load(os.path.join(ast_dir, "ast_jax.json"))
  with pytest.raises(export.ExportError, match="missing.shlo: no such file"):
    export.load(str(tmp_path / "missing.shlo"))


def test_command_line_names_the_problem_without_a_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "ast_jax.export", f"--checkpoint={tmp_path / 'nowhere'}",
                           f"--out={tmp_path / 'a.shlo'}"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"error: --checkpoint={tmp_path / 'nowhere'}: no such directory"
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_onnx_flexiast_at_another_patch_size(tmp_path, recordings):
  onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements-test.txt)")
  pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (requirements-test.txt)")
  path = tiny_model_dir(tmp_path / "flexi", "flexi", num_heads=2)
  description = export.export(path, "onnx", str(tmp_path / "p8.onnx"), patch_size=8)
  assert description["patch"] == [8, 8]
  bundle = model_dir.load_model_dir(path)
  model, audio = build_model(bundle.config), bundle.config.audio.to_dict()
  features = np.asarray(model_input(*padded(recordings, 16240), audio))
  logits, = onnxruntime.InferenceSession(str(tmp_path / "p8.onnx")).run(["logits"], {"input_values": features})
  ours, _ = model.apply({"params": bundle.params}, features, patch=(8, 8))
  print(f"onnx at 8x8 max |difference|: {np.abs(logits - np.asarray(ours)).max():.2e}")
  assert np.abs(logits - np.asarray(ours)).max() <= 1e-4
