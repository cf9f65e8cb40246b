"""Benchmark cases (presets and command-line overrides), the JAX train/inference step timings, and the CSV."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import logging
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ast_jax.models import config_flops, family_of
from ast_jax.train import throughput
from ast_jax.bench.timing import measure
from ast_jax.models.attention import resolve as resolve_attention

MEL_BINS = 128
NUM_CLASSES = 527

COLUMNS = (
    "backbone", "variant", "width", "depth", "num_heads", "frames", "mel_bins", "patch_size", "fstride", "tstride",
    "tokens", "batch", "dtype", "attention", "remat", "scan_layers", "device", "num_devices", "compile_s",
    "ms_per_step", "infer_compile_s", "infer_ms_per_step", "examples_per_sec", "tokens_per_sec",
    "train_gflops_per_example", "tflops_per_sec", "mfu", "peak_memory_mb", "memory_source", "torch_device",
    "torch_ms_per_step", "ratio_to_torch", "warmup", "repeats", "date", "jax_version", "torch_version", "allocator",
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked configuration. width/depth/num_heads > 0 override the variant's."""

  variant: str
  frames: int
  batch: int
  stride: int = 10
  dtype: str = "float32"
  attention: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  width: int = 0
  depth: int = 0
  num_heads: int = 0
  backbone: str = "ast"  # ast | aum (Audio Mamba of the variant's width, 24 layers)
  scan: str = "auto"  # aum: the selective scan implementation (models/ssm.py)


# The bench's backbone axis: how each turns the base recipe (an AST) into the case's model.
BACKBONES: dict[str, Callable[[ml_collections.ConfigDict, Case], None]] = {
    "ast": lambda config, case: None,
    "aum": lambda config, case: _aum_case(config, case),
}

# Each preset: (variant, frames, batch, stride[, backbone]) rows and the compute dtype. docs/BACKGROUND.md section 7
# has the CPU numbers the `tiny` preset is compared with (1024 frames at stride 10: 1212 patches). `aum`: AuM-tiny
# against AST-tiny (both width 192) on non-overlapping 16x16 patches, 256 to 16384 tokens (8 x frames / 16), batch 1.
PRESETS: dict[str, tuple[str, tuple[tuple[str, int, int, int], ...]]] = {
    "tiny": ("float32", (("tiny", 1024, 4, 10), ("base", 1024, 2, 10))),
    "lengths": ("float32", tuple(("tiny", frames, 2, 10) for frames in (128, 256, 512, 1024, 2048))
                + (("tiny", 1024, 2, 16),)),
    "gpu": ("bfloat16", tuple(("base", 1024, batch, 10) for batch in (8, 32, 64))
            + (("base", 512, 32, 10), ("base", 2048, 32, 10), ("small", 1024, 64, 10), ("tiny", 1024, 64, 10))),
    "aum": ("float32", tuple(("tiny", 2 * tokens, 1, 16, backbone) for backbone in BACKBONES
                             for tokens in (256, 512, 1024, 2048, 4096, 8192, 16384))),
}


def expand_cases(preset: str, *, variants: Sequence[str] = (), frames: Sequence[int] = (),
                 batch: Sequence[int] = (), stride: Sequence[int] = (), dtype: str | None = None,
                 attention: Sequence[str] = (), remat: Sequence[str] = (), scan_layers: bool = False,
                 width: int = 0, depth: int = 0, num_heads: int = 0, backbones: Sequence[str] = (),
                 scans: Sequence[str] = ()) -> list[Case]:
  """A preset's cases with the given axes overridden: every case takes each listed value (duplicates dropped)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown sweep {preset!r}; choose one of {sorted(PRESETS)}")
  preset_dtype, rows = PRESETS[preset]
  cases = [Case(*row[:4], dtype=dtype or preset_dtype, backbone=row[4] if len(row) > 4 else "ast") for row in rows]
  axes = (("variant", variants), ("frames", frames), ("batch", batch), ("stride", stride),
          ("attention", attention), ("remat", remat), ("backbone", backbones), ("scan", scans))
  for field, values in axes:
    if values:
      cases = [dataclasses.replace(case, **{field: value}) for case in cases for value in values]
  cases = [dataclasses.replace(case, scan_layers=scan_layers, width=width, depth=depth, num_heads=num_heads)
           for case in cases]
  # A backbone without a selective scan has no scan axis: its cases collapse to one.
  cases = [case if _has_scan(case) else dataclasses.replace(case, scan="auto") for case in cases]
  return list(dict.fromkeys(cases))


def case_config(case: Case) -> ml_collections.ConfigDict:
  """The base recipe with the case's model, input length and switches."""
  from configs.common import base_config

  config = base_config()
  config.model.update(variant=case.variant, width=case.width, depth=case.depth, num_heads=case.num_heads,
                      fstride=case.stride, tstride=case.stride, dtype=case.dtype, attention=case.attention,
                      remat=case.remat, scan_layers=case.scan_layers)
  BACKBONES[case.backbone](config, case)
  config.audio.update(target_length=case.frames, num_mel_bins=MEL_BINS)
  config.num_classes = NUM_CLASSES
  return config


