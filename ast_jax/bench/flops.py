"""Analytic FLOP count of the AST, device peak FLOP/s, and model FLOP utilisation (MFU).

What is counted: matrix products only, a multiply-add as 2 FLOPs. Per example, with T tokens (patches + the 2
prefix tokens), width D, MLP width M:
- patch embedding: num_patches * patch_size^2 * D * 2 (one input channel);
- per block: qkv 2*T*D*3D, attention scores 2*T*T*D, attention-weighted sum 2*T*T*D, output projection 2*T*D*D,
  MLP 2 * 2*T*D*M;
- head: 2*D*classes.
Not counted: LayerNorm, softmax, GELU, biases, residual adds, the optimiser update, the front end. A train step is
3x the forward pass (the backward pass is 2x).

AuM (`aum_forward_flops_breakdown`), per token and layer, width D, d_inner E = 2D, state N, dt rank R, conv K:
in_proj 2*D*2E, conv 2*E*K, x_proj 2*E*(R + 2N), dt_proj 2*R*E, the scan 4*E*N per direction (the state update
a h + b and the C readout, a multiply-add each), out_proj 2*E*D; conv, x_proj and dt_proj twice where a variant
has a second branch (bi_bi, fo_fo). The exp of delta A and the other elementwise work are not counted,
though on a CPU they, not the projections, take most of an AuM step (docs/RESULTS.md). Rematerialised forward passes are not counted either: MFU counts
the model's FLOPs, not the hardware's, so remat lowers MFU rather than inflating it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

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
    # Google Cloud TPU system architecture pages: v6e (Trillium), v5e, v5p, v4; bf16 peak per chip.
    ("TPU v6 lite", {"bfloat16": 918e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v5", {"bfloat16": 459e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)

# jax_default_matmul_precision settings: XLA's default lets NVIDIA GPUs run float32 matmuls on TF32 tensor cores
# and TPUs as one bfloat16 pass; "highest" forces true float32.
_DEFAULT_PRECISIONS = ("none", "default", "fastest")
_TF32_PRECISIONS = _DEFAULT_PRECISIONS + ("tensorfloat32",)
_FULL_FP32_PRECISIONS = ("highest", "float32")


def forward_flops_breakdown(*, width: int, depth: int, mlp_dim: int, num_tokens: int, patch_size: int | tuple[int, int],
                            num_patches: int, num_classes: int) -> dict[str, float]:
  """Forward FLOPs per example, by part: patch_embed, qkv, attention (scores + mix), proj, mlp, head.
  `patch_size`: one size (square), or (frequency, time) sizes."""
  tokens, width = float(num_tokens), float(width)
  patch_freq, patch_time = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
  return {
      "patch_embed": num_patches * patch_freq * patch_time * width * 2,
      "qkv": depth * 2 * tokens * width * 3 * width,
      "attention": depth * 2 * (2 * tokens * tokens * width),
      "proj": depth * 2 * tokens * width * width,
      "mlp": depth * 2 * 2 * tokens * width * mlp_dim,
      "head": 2 * width * num_classes,
  }


def aum_forward_flops_breakdown(*, width: int, depth: int, num_tokens: int, patch_size: int | tuple[int, int],
                                num_patches: int, num_classes: int, bidirectional: str = "fo_bi", d_state: int = 16,
                                d_conv: int = 4, expand: int = 2, dt_rank: int = 0) -> dict[str, float]:
  """AuM forward FLOPs per example, by part (module docstring)."""
  tokens, inner = float(num_tokens), float(expand * width)
  dt_rank = dt_rank or -(-width // 16)
  patch_freq, patch_time = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
  branches = 1 if bidirectional == "fo_bi" else 2  # separate conv/x_proj/dt_proj per direction
  return {
      "patch_embed": num_patches * patch_freq * patch_time * width * 2,
      "in_proj": depth * 2 * tokens * width * 2 * inner,
      "branch": depth * branches * 2 * tokens * inner * (d_conv + dt_rank + 2 * d_state + dt_rank),
      "scan": depth * 2 * 4 * tokens * inner * d_state,  # two directions
      "out_proj": depth * 2 * tokens * inner * width,
      "head": 2 * width * num_classes,
  }


def forward_flops(**shape: Any) -> float:
  """Forward-pass FLOPs per example (see the module docstring for what is counted; arguments as
  `forward_flops_breakdown`'s)."""
  return sum(forward_flops_breakdown(**shape).values())


def train_flops_per_example(**shape: Any) -> float:
  """Train-step FLOPs per example: forward + backward (2x forward); remat is not counted."""
  return 3 * forward_flops(**shape)


def config_flops(config: Any) -> dict[str, float]:
  """FLOPs of the model and input shape a config describes.

  Returns width, depth, mlp_dim, patch_size, freq, time, num_patches, tokens (patches + 2 prefix tokens),
  forward_flops and train_flops (per example), and tokens_per_step and train_flops_per_step (per global batch).
  For ElasticAST an "example" is a packed row of `packing.row_tokens` tokens, counted whole: padding tokens and
  attention between clips of a row are computed by the dense kernels, so they are counted too.
  """
  from ast_jax.audio.features import FrontEnd
  from ast_jax.models.ast import model_kwargs, patch_grid
  from ast_jax.models.flexi import scaled_strides

  if config.model.get("name", "ast") == "aum":
    return _aum_config_flops(config)
  kwargs = model_kwargs(config.model)
  width, depth = kwargs["width"], kwargs["depth"]
  mlp_dim = kwargs.get("mlp_ratio", 4) * width
  patch_size = kwargs.get("patch_size", 16)
  if config.model.get("name", "ast") == "elastic":
    patch_time = config.model.get("patch_time") or patch_size
    freq, time = config.audio.num_mel_bins // patch_size, config.packing.max_frames // patch_time
    tokens = config.packing.row_tokens
    batch = config.packing.rows
    num_patches = tokens
    shape = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_tokens=tokens, patch_size=(patch_size, patch_time),
                 num_patches=num_patches, num_classes=config.num_classes * config.packing.max_clips)
  else:
    patch_time = kwargs.get("patch_time") or patch_size
    strides = kwargs.get("fstride", 10), kwargs.get("tstride", 10)
    if config.model.get("run_patch"):  # the stored kernel run at another shape (a 'patch' training phase)
      run_patch = tuple(config.model.run_patch)
      strides = scaled_strides((patch_size, patch_time), strides, run_patch)
      patch_size, patch_time = run_patch
    frames = FrontEnd.from_config(config.audio).frames  # pooled along time in a coarse phase
    freq, time = patch_grid(config.audio.num_mel_bins, frames, patch_size, *strides, patch_time)
    tokens, num_patches, batch = freq * time + 2, freq * time, config.data.batch_size
    shape = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_tokens=tokens, patch_size=(patch_size, patch_time),
                 num_patches=num_patches, num_classes=config.num_classes)
  train_flops = train_flops_per_example(**shape)
  if config.model.get("flexi_patch_sizes"):
    tokens, train_flops = _flexi_mean(config, shape, (patch_size, patch_time))
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, patch_size=patch_size, freq=freq, time=time,
              num_patches=num_patches, tokens=tokens, forward_flops=forward_flops(**shape), train_flops=train_flops,
              tokens_per_step=tokens * batch, train_flops_per_step=train_flops * batch)


