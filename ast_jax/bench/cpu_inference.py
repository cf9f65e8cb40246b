"""CPU inference: ast_jax's predict forward against transformers' PyTorch AST exported from the same weights.

  python -m ast_jax.bench.cpu_inference --variant=base --batch=1,8 --frames=1024 --repeats=20 --out=DIR

An AST of `--variant` (or --width/--depth/--num_heads) with random weights, 527 classes, 128 mel bins, 16x16
patches at stride 10 (upstream AudioSet), is timed per batch, input length and compute dtype as:

| backend                | input -> output                       | what runs                                          |
|------------------------|---------------------------------------|----------------------------------------------------|
| `ast_jax_predict`      | waveforms -> logits, embeddings       | predict's `Predictor` (ast_jax/inference.py): the   |
|                        |                                       | front end (Kaldi fbank, pad/cut, normalise) and the |
|                        |                                       | model in one jitted function; outputs to NumPy      |
| `ast_jax_model`        | normalised spectrogram -> logits      | the model alone (jitted `model.apply`)              |
| `torch_hf`             | normalised spectrogram -> logits      | `ASTForAudioClassification.from_pretrained` of the  |
|                        |                                       | directory `convert/hf.py:save_hf` wrote from the    |
|                        |                                       | same weights, under `torch.inference_mode()`        |
| `hf_feature_extractor` | waveforms -> normalised spectrogram   | `ASTFeatureExtractor` of that directory (float32)   |

dtype bfloat16: ast_jax runs with `config.model.dtype=bfloat16` (parameters stay float32); PyTorch under
`torch.autocast("cpu", dtype=torch.bfloat16)`. Protocol (bench/timing.py): one first call (JAX: tracing and
compiling), `--warmup` untimed calls, the median of `--repeats` timed calls. The input is one clip length of
noise per row (`frames` frames at 10 ms); the spectrogram is the front end's output for it.

OUT/cpu_inference.csv, one row per case: backend, dtype, batch, frames, ms_per_batch (median), clips_per_sec,
first_call_s, variant, width, depth, num_heads, tokens (patches + cls + dist), cpu_model (/proc/cpuinfo),
threads (PyTorch: torch.get_num_threads(); JAX: the CPUs this process may run on, XLA's CPU thread pool),
torch_version, jax_version, transformers_version, allocator (tcmalloc or system), note (the feature extractor's
filterbank: torchaudio or numpy), warmup, repeats, date.

Importing this module loads no JAX, PyTorch or config code, and defines no flags until `define_flags` is called.
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import platform
import tempfile
from typing import Any, Sequence

from absl import app, flags

from ast_jax.bench.timing import measure

MEL_BINS, NUM_CLASSES, STRIDE, SAMPLE_RATE = 128, 527, 10, 16000
BACKENDS = ("ast_jax_predict", "ast_jax_model", "torch_hf", "hf_feature_extractor")
DTYPES = ("float32", "bfloat16")
COLUMNS = ("backend", "dtype", "batch", "frames", "ms_per_batch", "clips_per_sec", "first_call_s", "variant",
           "width", "depth", "num_heads", "tokens", "cpu_model", "threads", "torch_version", "jax_version",
           "transformers_version", "allocator", "note", "warmup", "repeats", "date")
CSV_NAME = "cpu_inference.csv"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """The command's flags on `flag_values` (the global set when run as a command)."""
  holders = dict(
      variant=flags.DEFINE_enum("variant", "base", ["tiny", "small", "base"], "ViT size of the AST.",
                                flag_values=flag_values),
      batch=flags.DEFINE_list("batch", ["1", "8"], "Batch sizes (clips per forward).", flag_values=flag_values),
      frames=flags.DEFINE_list("frames", ["1024"], "Input lengths in frames (10 ms each).", flag_values=flag_values),
      dtypes=flags.DEFINE_list("dtypes", list(DTYPES), "Compute dtypes (float32, bfloat16).",
                               flag_values=flag_values),
      backends=flags.DEFINE_list("backends", list(BACKENDS), f"What to time, of {', '.join(BACKENDS)}.",
                                 flag_values=flag_values),
      repeats=flags.DEFINE_integer("repeats", 10, "Timed calls per case; the median is reported.", lower_bound=1,
                                   flag_values=flag_values),
      warmup=flags.DEFINE_integer("warmup", 2, "Untimed calls after the first.", lower_bound=0,
                                  flag_values=flag_values),
      out=flags.DEFINE_string("out", "bench_out/cpu_inference", "Folder for cpu_inference.csv.",
                              flag_values=flag_values),
      width=flags.DEFINE_integer("width", 0, "Override the variant's width (with --num_heads).", lower_bound=0,
                                 flag_values=flag_values),
      depth=flags.DEFINE_integer("depth", 0, "Override the variant's depth.", lower_bound=0, flag_values=flag_values),
      num_heads=flags.DEFINE_integer("num_heads", 0, "Override the variant's heads.", lower_bound=0,
                                     flag_values=flag_values),
  )
  return holders


