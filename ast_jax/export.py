"""Portable serving artifacts: `python -m ast_jax.export --checkpoint=DIR --format=stablehlo|onnx --out=FILE`.

- `stablehlo`: a `jax.export` artifact (the serialized `Exported`) of waveform -> (logits, embedding), the Kaldi
  front end inside. Inputs: `waveform [batch, samples]` float32 (mono, at the model's sample rate; each row's mean
  is removed inside, as predict removes each file's) and `num_samples [batch]` int32 (each row's real length;
  what follows is padding).
  Outputs: logits `[batch, classes]` and pooled embeddings `[batch, width]`. `batch` and `samples` are both
  symbolic: inside the program rows are zero-padded or cut to the model's input (whole-clip models: the samples of
  `audio.target_length` frames, as predict's windows; models trained on packed rows: each row one clip at its own
  length, masked past it, up to the longest clip predict takes whole), so one artifact takes any batch and length.
  `--platforms=cpu,cuda,tpu` lowers it for several platforms (plain-JAX attention and scan kernels then).
  Run it with `load(FILE)(waveform, num_samples)` or
  `jax.export.deserialize(open(FILE, 'rb').read()).call(waveform, num_samples)`.
- `onnx` (AST and FlexiAST only): Hugging Face's `ASTForAudioClassification` through `torch.onnx.export`; input
  `input_values [batch, frames, mel_bins]`, the normalised log-mel spectrogram as transformers'
  `ASTFeatureExtractor` makes it (no front end inside); outputs `logits` and `embedding`; dynamic batch.

FILE.json beside the artifact holds what a server needs besides it: sample rate, classes, label names, inputs and
outputs with their shapes, family, patch and the front-end settings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags

FORMATS = ("stablehlo", "onnx")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Kernels that are plain JAX, so they lower for every platform (Pallas, splash and cuDNN kernels do not).
PORTABLE_ATTENTION = ("xla", "blockwise")
PORTABLE_SCANS = ("sequential", "associative", "chunked", "recompute")
FLAGS = flags.FLAGS


class ExportError(ValueError):
  """Bad input to an export: the message names the flag or file and the problem."""


@dataclasses.dataclass(frozen=True)
class ServingFunction:
  """waveform `[batch, samples]`, num_samples `[batch]` -> (logits `[batch, classes]`, embedding `[batch, width]`);
  rows are padded or cut to `input_samples` inside."""

  forward: Callable[[Any, Any], tuple[Any, Any]]
  input_samples: int
  input: str  # how the model sees a clip, for the description


def read_model(checkpoint: str):
  """The model directory's bundle, or an ExportError naming --checkpoint."""
  from ast_jax.convert import model_dir

  if not os.path.isdir(checkpoint):
    raise ExportError(f"--checkpoint={checkpoint}: no such directory")
  try:
    return model_dir.load_model_dir(checkpoint)
  except (FileNotFoundError, ValueError, KeyError) as error:
    raise ExportError(f"--checkpoint={checkpoint}: {error}") from None


def check_patch(config: Any, patch_size: int | None) -> tuple[int, int] | None:
  """The (freq, time) patch to run at (`models/flexi.py:flexi_shape` of P; without P, a 'patch' training phase's
  `model.run_patch`), or None for the stored one; an ExportError when the family or the geometry cannot."""
  from ast_jax.audio.features import FrontEnd
  from ast_jax.audio.patches import patch_grid, patch_of, scaled_strides, strides_of
  from ast_jax.models.family import FLEXI_PATCH, families_with, family_of
  from ast_jax.models.flexi import flexi_shape

  if patch_size is None:
    return tuple(config.model.get("run_patch", ())) or None
  family, own = family_of(config), patch_of(config.model)
  if FLEXI_PATCH not in family.options:
    if (patch_size, patch_size) == own:
      return None
    raise ExportError(f"--patch_size={patch_size}: a {family.name!r} model runs at its own {own[0]}x{own[1]} "
                      f"patches; other sizes need a family with the {FLEXI_PATCH} option "
                      f"({', '.join(families_with(FLEXI_PATCH))})")
  patch = flexi_shape(config, patch_size)
  if patch == own:
    return None
  try:
    strides = scaled_strides(own, strides_of(config.model), patch)
    patch_grid(config.audio.num_mel_bins, FrontEnd.from_config(config.audio).frames, patch, strides)
  except ValueError as error:
    raise ExportError(f"--patch_size={patch_size}: {error}") from None
  return patch


