"""Throughput as the trainer logs it: examples/s, tokens/s and model FLOP utilisation (MFU) against the devices'
peak FLOP/s from the vendors' spec sheets. The model FLOPs come from the analytic counts in `models/flops.py`."""

from __future__ import annotations

import time
from typing import Any

import jax

from ast_jax.parallel.topology import CHIPS

# Dense (non-sparse) peak FLOP/s per device from the vendors' spec sheets, matched as a substring of
# `jax.Device.device_kind`, most specific first. "tf32" is the fp32-input tensor-core rate (used for float32 only
# when the matmul precision lets XLA use TF32); "fp32" is the non-tensor-core rate.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column.
    ("H100 PCIe", {"bfloat16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column.
    ("H100", {"bfloat16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (the same compute as H100 SXM; GH200 likewise).
    ("H200", {"bfloat16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe share these rates).
    ("A100", {"bfloat16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    # TPUs: the chip table of parallel/topology.py (bf16 peak per chip; "TPU v5 lite" before "TPU v5").
    *((chip.device_kind, {"bfloat16": chip.peak_flops}) for chip in CHIPS.values()),
)

# jax_default_matmul_precision settings: XLA's default lets NVIDIA GPUs run float32 matmuls on TF32 tensor cores
# and TPUs as one bfloat16 pass; "highest" forces true float32.
_DEFAULT_PRECISIONS = ("none", "default", "fastest")
_TF32_PRECISIONS = _DEFAULT_PRECISIONS + ("tensorfloat32",)
_FULL_FP32_PRECISIONS = ("highest", "float32")


def _dtype_name(dtype: Any) -> str:
  name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None) or str(dtype)
  return {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}.get(name, name)


def _float32_peak(peaks: dict[str, float], precision: str) -> float | None:
  """The rate float32 matmuls run at under a matmul precision; None where no spec-sheet number applies."""
  if "tf32" in peaks:
    if precision in _TF32_PRECISIONS:
      return peaks["tf32"]
    return peaks["fp32"] if precision in _FULL_FP32_PRECISIONS else None
  return peaks.get("bfloat16") if precision in _DEFAULT_PRECISIONS else None


def peak_flops_per_device(device: Any, dtype: Any, override: float = 0.0) -> float | None:
  """Peak FLOP/s of one device for matmuls in `dtype` (float32 | bfloat16): `override` if > 0, else the
  PEAK_FLOPS entry for the device kind, else None (unknown, e.g. CPU: MFU is then left empty, never guessed).

  `device` is a `jax.Device` or anything with a `device_kind` (or the device kind string itself).
  """
  if override and override > 0:
    return float(override)
  kind = getattr(device, "device_kind", device)
  dtype = _dtype_name(dtype)
  for substring, peaks in PEAK_FLOPS:
    if substring.lower() not in str(kind).lower():
      continue
    if dtype == "bfloat16":
      return peaks.get("bfloat16")
    if dtype == "float32":
      return _float32_peak(peaks, str(jax.config.jax_default_matmul_precision).lower())
    return None
  return None


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak: float | None) -> float | None:
  """Model FLOP utilisation: achieved model FLOP/s over the devices' peak; None when the peak is unknown."""
  if not peak or peak <= 0 or seconds_per_step <= 0 or num_devices <= 0:
    return None
  return flops_per_step / seconds_per_step / (num_devices * peak)


class Throughput:
  """examples/s, tokens/s and MFU (model FLOPs from the analytic count / the devices' peak) over an interval.
  Per step: `examples` (clips; for packed batches the epoch's mean), `tokens` and the train-step FLOPs."""

  def __init__(self, examples: float, tokens: float, train_flops: float, peak: float | None, num_devices: int):
    self.examples, self.tokens, self.train_flops = examples, tokens, train_flops
    self.peak, self.num_devices = peak, num_devices
    self.last_step, self.last_time = None, time.perf_counter()

  def summary(self, steps: int, seconds: float) -> dict[str, float]:
    per_second = steps / max(seconds, 1e-9)
    stats = {"examples_per_sec": per_second * self.examples, "tokens_per_sec": per_second * self.tokens}
    if self.peak:
      stats["mfu"] = per_second * self.train_flops / (self.peak * self.num_devices)
    return stats

  def interval(self, step: int) -> dict[str, float]:
    now, last_step, last_time = time.perf_counter(), self.last_step, self.last_time
    self.last_step, self.last_time = step, now
    if last_step is None:  # the first interval includes compilation
      return {}
    return {f"perf/{key}": value for key, value in self.summary(step - last_step, now - last_time).items()}