def _aum_case(config: ml_collections.ConfigDict, case: Case) -> None:
  from configs.common import aum

  aum(config, case.variant, width=case.width, depth=case.depth, fstride=case.stride, tstride=case.stride,
      scan=case.scan)


def _has_scan(case: Case) -> bool:
  return case.backbone in BACKBONES and "scan" in case_config(dataclasses.replace(case, scan="auto")).model


def check_cases(cases: Sequence[Case]) -> None:
  """Fails before any timing when a case names an unknown variant, dtype or switch, or a too-short input."""
  from ast_jax.models.mamba import SCANS

  for case in cases:
    if case.backbone not in BACKBONES:
      raise ValueError(f"{case}: backbone {case.backbone!r} is not one of {tuple(BACKBONES)}")
    if case.scan not in SCANS:
      raise ValueError(f"{case}: scan {case.scan!r} is not one of {SCANS}")
    try:
      config_flops(case_config(case))
    except ValueError as error:
      raise ValueError(f"{case}: {error}") from error


def _inputs(case: Case) -> tuple[jax.Array, jax.Array]:
  """A normalised spectrogram `[batch, frames, mel_bins]` (about N(0, 0.5), as (x - mean) / (2 std)) and sparse
  multi-hot labels `[batch, classes]`."""
  spectrogram_key, label_key = jax.random.split(jax.random.key(1))
  spectrogram = 0.5 * jax.random.normal(spectrogram_key, (case.batch, case.frames, MEL_BINS), jnp.float32)
  labels = jax.random.bernoulli(label_key, 0.01, (case.batch, NUM_CLASSES)).astype(jnp.float32)
  return spectrogram, labels