def _aum_config_flops(config: Any) -> dict[str, float]:
  """`config_flops` for AuM: tokens = patches + CLS tokens; no MLP (mlp_dim 0)."""
  from ast_jax.audio.features import FrontEnd
  from ast_jax.models.ast import patch_grid
  from ast_jax.models.aum import aum_kwargs, cls_positions

  kwargs = aum_kwargs(config.model)
  patch_size = kwargs.get("patch_size", 16)
  patch_time = kwargs.get("patch_time") or patch_size
  frames = FrontEnd.from_config(config.audio).frames
  freq, time = patch_grid(config.audio.num_mel_bins, frames, patch_size, kwargs.get("fstride", 16),
                          kwargs.get("tstride", 16), patch_time)
  num_patches = freq * time
  tokens = num_patches + len(cls_positions(num_patches, kwargs.get("cls_position", "middle")))
  parts = aum_forward_flops_breakdown(
      width=kwargs["width"], depth=kwargs["depth"], num_tokens=tokens, patch_size=(patch_size, patch_time),
      num_patches=num_patches, num_classes=config.num_classes,
      **{key: kwargs[key] for key in ("bidirectional", "d_state", "d_conv", "expand", "dt_rank") if key in kwargs})
  forward = sum(parts.values())
  batch = config.data.batch_size
  return dict(width=kwargs["width"], depth=kwargs["depth"], mlp_dim=0, patch_size=patch_size, freq=freq, time=time,
              num_patches=num_patches, tokens=tokens, forward_flops=forward, train_flops=3 * forward,
              tokens_per_step=tokens * batch, train_flops_per_step=3 * forward * batch)


def _flexi_mean(config: Any, shape: dict[str, Any], stored: tuple[int, int]) -> tuple[float, float]:
  """FlexiAST training: the expected tokens and train FLOPs per example over the drawn patch shapes, a step at a
  shape other than the stored one adding the stored shape's forward and backward when flexi_base_weight > 0."""
  from ast_jax.models.flexi import flexi_patch_probs, flexi_patch_sizes, patch_grid_flexi

  def at(patch: tuple[int, int]) -> tuple[int, float]:
    freq, time = patch_grid_flexi(config.audio.num_mel_bins, config.audio.target_length, patch)
    tokens = freq * time + 2
    return tokens, train_flops_per_example(**{**shape, "num_tokens": tokens, "patch_size": patch,
                                              "num_patches": freq * time})

  base = at(stored) if config.model.get("flexi_base_weight", 0.0) else (0, 0.0)
  costs = [np.add(at(patch), base if patch != stored else (0, 0.0)) for patch in flexi_patch_sizes(config)]
  tokens, flops = np.average(costs, axis=0, weights=flexi_patch_probs(config))
  return float(tokens), float(flops)


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
