"""Time AST (and AuM) train and inference steps over a sweep of shapes: `python -m ast_jax.bench --sweep=NAME`.

  python -m ast_jax.bench --sweep=tiny --compare=torch          # CPU: AST-tiny b4 and AST-base b2, 1024 frames
  python -m ast_jax.bench --sweep=lengths                       # AST-tiny b2, 128..2048 frames (+ stride 16)
  python -m ast_jax.bench --sweep=gpu --attention=xla,cudnn     # AST-base bf16, batch 8..64, 512..2048 frames
  python -m ast_jax.bench --sweep=aum                           # AuM-tiny vs AST-tiny, 256..16384 tokens, batch 1
  python -m ast_jax.bench --sweep=tiny --variants=tiny --frames=128,256 --batch=1 --repeats=3 --out=/tmp/b

Presets (cases.PRESETS) are lists of (variant, frames, batch, stride[, backbone]); --variants, --frames, --batch,
--stride, --attention, --remat, --backbones and --scans set that axis in every preset case to each listed value (duplicates
dropped; backbone aum is Audio Mamba of the variant's width, configs.common.aum); --dtype
replaces the preset's dtype. Protocol per case: build from configs.common.base_config() (128 mel bins, 527
classes), compile, --warmup untimed calls, median of --repeats timed calls; then the same for inference.
With --compare=torch, transformers' ASTForAudioClassification (SDPA attention, Adam, BCE) is timed the same way.

Columns of OUT/bench.csv (one row per case; empty = unknown or not measured):
  backbone, variant, width, depth, num_heads, frames, mel_bins, patch_size, fstride, tstride: the model and input;
  tokens: patches + the prefix tokens (AST: cls + dist; AuM: its CLS token); batch; dtype (compute dtype; weights and Adam state stay float32);
  attention, remat, scan_layers: the model switches (config.model; for AuM, attention names its selective scan); device: jax device kind; num_devices: 1;
  compile_s: trace + compile + first call of the train step; ms_per_step: median train step (forward with
  train=True, BCE over 527 classes, value_and_grad, Adam update, params and optimiser state donated);
  infer_compile_s, infer_ms_per_step: the same for the forward pass alone;
  examples_per_sec, tokens_per_sec: batch (x tokens) / train step time;
  train_gflops_per_example: analytic model FLOPs (flops.py: matmuls only, 3x forward, remat not counted);
  tflops_per_sec: achieved model FLOP/s; mfu: that over the device's peak (flops.PEAK_FLOPS or --peak_flops;
  empty on CPU); peak_memory_mb, memory_source: device_peak = the device allocator's high-water mark while the
  case ran (GPU/TPU), compiled = XLA's buffer assignment for the train step (arguments + outputs - donated +
  temporaries; CPU, or a case that did not raise the high-water mark); torch_device, torch_ms_per_step,
  ratio_to_torch (ast_jax / torch: < 1 means ast_jax is faster), torch_version: the PyTorch comparison;
  warmup, repeats, date, jax_version: the protocol and environment; allocator: tcmalloc or system
  (ast_jax/runtime.py: the bench restarts itself with tcmalloc when it is installed).
OUT/bench.png: train ms/step against tokens (PyTorch dashed) and peak memory (or examples/s) against tokens.
"""

from __future__ import annotations

import os

from absl import app, flags

_SWEEP = flags.DEFINE_enum("sweep", "tiny", ["tiny", "lengths", "gpu", "aum"], "Preset list of cases.")
_BACKBONES = flags.DEFINE_list("backbones", [], "Backbones (ast, aum).")
_SCANS = flags.DEFINE_list("scans", [], "AuM selective scans (auto, sequential, associative, chunked, recompute, pallas).")
_COMPARE = flags.DEFINE_enum("compare", None, ["torch"], "Also time transformers' PyTorch AST on each case.")
_OUT = flags.DEFINE_string("out", None, "Output folder for bench.csv and bench.png (default: bench_out/<sweep>).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per step; the median is reported.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after the first (compiling) call.", lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the preset's).")
_VARIANTS = flags.DEFINE_list("variants", [], "Model variants (tiny, small, base).")
_FRAMES = flags.DEFINE_list("frames", [], "Input lengths in frames.")
_BATCH = flags.DEFINE_list("batch", [], "Batch sizes.")
_STRIDE = flags.DEFINE_list("stride", [], "Patch strides (frequency = time).")
_ATTENTION = flags.DEFINE_list("attention", [], "Attention implementations (auto, xla, blockwise, splash, cudnn).")
_REMAT = flags.DEFINE_list("remat", [], "Rematerialisation policies (none, full, dots, dots_no_batch).")
_SCAN = flags.DEFINE_bool("scan_layers", False, "nn.scan over the blocks.")
_WIDTH = flags.DEFINE_integer("width", 0, "Override the variants' width (with --num_heads).", lower_bound=0)
_DEPTH = flags.DEFINE_integer("depth", 0, "Override the variants' depth.", lower_bound=0)
_HEADS = flags.DEFINE_integer("num_heads", 0, "Override the variants' attention heads.", lower_bound=0)
_PEAK = flags.DEFINE_float("peak_flops", 0.0, "Per-device peak FLOP/s for MFU (0: look the device kind up).")
_PLOT = flags.DEFINE_bool("plot", True, "Write bench.png (needs matplotlib).")


def _integers(name: str, values: list[str]) -> list[int]:
  try:
    return [int(value) for value in values]
  except ValueError as error:
    raise app.UsageError(f"--{name} takes integers: {error}") from error


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ast_jax.bench import cases

  chosen = cases.expand_cases(
      _SWEEP.value, variants=_VARIANTS.value, frames=_integers("frames", _FRAMES.value),
      batch=_integers("batch", _BATCH.value), stride=_integers("stride", _STRIDE.value), dtype=_DTYPE.value,
      attention=_ATTENTION.value, remat=_REMAT.value, scan_layers=_SCAN.value, width=_WIDTH.value,
      depth=_DEPTH.value, num_heads=_HEADS.value, backbones=_BACKBONES.value, scans=_SCANS.value)
  try:
    cases.check_cases(chosen)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  if _COMPARE.value:
    # JAX and PyTorch share one GPU in this process. JAX's allocator may grow to 75 % of the GPU's memory and
    # keeps what it once held: on an 80 GB H100 the gpu preset's PyTorch AST-base batch-64 step then ran out of
    # memory. JAX gets at most 45 % here, taken as needed (its AST-base batch-64 step peaked at 23710 MiB),
    # PyTorch the rest. Set before JAX's backend starts; device peaks are bytes in use either way.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    from ast_jax.bench import torch_ref

    try:
      torch_ref.require_torch()
    except RuntimeError as error:
      raise app.UsageError(str(error)) from error
  out_dir = _OUT.value or os.path.join("bench_out", _SWEEP.value)
  cases.run_sweep(chosen, out_dir, warmup=_WARMUP.value, repeats=_REPEATS.value, compare=_COMPARE.value,
                  peak_override=_PEAK.value, plot=_PLOT.value)


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # 15-30 % faster CPU steps (ast_jax/runtime.py)
  app.run(main)