def _compiled_bytes(compiled: Any) -> int | None:
  """The compiled program's memory from XLA's buffer assignment: arguments + outputs - donated + temporaries
  (the CPU backend's `peak_memory_in_bytes` counts arguments only, so the larger of the two is reported)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes)
  return int(max(total, getattr(stats, "peak_memory_in_bytes", 0) or 0))


def _device_peak_bytes(device: jax.Device) -> int | None:
  stats = device.memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def make_steps(model: Any, tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """The benchmarked train step (forward with train=True, BCE, value_and_grad, optimiser update; params and
  optimiser state donated) and inference step (forward only), both jitted."""

  def train_step(params, opt_state, spectrogram, labels, dropout_key):
    def loss_fn(params):
      logits, _ = model.apply({"params": params}, spectrogram, train=True, rngs={"dropout": dropout_key})
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def infer_step(params, spectrogram):
    return model.apply({"params": params}, spectrogram)[0]

  return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(infer_step)


def time_jax_case(case: Case, config: ml_collections.ConfigDict, device: jax.Device, *, warmup: int,
                  repeats: int) -> dict[str, Any]:
  """Compiles and times the train and inference steps of one case on `device` (the default device)."""
  from ast_jax.models import build_model, init_params

  model = build_model(config)
  spectrogram, labels = _inputs(case)
  params = init_params(model, jax.random.key(0), spectrogram[:1])
  tx = optax.adam(config.optim.lr, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps)
  opt_state = jax.jit(tx.init)(params)
  train_step, infer_step = make_steps(model, tx)
  dropout_key = jax.random.key(2)
  peak_before = _device_peak_bytes(device)

  start = time.perf_counter()
  compiled_train = train_step.lower(params, opt_state, spectrogram, labels, dropout_key).compile()
  train_compile_s = time.perf_counter() - start
  state = [params, opt_state]
  del params, opt_state  # donated: only `state` may hold them

  def train_call():
    state[0], state[1], loss = compiled_train(state[0], state[1], spectrogram, labels, dropout_key)
    loss.block_until_ready()

  train = measure(train_call, warmup=warmup, repeats=repeats)
  peak_after = _device_peak_bytes(device)
  # The device high-water mark is per process: it describes this case only if it rose during it.
  if peak_after is not None and (peak_before is None or peak_after > peak_before):
    peak_bytes, memory_source = peak_after, "device_peak"
  else:
    peak_bytes = _compiled_bytes(compiled_train)
    memory_source = "compiled" if peak_bytes is not None else ""

  start = time.perf_counter()
  compiled_infer = infer_step.lower(state[0], spectrogram).compile()
  infer_compile_s = time.perf_counter() - start
  infer = measure(lambda: compiled_infer(state[0], spectrogram).block_until_ready(), warmup=warmup,
                  repeats=repeats)
  del state[:]
  gc.collect()
  return dict(
      compile_s=train_compile_s + train.first_s, ms_per_step=1e3 * train.median_s,
      infer_compile_s=infer_compile_s + infer.first_s, infer_ms_per_step=1e3 * infer.median_s,
      peak_memory_mb=None if peak_bytes is None else peak_bytes / 2**20, memory_source=memory_source)


def case_row(case: Case, config: ml_collections.ConfigDict, device: jax.Device, timings: dict[str, Any], *,
             warmup: int, repeats: int, peak_override: float = 0.0) -> dict[str, Any]:
  """One CSV row: the case, its timings and the throughput, FLOP rate and MFU derived from them."""
  from ast_jax.models.mamba import resolve_scan

  counts = config_flops(config)
  kwargs = family_of(config).kwargs(config)
  num_devices = 1  # the steps run unsharded on one device
  seconds = timings["ms_per_step"] / 1e3
  step_flops = counts["train_flops"] * case.batch
  peak = throughput.peak_flops_per_device(device, case.dtype, peak_override)
  return dict(
      backbone=config.model.name, variant=case.variant, width=counts["width"], depth=counts["depth"],
      num_heads=kwargs.get("num_heads", 0), frames=case.frames, mel_bins=MEL_BINS,
      patch_size=counts["patch_size"], fstride=case.stride, tstride=case.stride, tokens=counts["tokens"],
      batch=case.batch, dtype=case.dtype, remat=case.remat,
      attention=(f"scan={resolve_scan(config.model.scan)}" if "scan" in kwargs
                 else resolve_attention(case.attention, case.dtype)),
      scan_layers=case.scan_layers,
      device=device.device_kind, num_devices=num_devices, examples_per_sec=case.batch / seconds,
      tokens_per_sec=case.batch * counts["tokens"] / seconds, train_gflops_per_example=counts["train_flops"] / 1e9,
      tflops_per_sec=step_flops / seconds / 1e12, mfu=throughput.mfu(step_flops, seconds, num_devices, peak),
      warmup=warmup, repeats=repeats, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      jax_version=jax.__version__, allocator="tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system",
      **timings)


def _format(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, float):
    return float(f"{value:.6g}")
  return value


def write_csv(rows: Iterable[dict[str, Any]], path: str) -> None:
  """Rows to CSV with COLUMNS first (then any extra keys); unknown values are empty cells."""
  rows = list(rows)
  extra = [key for row in rows for key in row if key not in COLUMNS]
  columns = list(COLUMNS) + list(dict.fromkeys(extra))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, columns, restval="")
    writer.writeheader()
    for row in rows:
      writer.writerow({key: _format(value) for key, value in row.items()})


def describe(row: dict[str, Any]) -> str:
  """One log line per case: shape, JAX train/inference times, throughput, MFU, and the PyTorch comparison."""
  line = (f"{row['variant']} (D={row['width']}, depth {row['depth']}) {row['frames']} frames stride {row['fstride']} "
          f"({row['tokens']} tokens) batch {row['batch']} {row['dtype']}: compile {row['compile_s']:.1f} s, train "
          f"{row['ms_per_step']:.1f} ms/step ({row['examples_per_sec']:.2f} ex/s, {row['tflops_per_sec']:.3f} "
          f"TFLOP/s), inference {row['infer_ms_per_step']:.1f} ms/step")
  if row.get("mfu") is not None:
    line += f", MFU {100 * row['mfu']:.1f}%"
  if row.get("peak_memory_mb") is not None:
    line += f", memory {row['peak_memory_mb']:.0f} MiB ({row['memory_source']})"
  if row.get("torch_ms_per_step") is not None:
    line += (f"; torch {row['torch_ms_per_step']:.1f} ms/step, ast_jax/torch {row['ratio_to_torch']:.2f}")
  return line


def run_sweep(cases: Sequence[Case], out_dir: str, *, warmup: int = 2, repeats: int = 5, compare: str | None = None,
              peak_override: float = 0.0, plot: bool = True) -> list[dict[str, Any]]:
  """Times every case (and its PyTorch counterpart with compare='torch'); writes out_dir/bench.csv (after each
  case, so an interrupted sweep keeps what it measured) and out_dir/bench.png. Returns the rows."""
  if compare not in (None, "", "torch"):
    raise ValueError(f"unknown comparison {compare!r}; only 'torch' is supported")
  # transformers' ASTForAudioClassification is the reference: families it can hold (weight format 'hf') compare.
  if compare and any("hf" not in family_of(case_config(case)).weight_formats for case in cases):
    raise ValueError("--compare=torch times transformers' AST: it applies to AST cases only (--backbones=ast)")
  if compare:
    from ast_jax.bench import torch_ref

    torch_ref.require_torch()
  csv_path = os.path.join(out_dir, "bench.csv")
  rows = []
  device = jax.devices()[0]
  for case in cases:
    config = case_config(case)
    timings = time_jax_case(case, config, device, warmup=warmup, repeats=repeats)
    row = case_row(case, config, device, timings, warmup=warmup, repeats=repeats, peak_override=peak_override)
    if compare:
      row.update(torch_ref.time_torch_case(row, warmup=warmup, repeats=repeats))
      row["ratio_to_torch"] = row["ms_per_step"] / row["torch_ms_per_step"]
    logging.info("%s", describe(row))
    rows.append(row)
    write_csv(rows, csv_path)
  logging.info("wrote %s", csv_path)
  if plot:
    from ast_jax.bench.plot import plot_rows

    png_path = plot_rows(rows, os.path.join(out_dir, "bench.png"))
    if png_path:
      logging.info("wrote %s", png_path)
  return rows
