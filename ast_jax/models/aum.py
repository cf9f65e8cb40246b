"""Audio Mamba (AuM; Erol et al. 2024): a bidirectional selective-scan backbone, no attention (docs/BACKGROUND.md
section 5).

spectrogram [batch, frames, mel_bins] -> 16x16 patches (AST's tokeniser), frequency-major tokens -> a CLS token
inserted at its position (middle by default) + learned positional embedding (row 0 = the CLS token) -> `depth`
Mamba blocks ("add -> norm -> mixer", residual stream in float32) -> RMSNorm(residual + hidden) -> the CLS token
(or the mean) -> Linear.

The mixer runs the selective scan of `models/ssm.py` in both directions without flipping arrays: the backward
direction is the same scan with `reverse=True` (and, for a separate backward branch, an anti-causal conv), which
equals upstream's flip -> scan -> flip (tests/test_aum.py checks it). Variants (`bidirectional`):
- `fo_bi` (upstream bimamba "v1"): a second A (`A_b_log`) only; the backward scan reuses the conv output, delta, B, C,
  D and the gate; out_proj(y_f + y_b).
- `bi_bi` (Vision Mamba, "v2"): a separate backward branch (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`)
  on the reversed sequence; out_proj((y_f + y_b) / 2).
- `fo_fo` ("v1_2"): the same separate branch, also causal forward; out_proj((y_f + y_b) / 2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ast_jax import target
from ast_jax.audio.patches import patch_grid, patch_of, stored_patch, strides_of
from ast_jax.models import flops as flops_lib
from ast_jax.models.family import Family
from ast_jax.models.tokens import PatchEmbed, TokenLayout, whole_clip_rows
from ast_jax.models.ssm import SCAN_METHODS, selective_scan
from ast_jax.models.stack import stack_blocks
from ast_jax.models.vit import DTYPES, Dtype, constrain, trunc_normal, with_names

# Width per size; every size has 24 layers, d_inner = 2 * width, d_state = 16, conv kernel 4.
VARIANTS = {"tiny": 192, "small": 384, "base": 768}
DEPTH = 24
BIDIRECTIONAL = ("fo_bi", "bi_bi", "fo_fo")
CLS_POSITIONS = ("middle", "head", "tail", "head_tail", "none")
SCANS = ("auto",) + SCAN_METHODS


def resolve_scan(scan: str) -> str:
  """`auto`: `recompute` on CPU (one sequential loop per direction, no stored states: measured fastest there) and
  `chunked` on GPU/TPU, where a step-by-step loop would launch kernels per step."""
  if scan != "auto":
    return scan
  return "recompute" if target.platform() == "cpu" else "chunked"


def cls_positions(num_patches: int, cls_position: str) -> tuple[int, ...]:
  """Where the CLS token(s) sit in the sequence of `num_patches` patches (upstream: middle = N // 2)."""
  return {"head": (0,), "middle": (num_patches // 2,), "tail": (num_patches,), "head_tail": (0, num_patches + 1),
          "none": ()}[cls_position]


def sequence_order(prefixed: jax.Array, positions: tuple[int, ...]) -> jax.Array:
  """`[batch, n_prefix + N, ...]` with the CLS rows first (the stored positional-table layout) -> the sequence
  order, each prefix row moved to its position (upstream's `insert_from_prefix`)."""
  prefix, rest = prefixed[:, :len(positions)], prefixed[:, len(positions):]
  for index, position in enumerate(positions):
    rest = jnp.concatenate([rest[:, :position], prefix[:, index:index + 1], rest[:, position:]], axis=1)
  return rest


def prefix_order(sequence: jax.Array, positions: tuple[int, ...]) -> jax.Array:
  """The inverse of `sequence_order`: the CLS rows at `positions` moved to the front (`insert_to_prefix`)."""
  for index, position in enumerate(positions):
    sequence = jnp.concatenate([sequence[:, :index], sequence[:, position:position + 1], sequence[:, index:position],
                                sequence[:, position + 1:]], axis=1)
  return sequence


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Mamba's RMSNorm: no bias)."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", with_names(nn.initializers.ones_init(), "norm"), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (normed * weight).astype(self.dtype)


def _torch_linear_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, scale: float = 1.0):
  """PyTorch's nn.Linear / Conv default: U(+-1/sqrt(fan_in)) over a [..., fan_in-major] kernel, times `scale`."""
  fan_in = int(np.prod(shape[:-1]))
  bound = scale / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _symmetric_uniform(bound: float) -> Any:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, dt_min: float = 1e-3,
                  dt_max: float = 0.1, floor: float = 1e-4) -> jax.Array:
  """softplus^-1(dt), dt log-uniform in [dt_min, dt_max] floored at `floor`: softplus(bias) starts in that range."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """S4D-real: A_log[d, n] = log(n + 1), so A = -(1, 2, ..., d_state) in every channel."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class CausalConv1d(nn.Module):
  """Depthwise conv along the length, `kernel` `[width, channels]` and `bias`: causal (output l sees inputs
  l-width+1..l), or anti-causal with `reverse` (sees l..l+width-1, the causal conv of the reversed sequence)."""

  width: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, reverse: bool = False) -> jax.Array:
    channels = x.shape[-1]
    # PyTorch's default depthwise conv initialisation: kernel and bias U(+-1/sqrt(width)) (fan_in = width).
    kernel = self.param("kernel", with_names(_torch_linear_init, None, "mlp"), (self.width, channels))
    bias = self.param("bias", with_names(_symmetric_uniform(1 / math.sqrt(self.width)), "mlp"), (channels,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    length = x.shape[1]
    pad = ((0, 0), (0, self.width - 1), (0, 0)) if reverse else ((0, 0), (self.width - 1, 0), (0, 0))
    padded = jnp.pad(x, pad)
    taps = kernel[::-1] if reverse else kernel
    out = sum(padded[:, k:k + length] * taps[k] for k in range(self.width))
    return out + bias


class MambaMixer(nn.Module):
  """The bidirectional Mamba mixer: `[batch, length, width]` -> `[batch, length, width]` (module docstring)."""

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0  # 0: ceil(width / 16)
  bidirectional: str = "fo_bi"
  depth: int = DEPTH  # the out_proj initialisation is scaled by 1/sqrt(depth)
  scan: str = "auto"
  scan_chunk: int = 128
  dtype: Dtype = jnp.float32

  def _dense(self, features: int, in_name: str | None, out_name: str | None, name: str, scale: float = 1.0):
    return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name,
                    kernel_init=with_names(functools.partial(_torch_linear_init, scale=scale), in_name, out_name))

  def _branch(self, x: jax.Array, gate: jax.Array, A: jax.Array, D: jax.Array, dt_rank: int, suffix: str,
              reverse: bool, reuse: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One direction: conv -> SiLU -> x_proj -> (delta, B, C) -> selective scan -> gate. `reuse` takes the conv
    output, delta, B and C of another direction instead (fo_bi)."""
    if reuse is None:
      u = nn.silu(CausalConv1d(self.d_conv, self.dtype, name=f"conv1d{suffix}")(x, reverse=reverse))
      projected = self._dense(dt_rank + 2 * self.d_state, "mlp", None, f"x_proj{suffix}")(u)
      dt_low, B, C = jnp.split(projected, [dt_rank, dt_rank + self.d_state], axis=-1)
      dt = nn.Dense(x.shape[-1], dtype=self.dtype, name=f"dt_proj{suffix}",
                    kernel_init=with_names(_symmetric_uniform(dt_rank**-0.5), None, "mlp"),
                    bias_init=with_names(_dt_bias_init, "mlp"))(dt_low)
      delta = jax.nn.softplus(dt.astype(jnp.float32))
      reuse = (u, delta, B, C)
    u, delta, B, C = reuse
    y = selective_scan(u, delta, A, B, C, D, method=resolve_scan(self.scan), chunk_size=self.scan_chunk,
                       reverse=reverse)
    return y * nn.silu(gate.astype(jnp.float32)), reuse

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    if self.bidirectional not in BIDIRECTIONAL:
      raise ValueError(f"bidirectional={self.bidirectional!r} is not one of {BIDIRECTIONAL}")
    if self.scan not in SCANS:
      raise ValueError(f"scan={self.scan!r} is not one of {SCANS}")
    width = hidden.shape[-1]
    inner = self.expand * width
    xz = self._dense(2 * inner, "embed", "mlp", "in_proj")(hidden)
    x, gate = jnp.split(constrain(xz, "batch", "length", "act_mlp"), 2, axis=-1)
    a_log_init = with_names(_a_log_init, "mlp", None)
    A = -jnp.exp(self.param("A_log", a_log_init, (inner, self.d_state)))
    D = self.param("D", with_names(nn.initializers.ones_init(), "mlp"), (inner,))
    A_b = -jnp.exp(self.param("A_b_log", a_log_init, (inner, self.d_state)))
    dt_rank = self.dt_rank or math.ceil(width / 16)
    y_f, shared = self._branch(x, gate, A, D, dt_rank, "", reverse=False)
    if self.bidirectional == "fo_bi":
      y_b, _ = self._branch(x, gate, A_b, D, dt_rank, "", reverse=True, reuse=shared)
      mixed = y_f + y_b
    else:
      D_b = self.param("D_b", with_names(nn.initializers.ones_init(), "mlp"), (inner,))
      y_b, _ = self._branch(x, gate, A_b, D_b, dt_rank, "_b", reverse=self.bidirectional == "bi_bi")
      mixed = (y_f + y_b) / 2
    mixed = constrain(mixed.astype(self.dtype), "batch", "length", "act_mlp")
    return self._dense(width, "mlp", "embed", "out_proj", scale=1.0 / math.sqrt(self.depth))(mixed)


class AuMBlock(nn.Module):
  """(hidden, residual) -> (Mixer(RMSNorm(residual + hidden)), residual + hidden); the residual in float32."""

  mixer: dict[str, Any]
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, jax.Array], _: Any = None) -> tuple[tuple[jax.Array, jax.Array], None]:
    hidden, residual = carry
    residual = residual + hidden.astype(jnp.float32)
    normed = RMSNorm(self.norm_eps, self.dtype, name="norm")(residual)
    hidden = MambaMixer(**self.mixer, dtype=self.dtype, name="mixer")(normed)
    return (constrain(hidden, "batch", "length", "act_embed"), residual), None


class AuMEncoder(nn.Module):
  """`depth` blocks (`blocks_{i}`, or one scanned `blocks` with stacked parameters) then `norm_f`."""

  depth: int
  mixer: dict[str, Any]
  norm_eps: float = 1e-5
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens `[batch, length, width]` -> `[batch, length, width]` (float32)."""
    # The first block's residual is its input: residual 0 + hidden x = x exactly, so every block is the same.
    carry = (tokens, jnp.zeros(tokens.shape, jnp.float32))
    fields = dict(mixer=self.mixer, norm_eps=self.norm_eps, dtype=self.dtype)
    hidden, residual = stack_blocks(AuMBlock, fields, carry, depth=self.depth, scan_layers=self.scan_layers,
                                    remat=self.remat)
    return RMSNorm(self.norm_eps, jnp.float32, name="norm_f")(residual + hidden.astype(jnp.float32))


class AuM(nn.Module):
  """Audio Mamba. `__call__` returns (logits `[batch, classes]`, intermediates)."""

  num_classes: int
  width: int = 768
  depth: int = DEPTH
  patch_size: int = 16
  fstride: int = 16
  tstride: int = 16
  patch_time: int = 0
  bidirectional: str = "fo_bi"
  cls_position: str = "middle"
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int = 0
  norm_eps: float = 1e-5
  scan: str = "auto"
  scan_chunk: int = 128
  dropout: float = 0.0
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array, layout: TokenLayout | None = None, *, train: bool = False,
               patch: tuple[int, int] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """spectrogram: whole-clip rows `[rows, frames, mel_bins]` (no packed layout). AuM runs at its own patch shape
    (`patch` must be None or that shape)."""
    if self.cls_position not in CLS_POSITIONS:
      raise ValueError(f"cls_position={self.cls_position!r} is not one of {CLS_POSITIONS}")
    own = stored_patch(self.patch_size, self.patch_time)
    if patch is not None and tuple(patch) != own:
      raise ValueError(f"AuM runs at its own {own} patches, not {tuple(patch)}")
    batch, frames, mel_bins = whole_clip_rows(spectrogram, layout, "AuM").shape
    strides = (self.fstride, self.tstride)
    grid = patch_grid(mel_bins, frames, own, strides)
    tokens = PatchEmbed(self.width, own, strides, self.dtype, name="patch_embed")(spectrogram.astype(self.dtype))
    positions = cls_positions(tokens.shape[1], self.cls_position)
    names = ("cls_token_head", "cls_token_tail") if self.cls_position == "head_tail" else ("cls_token",)
    prefix = [self.param(name, with_names(trunc_normal, None, None, "embed"), (1, 1, self.width))
              for name in names[:len(positions)]]
    pos_embed = self.param("pos_embed", with_names(trunc_normal, None, None, "embed"),
                           (1, len(positions) + grid[0] * grid[1], self.width))
    if positions:
      prefixed = jnp.concatenate([jnp.broadcast_to(p.astype(self.dtype), (batch, 1, self.width)) for p in prefix]
                                 + [tokens], axis=1)
      tokens = sequence_order(prefixed, positions)
    tokens = tokens + sequence_order(pos_embed, positions).astype(self.dtype)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    mixer = dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
                 bidirectional=self.bidirectional, depth=self.depth, scan=self.scan, scan_chunk=self.scan_chunk)
    hidden = AuMEncoder(self.depth, mixer, self.norm_eps, self.remat, self.scan_layers, self.dtype,
                        name="encoder")(tokens)
    pooled = (jnp.mean(hidden[:, list(positions)], axis=1) if positions else jnp.mean(hidden, axis=1))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=with_names(trunc_normal, "embed", "classes"),
                      bias_init=with_names(nn.initializers.zeros_init(), "classes"))(pooled)
    return logits.astype(jnp.float32), {"embedding": pooled.astype(jnp.float32), "tokens": hidden}