def portable_config(config: Any, cpu_only: bool) -> Any:
  """The config with kernels that lower for the target platforms: platform-specific attention or scan kernels
  (auto's choices off CPU included) replaced by plain-JAX ones (CPU: blockwise attention, recompute scan, as
  `auto` picks there; else xla attention and the chunked scan)."""
  config = copy.deepcopy(config)
  model = config.model
  if model.get("attention", "auto") not in PORTABLE_ATTENTION:
    model.attention = "blockwise" if cpu_only else "xla"
  if "scan" in model and model.scan not in PORTABLE_SCANS:
    model.scan = "recompute" if cpu_only else "chunked"
  return config


def fit_samples(waveform, num_samples, samples: int):
  """`[batch, any]` -> `[batch, samples]`: each row's mean over its `num_samples` real samples removed (as predict
  removes each file's), zeros after them, then zero-padded or cut (the length may be symbolic); `num_samples`
  clipped to the row and to `samples`."""
  import jax.numpy as jnp

  length = waveform.shape[1]
  real = jnp.arange(length)[None, :] < jnp.clip(num_samples, 0, length)[:, None]
  count = jnp.maximum(jnp.sum(real, axis=1, keepdims=True), 1)
  mean = jnp.sum(jnp.where(real, waveform, 0.0), axis=1, keepdims=True) / count
  waveform = jnp.where(real, waveform - mean, 0.0)
  padded = jnp.concatenate([waveform, jnp.zeros((waveform.shape[0], samples), waveform.dtype)], axis=1)
  return padded[:, :samples], jnp.clip(num_samples, 0, jnp.minimum(length, samples))