def _positive_integers(name: str, values: Sequence[str]) -> list[int]:
  try:
    numbers = [int(value) for value in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: give positive integers") from None
  if not numbers or min(numbers) < 1:
    raise app.UsageError(f"--{name}={','.join(values)}: give positive integers")
  return numbers


def _choices(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
  unknown = [value for value in values if value not in allowed]
  if unknown or not values:
    raise app.UsageError(f"--{name}={','.join(values)}: choose from {', '.join(allowed)}")
  return list(dict.fromkeys(values))


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or what the platform reports elsewhere)."""
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def bench_config(variant: str, frames: int, dtype: str, *, width: int = 0, depth: int = 0, num_heads: int = 0):
  """The base recipe's AST at `variant` (or the given sizes) on `frames` frames of 128 mel bins, 527 classes."""
  from configs.common import base_config

  config = base_config()
  config.model.update(variant=variant, width=width, depth=depth, num_heads=num_heads, fstride=STRIDE,
                      tstride=STRIDE, dtype=dtype)
  config.audio.update(target_length=frames, num_mel_bins=MEL_BINS)
  config.num_classes = NUM_CLASSES
  return config


def random_params(config: Any, seed: int = 0) -> Any:
  """Random weights for `config`'s model, drawn in NumPy on its parameter shapes (nothing compiled): N(0, 0.02),
  LayerNorm scales 1, biases 0."""
  import jax
  import numpy as np

  from ast_jax.models import build_model, example_inputs, init_params

  model, example = build_model(config), example_inputs(config)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(seed), *example))
  rng = np.random.default_rng(seed)

  def draw(path: Any, leaf: Any) -> np.ndarray:
    name = path[-1].key
    if name in ("scale", "bias"):
      return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


class Inputs:
  """One length's shared inputs: waveforms `[batch, samples]` of noise, their lengths, and the front end's
  normalised spectrogram `[batch, frames, 128]` of them (NumPy float32)."""

  def __init__(self, config: Any, batch: int):
    import numpy as np

    from ast_jax.audio import clip_samples, model_input

    audio = config.audio
    samples = clip_samples(audio.target_length, audio.sample_rate, audio.frame_length, audio.frame_shift)
    self.waveforms = (0.1 * np.random.default_rng(batch).standard_normal((batch, samples))).astype(np.float32)
    self.num_samples = np.full(batch, samples, np.int32)
    self.spectrogram = np.array(model_input(self.waveforms, self.num_samples, audio.to_dict()), np.float32)


def time_jax(config: Any, params: Any, inputs: Inputs, backend: str, *, warmup: int, repeats: int):
  """The ast_jax forward of `backend` timed on `inputs`: ast_jax_predict calls predict's `Predictor` (one batch of
  waveforms through its jitted front end and model, outputs copied to NumPy), ast_jax_model the jitted model."""
  import jax
  import numpy as np

  from ast_jax.convert.model_dir import ModelBundle, default_label_names
  from ast_jax.inference import Predictor
  from ast_jax.models import build_model

  if backend == "ast_jax_predict":
    bundle = ModelBundle(params, config, default_label_names(config.num_classes))
    predictor = Predictor(bundle, batch_size=len(inputs.waveforms))
    call = lambda: predictor(inputs.waveforms, inputs.num_samples)  # noqa: E731
  else:
    model, device_params = build_model(config), jax.tree.map(jax.numpy.asarray, params)
    apply = jax.jit(lambda params, spectrogram: model.apply({"params": params}, spectrogram)[0])
    call = lambda: np.asarray(apply(device_params, inputs.spectrogram))  # noqa: E731
  return measure(call, warmup=warmup, repeats=repeats)


def time_torch(model: Any, inputs: Inputs, dtype: str, *, warmup: int, repeats: int):
  """transformers' AST on the spectrogram under inference mode (bfloat16: CPU autocast)."""
  import torch

  spectrogram = torch.from_numpy(inputs.spectrogram)

  def call():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      return model(input_values=spectrogram).logits.float().numpy()

  return measure(call, warmup=warmup, repeats=repeats)


def time_feature_extractor(extractor: Any, inputs: Inputs, *, warmup: int, repeats: int):
  """HF's feature extractor: waveforms -> padded, normalised fbank tensors `[batch, frames, mel_bins]`."""
  waveforms = list(inputs.waveforms)
  call = lambda: extractor(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="pt")  # noqa: E731
  return measure(call, warmup=warmup, repeats=repeats)


def load_torch(config: Any, params: Any, directory: str) -> tuple[Any, Any]:
  """(model, feature extractor) from the Hugging Face directory `save_hf` writes for these weights."""
  import transformers

  from ast_jax.convert import hf, model_dir

  bundle = model_dir.ModelBundle(params, config, model_dir.default_label_names(config.num_classes))
  hf.save_hf(directory, bundle)
  model = transformers.ASTForAudioClassification.from_pretrained(directory).float().eval()  # autocast makes bf16
  return model, transformers.ASTFeatureExtractor.from_pretrained(directory)