def aum_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """Resolves `config.model` (name 'aum': a size in `variant`, or an explicit width/depth) into `AuM`'s kwargs."""
  variant = model_config.get("variant", "base")
  if variant and variant not in VARIANTS:
    raise ValueError(f"unknown AuM variant {variant!r}; choose one of {sorted(VARIANTS)} or set width/depth")
  width = model_config.get("width") or (VARIANTS[variant] if variant else 0)
  depth = model_config.get("depth") or DEPTH
  if not width:
    raise ValueError("config.model needs an AuM variant or a width")
  dtype = DTYPES.get(model_config.get("dtype", "float32"))
  if dtype is None:
    raise ValueError(f"config.model.dtype must be one of {tuple(DTYPES)}, not {model_config.get('dtype')!r}")
  fields = {f.name for f in dataclasses.fields(AuM)} - {"num_classes", "width", "depth", "dtype", "parent", "name"}
  extra = {key: model_config[key] for key in fields if key in model_config}
  return dict(width=width, depth=depth, dtype=dtype, **extra)


def flops(config: Any) -> dict[str, float]:
  """AuM's analytic FLOPs (models/flops.py): tokens = patches + CLS tokens; no MLP."""
  from ast_jax.audio.features import FrontEnd

  kwargs = aum_kwargs(config.model)
  patch, strides = patch_of(config.model), strides_of(config.model)
  frames = FrontEnd.from_config(config.audio).frames
  freq, time = patch_grid(config.audio.num_mel_bins, frames, patch, strides)
  num_patches = freq * time
  tokens = num_patches + len(cls_positions(num_patches, kwargs.get("cls_position", "middle")))
  shape = dict(width=kwargs["width"], depth=kwargs["depth"], num_tokens=tokens, patch_size=patch,
               num_patches=num_patches, num_classes=config.num_classes)
  parts = flops_lib.aum_forward_flops_breakdown(
      **shape, **{key: kwargs[key] for key in ("bidirectional", "d_state", "d_conv", "expand", "dt_rank")
                  if key in kwargs})
  return flops_lib.summary(shape, freq=freq, time=time, batch=config.data.batch_size, forward=sum(parts.values()))