def one_clip_layout(time_patches, freq: int, time: int):
  """The packer's layout of one clip per row on a `freq x time` grid, the clip `time_patches [rows]` long:
  its `freq * time_patches` tokens first, frequency-major, then padding (segment 0)."""
  import jax.numpy as jnp

  from ast_jax.models.tokens import TokenLayout

  token = jnp.arange(freq * time, dtype=jnp.int32)[None, :]
  extent = time_patches[:, None]
  real = token < freq * extent
  segment_ids = real.astype(jnp.int32)
  freq_positions = jnp.where(real, token // extent, 0)
  time_positions = jnp.where(real, token % extent, 0)
  return TokenLayout(segment_ids, freq_positions, time_positions, extent)


def whole_clip_function(model, params, config, patch) -> ServingFunction:
  """AST, FlexiAST, AuM: the front end at `audio.target_length` frames, as `predict.Predictor` runs it."""
  import jax.numpy as jnp

  from ast_jax.audio.features import FrontEnd, clip_samples, model_input

  front = FrontEnd.from_config(config.audio)
  samples = clip_samples(front.target_length, front.sample_rate, front.frame_length, front.frame_shift)

  def forward(waveform, num_samples):
    waveform, num_samples = fit_samples(waveform, num_samples, samples)
    logits, intermediates = model.apply({"params": params}, model_input(waveform, num_samples, front), patch=patch)
    return logits.astype(jnp.float32), intermediates["embedding"].astype(jnp.float32)

  return ServingFunction(forward, samples, f"whole clip: padded or cut to {front.frames} frames")


def packed_function(model, params, config) -> ServingFunction:
  """ElasticAST, packed AuM: each row is one clip at its own length, framed at the evaluation resolution
  `packing.resolutions[0]` and laid out as a packed row of one clip, so tokens past the clip are masked as in the
  model's evaluation. The longest clip is predict's: the row's tokens, and the time table unless positions are
  fractional (`ast_jax/inference.py:PackedPredictor`)."""
  import jax.numpy as jnp

  from ast_jax.audio.fbank import FbankOptions
  from ast_jax.audio.features import FrontEnd, clip_samples, model_input
  from ast_jax.audio.patches import patch_of
  from ast_jax.inference import longest_packed_clip

  if "packing" not in config:
    raise ExportError("the model directory has no packing section (a model trained on packed rows needs its row "
                      "size); write it again with a current ast_jax")
  front, packing = FrontEnd.from_config(config.audio), config.packing
  patch_freq, patch_time = patch_of(config.model)
  freq = front.num_mel_bins // patch_freq
  # The slot of the longest clip predict takes whole, framed at the base shift as the evaluation batches are.
  time, frames = longest_packed_clip(config, model, float(packing.resolutions[0]))
  at_q = FbankOptions(sample_rate=float(front.sample_rate), frame_length=front.frame_length,
                      frame_shift=front.frame_shift * float(packing.resolutions[0]))
  samples = clip_samples(frames, front.sample_rate, front.frame_length, front.frame_shift)
  size, shift = at_q.window_size, at_q.window_shift

  def forward(waveform, num_samples):
    waveform, num_samples = fit_samples(waveform, num_samples, samples)
    shifts = jnp.full(num_samples.shape, shift, jnp.int32)
    spectrogram = model_input(waveform, num_samples, front, window_shifts=shifts, frames=frames)
    clip_frames = jnp.where(num_samples >= size, 1 + (num_samples - size) // shift, 0)
    layout = one_clip_layout(jnp.clip(clip_frames // patch_time, 1, time), freq, frames // patch_time)
    logits, intermediates = model.apply({"params": params}, spectrogram[:, None], layout)
    return logits[:, 0].astype(jnp.float32), intermediates["embedding"][:, 0].astype(jnp.float32)

  return ServingFunction(forward, samples, f"one clip per packed row at its own length (up to {time} time patches), "
                         f"frame shift {shift} samples")


def serving_function(bundle, patch: tuple[int, int] | None = None, cpu_only: bool = True) -> ServingFunction:
  """The bundle's waveform -> (logits, embedding) function, its parameters held as constants."""
  import jax
  import jax.numpy as jnp

  from ast_jax.models import build_model, family_of

  config = portable_config(bundle.config, cpu_only)
  model = build_model(config)
  params = jax.tree.map(jnp.asarray, bundle.params)
  if family_of(config).trains_packed(config):
    return packed_function(model, params, config)
  return whole_clip_function(model, params, config, patch)


def check_out(out: str) -> None:
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise ExportError(f"--out={out}: the folder {folder} does not exist")
  if os.path.isdir(out):
    raise ExportError(f"--out={out} is a folder; give the artifact's file name")


def describe(bundle, fmt: str, patch: tuple[int, int] | None, inputs: list[dict], outputs: list[dict],
             **extra: Any) -> dict[str, Any]:
  """FILE.json: what a server needs besides the artifact."""
  from ast_jax.audio.features import FrontEnd
  from ast_jax.audio.patches import patch_of, scaled_strides, strides_of
  from ast_jax.models import family_of

  config = bundle.config
  own, strides = patch_of(config.model), strides_of(config.model)
  front = dataclasses.asdict(FrontEnd.from_config(config.audio))
  return {
      "format": fmt, "family": family_of(config).name, "sample_rate": front["sample_rate"],
      "num_classes": int(config.num_classes), "label_names": list(bundle.label_names),
      "label_ids": list(bundle.label_ids), "scores": "softmax" if config.train.loss == "ce" else "sigmoid",
      "patch": list(patch or own), "strides": list(scaled_strides(own, strides, patch) if patch else strides),
      "inputs": inputs, "outputs": outputs, "front_end": front, **extra,
  }


def write_description(out: str, description: dict[str, Any]) -> None:
  with open(out + ".json", "w") as handle:
    json.dump(description, handle, indent=2)


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  chosen = tuple(dict.fromkeys(name.strip().lower() for name in platforms if name.strip()))
  unknown = [name for name in chosen if name not in PLATFORMS]
  if not chosen or unknown:
    raise ExportError(f"--platforms={','.join(platforms)}: choose from {', '.join(PLATFORMS)}")
  return chosen


def export_stablehlo(bundle, out: str, patch: tuple[int, int] | None = None,
                     platforms: Sequence[str] = ("cpu",)) -> dict[str, Any]:
  """Writes the serialized `jax.export.Exported` of waveform -> (logits, embedding) to `out` and its description
  to `out`.json (returned)."""
  import jax
  import jax.numpy as jnp
  from jax import export as jax_export

  from ast_jax import target

  platforms = check_platforms(platforms)
  check_out(out)
  cpu_only = platforms == ("cpu",)
  function = serving_function(bundle, patch, cpu_only)
  batch, samples = jax_export.symbolic_shape("batch, samples")
  specs = (jax.ShapeDtypeStruct((batch, samples), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  # Traced once for every platform: the front end's per-clip loop only where the artifact runs on CPU alone.
  with target.compiling_for("cpu" if cpu_only else "gpu"):
    exported = jax_export.export(jax.jit(function.forward), platforms=platforms)(*specs)
  with open(out, "wb") as handle:
    handle.write(exported.serialize())
  logits, embedding = exported.out_avals
  description = describe(
      bundle, "stablehlo", patch,
      inputs=[{"name": "waveform", "shape": ["batch", "samples"], "dtype": "float32"},
              {"name": "num_samples", "shape": ["batch"], "dtype": "int32"}],
      outputs=[{"name": "logits", "shape": ["batch", int(logits.shape[1])], "dtype": "float32"},
               {"name": "embedding", "shape": ["batch", int(embedding.shape[1])], "dtype": "float32"}],
      platforms=list(platforms), symbolic=["batch", "samples"], input_samples=function.input_samples,
      model_input=function.input,
      waveform=(f"mono float32 at {bundle.config.audio.sample_rate} Hz; row i holds num_samples[i] real samples "
                f"(their mean is removed inside; what follows is padding); samples past {function.input_samples} are "
                "not read"),
      call="jax.export.deserialize(open(FILE, 'rb').read()).call(waveform, num_samples) -> (logits, embedding)")
  write_description(out, description)
  return description


def onnx_model(bundle, patch: tuple[int, int] | None):
  """Hugging Face's PyTorch AST of the bundle (through a temporary HF directory), wrapped to return
  (logits, pooled embedding)."""
  import tempfile

  from ast_jax.convert import hf

  try:
    import torch
    import transformers
  except ImportError as error:
    raise ExportError(f"--format=onnx needs torch and transformers ({error})") from None
  if patch is not None and patch[0] != patch[1]:
    raise ExportError(f"--patch_size with --format=onnx: Hugging Face's ASTConfig holds square patches, not "
                      f"{patch[0]}x{patch[1]}; export this model with --format=stablehlo")
  with tempfile.TemporaryDirectory() as folder:
    try:
      hf.save_hf(folder, bundle, patch=patch[0] if patch else None)
    except ValueError as error:
      raise ExportError(f"--format=onnx: {error}") from None
    model = transformers.ASTForAudioClassification.from_pretrained(folder).eval()

  class Serving(torch.nn.Module):
    """input_values -> (logits, embedding): the classifier's input is the pooled (cls + dist) / 2."""

    def __init__(self, model):
      super().__init__()
      self.model = model

    def forward(self, input_values):
      pooled = self.model.audio_spectrogram_transformer(input_values).pooler_output
      return self.model.classifier(pooled), pooled

  return Serving(model).eval(), model.config


def export_onnx(bundle, out: str, patch: tuple[int, int] | None = None) -> dict[str, Any]:
  """Writes the ONNX graph of Hugging Face's AST (normalised spectrogram -> logits, embedding) to `out` and its
  description to `out`.json (returned). torch's dynamo exporter (the default since torch 2.9; the TorchScript one
  is deprecated), with a dynamic batch dimension."""
  from ast_jax.models import family_of

  family = family_of(bundle.config)
  if "hf" not in family.weight_formats:
    raise ExportError(f"--format=onnx exports AST models (Hugging Face's ASTForAudioClassification); a "
                      f"{family.name!r} model exports with --format=stablehlo")
  check_out(out)
  serving, hf_config = onnx_model(bundle, patch)
  import torch

  frames, mel_bins = int(hf_config.max_length), int(hf_config.num_mel_bins)
  example = torch.zeros(2, frames, mel_bins)
  # Weights inside the file unless protobuf's 2 GB limit forces them into FILE.data.
  external = sum(p.numel() * p.element_size() for p in serving.parameters()) > 2**31 - 2**27
  torch.onnx.export(serving, (example,), out, input_names=["input_values"], output_names=["logits", "embedding"],
                    dynamic_shapes={"input_values": {0: torch.export.Dim("batch")}}, dynamo=True,
                    external_data=external, verbose=False)
  description = describe(
      bundle, "onnx", patch,
      inputs=[{"name": "input_values", "shape": ["batch", frames, mel_bins], "dtype": "float32"}],
      outputs=[{"name": "logits", "shape": ["batch", int(bundle.config.num_classes)], "dtype": "float32"},
               {"name": "embedding", "shape": ["batch", int(hf_config.hidden_size)], "dtype": "float32"}],
      input_values=("the normalised log-mel spectrogram (kaldi fbank of front_end, padded with zeros or cut to "
                    "target_length frames, then (fbank - mean) / (2 * std)), as transformers' ASTFeatureExtractor "
                    "makes it with these settings"),
      external_data=os.path.basename(out) + ".data" if external else None)
  write_description(out, description)
  return description


def export(checkpoint: str, fmt: str, out: str, patch_size: int | None = None,
           platforms: Sequence[str] = ("cpu",)) -> dict[str, Any]:
  """The command line's work: reads the model directory, writes the artifact and FILE.json."""
  if fmt not in FORMATS:
    raise ExportError(f"--format={fmt}: unknown format; choose one of {', '.join(FORMATS)}")
  if patch_size is not None and patch_size < 1:
    raise ExportError(f"--patch_size={patch_size}: a patch size is a positive number of bins and frames")
  bundle = read_model(checkpoint)
  patch = check_patch(bundle.config, patch_size)
  if fmt == "onnx":
    return export_onnx(bundle, out, patch)
  return export_stablehlo(bundle, out, patch, platforms)


def load(path: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
  """A stablehlo artifact as a function: (waveform `[batch, samples]`, num_samples `[batch]` or None = every
  sample, sample_rate = the audio's rate, checked against FILE.json's when given) -> (logits `[batch, classes]`,
  embedding `[batch, width]`) as NumPy arrays; jitted per shape."""
  import jax
  from jax import export as jax_export

  if not os.path.isfile(path):
    raise ExportError(f"{path}: no such file")
  with open(path, "rb") as handle:
    blob = bytearray(handle.read())
  try:
    exported = jax_export.deserialize(blob)
  except Exception as error:  # the deserializer raises several kinds for a file that is not an artifact
    raise ExportError(f"{path}: not a jax.export artifact ({type(error).__name__})") from None
  call = jax.jit(exported.call)
  rate = None
  if os.path.isfile(path + ".json"):
    with open(path + ".json") as handle:
      rate = json.load(handle).get("sample_rate")

  def run(waveform, num_samples=None, sample_rate: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if sample_rate is not None and rate is not None and int(sample_rate) != int(rate):
      raise ValueError(f"{path} takes audio at {int(rate)} Hz, not {int(sample_rate)} Hz: resample it first "
                       f"(ast_jax.audio.load_audio(file, {int(rate)}) does)")
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim != 2:
      raise ValueError(f"{path} takes waveforms [batch, samples], got shape {waveform.shape}")
    if num_samples is None:
      num_samples = np.full(waveform.shape[0], waveform.shape[1], np.int32)
    logits, embedding = call(waveform, np.asarray(num_samples, np.int32))
    return np.asarray(logits), np.asarray(embedding)

  return run


def define_flags() -> None:
  """The command line's flags, defined only when run as a command (predict and others define --checkpoint too)."""
  flags.DEFINE_string("checkpoint", None, "ast_jax model directory or training workdir.")
  flags.DEFINE_string("format", "stablehlo", f"One of {', '.join(FORMATS)}.")
  flags.DEFINE_string("out", None, "Artifact file to write; its description goes to FILE.json.")
  flags.DEFINE_integer("patch_size", None, "FlexiAST: run at PxP patches (families with the flexi_patch option "
                       "only: the stored kernel PI-resized, the positional grid resized).")
  flags.DEFINE_list("platforms", ["cpu"], f"stablehlo: the platforms the artifact runs on, of {', '.join(PLATFORMS)}.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; usage: python -m ast_jax.export --checkpoint=DIR "
                         "--format=stablehlo|onnx --out=FILE")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tracing needs no accelerator; before JAX is imported
  try:
    description = export(FLAGS.checkpoint, FLAGS.format, FLAGS.out, FLAGS.patch_size, FLAGS.platforms)
  except ExportError as error:
    sys.exit(f"error: {error}")
  print(f"wrote {FLAGS.out} ({description['format']}, {description['family']}, patch "
        f"{'x'.join(map(str, description['patch']))}) and {FLAGS.out}.json")


if __name__ == "__main__":
  define_flags()
  app.run(main)