def environment() -> dict[str, Any]:
  """The columns every row shares: CPU, library versions, allocator, date."""
  import jax
  import torch
  import transformers

  return dict(cpu_model=cpu_model(), torch_version=torch.__version__, jax_version=jax.__version__,
              transformers_version=transformers.__version__,
              allocator="tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system",
              date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def row_of(backend: str, dtype: str, batch: int, frames: int, timing: Any, shape: dict[str, Any],
           shared: dict[str, Any], *, warmup: int, repeats: int) -> dict[str, Any]:
  import torch

  threads = torch.get_num_threads() if backend.startswith(("torch", "hf")) else len(os.sched_getaffinity(0))
  note = ""
  if backend == "hf_feature_extractor":
    from transformers.utils import is_speech_available

    note = "torchaudio fbank" if is_speech_available() else "numpy fbank"
  return dict(backend=backend, dtype=dtype, batch=batch, frames=frames, ms_per_batch=1e3 * timing.median_s,
              clips_per_sec=batch / timing.median_s, first_call_s=timing.first_s, threads=threads, note=note,
              warmup=warmup, repeats=repeats, **shape, **shared)


def run(variant: str, batches: Sequence[int], frames_list: Sequence[int], dtypes: Sequence[str],
        backends: Sequence[str], out_dir: str, *, warmup: int = 2, repeats: int = 10, width: int = 0, depth: int = 0,
        num_heads: int = 0) -> list[dict[str, Any]]:
  """Times every (frames, batch, dtype, backend) case; writes OUT/cpu_inference.csv after each. Returns the rows."""
  from ast_jax.audio.patches import patch_grid
  from ast_jax.models.vit import VARIANTS

  rows, shared = [], environment()
  sizes = dict(zip(("width", "depth", "num_heads"), VARIANTS[variant]))
  sizes.update({key: value for key, value in dict(width=width, depth=depth, num_heads=num_heads).items() if value})
  for frames in frames_list:
    config = bench_config(variant, frames, "float32", **sizes)
    freq_patches, time_patches = patch_grid(MEL_BINS, frames, 16, (STRIDE, STRIDE))
    shape = dict(variant=variant, tokens=freq_patches * time_patches + 2, **sizes)
    params = random_params(config)
    with tempfile.TemporaryDirectory() as directory:
      torch_model, extractor = load_torch(config, params, directory)
      for batch in batches:
        inputs = Inputs(config, batch)
        for backend in backends:
          for dtype in (("float32",) if backend == "hf_feature_extractor" else dtypes):
            if backend.startswith("ast_jax"):
              timing = time_jax(bench_config(variant, frames, dtype, **sizes), params, inputs, backend,
                                warmup=warmup, repeats=repeats)
            elif backend == "torch_hf":
              timing = time_torch(torch_model, inputs, dtype, warmup=warmup, repeats=repeats)
            else:
              timing = time_feature_extractor(extractor, inputs, warmup=warmup, repeats=repeats)
            rows.append(row_of(backend, dtype, batch, frames, timing, shape, shared, warmup=warmup, repeats=repeats))
            logging.info("%s %s batch %d, %d frames: %.1f ms per batch (%.2f clips/s)", backend, dtype, batch,
                         frames, rows[-1]["ms_per_batch"], rows[-1]["clips_per_sec"])
            write_csv(rows, os.path.join(out_dir, CSV_NAME))
  return rows


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()})


def run_flags(holders: dict[str, flags.FlagHolder]) -> list[dict[str, Any]]:
  """`run` with the parsed flags; a bad value is one UsageError naming the flag."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as error:
    raise app.UsageError(f"the PyTorch side needs torch and transformers (requirements-test.txt): {error}") from None
  from ast_jax.models import config_flops

  sizes = dict(width=holders["width"].value, depth=holders["depth"].value, num_heads=holders["num_heads"].value)
  frames = _positive_integers("frames", holders["frames"].value)
  for length in frames:  # an impossible model or input: one message before anything is timed
    try:
      config_flops(bench_config(holders["variant"].value, length, "float32", **sizes))
    except ValueError as error:
      raise app.UsageError(f"--variant/--width/--depth/--num_heads/--frames={length}: {error}") from None
  return run(holders["variant"].value, _positive_integers("batch", holders["batch"].value), frames,
             _choices("dtypes", holders["dtypes"].value, DTYPES),
             _choices("backends", holders["backends"].value, BACKENDS), holders["out"].value,
             warmup=holders["warmup"].value, repeats=holders["repeats"].value, **sizes)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark; set before JAX is first imported
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", force=True)
  rows = run_flags(_FLAGS)
  logging.info("wrote %d rows to %s", len(rows), os.path.join(_FLAGS["out"].value, CSV_NAME))


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # as the other benchmarks (ast_jax/runtime.py)
  _FLAGS = define_flags()
  app.run(main)