def config_problems(config: Any) -> list[str]:
  """Audio Mamba's switches, its size, and a patch grid that fits the input."""
  model, problems = config.model, []
  for field, choices in (("bidirectional", BIDIRECTIONAL), ("cls_position", CLS_POSITIONS), ("scan", SCANS)):
    if model.get(field) not in choices:
      problems.append(f"model.{field}={model.get(field)!r} is not one of {choices}: build the config with "
                      "configs.common.aum(config)")
  if model.variant and model.variant not in VARIANTS:
    problems.append(f"model.variant={model.variant!r} is not an AuM size {tuple(VARIANTS)} (or '' with model.width)")
  elif not (model.variant or model.width > 0):
    problems.append("model.width must be positive when model.variant is ''")
  for field in ("d_state", "d_conv", "expand", "scan_chunk"):
    if not (isinstance(model.get(field), int) and model.get(field) > 0):
      problems.append(f"model.{field}={model.get(field)!r} must be a positive int")
  if not problems:
    try:
      flops(config)  # the patch grid
    except ValueError as error:
      problems.append(f"model input: {error}")
  return problems


FAMILY = Family(
    name="aum",
    model=AuM,
    kwargs=lambda config: aum_kwargs(config.model),
    flops=flops,
    problems=config_problems,
    weight_formats=("ast_jax", "aum"),
)
