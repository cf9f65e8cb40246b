"""Audio Mamba (AuM; Erol et al. 2024): a bidirectional selective-scan backbone, no attention (docs/BACKGROUND.md
section 5).

spectrogram [batch, frames, mel_bins] -> 16x16 patches (AST's tokeniser), frequency-major tokens -> a CLS token
inserted at its position (middle by default) + learned positional embedding (row 0 = the CLS token) -> `depth`
Mamba blocks ("add -> norm -> mixer", residual stream in float32) -> RMSNorm(residual + hidden) -> the CLS token
(or the mean) -> Linear.

The Mamba layers (mixer variants `bidirectional` = fo_bi | bi_bi | fo_fo) are in `models/mamba.py`.

Packed rows (`max_time_patches` > 0, a config with a packing section): ElasticAST's rows of whole clips of any
length, non-overlapping patches gathered per clip; each token gets the positional-table row of its (frequency, time)
inside its clip, each clip its own CLS token(s) where a whole clip has them, and the Mamba layers keep clips apart
(`models/packed_sequence.py`): logits `[rows, clips, classes]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.audio.patches import patch_grid, patch_of, stored_patch, strides_of
from ast_jax.models import flops as flops_lib
from ast_jax.models.family import PACKED_ROWS, Family, whole_clip_example
from ast_jax.models.heads import masked_mean
from ast_jax.models.mamba import BIDIRECTIONAL, DEPTH, SCANS, AuMEncoder
from ast_jax.models.packed_sequence import insert_clip_tokens
from ast_jax.models.tokens import PatchEmbed, TokenLayout, one_patch_row, packed_patches, whole_clip_rows
from ast_jax.models.vit import DTYPES, Dtype, trunc_normal, with_names

# Width per size; every size has 24 layers, d_inner = 2 * width, d_state = 16, conv kernel 4.
VARIANTS = {"tiny": 192, "small": 384, "base": 768}
CLS_POSITIONS = ("middle", "head", "tail", "head_tail", "none")


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


def without_clip_tokens(hidden: jax.Array, cls_index: jax.Array, length: int) -> jax.Array:
  """The packed sequence `[rows, length + clips * prefix, width]` without the CLS tokens at `cls_index`
  `[rows, clips, prefix]`: the patches' outputs `[rows, length, width]` in the packed layout's order (inserting
  the CLS tokens kept the patches' order)."""
  rows = hidden.shape[0]
  is_cls = jnp.zeros(hidden.shape[:2], bool).at[jnp.arange(rows)[:, None], cls_index.reshape(rows, -1)].set(True)
  order = jnp.argsort(is_cls, axis=1, stable=True)[:, :length]
  return jnp.take_along_axis(hidden, order[..., None], axis=1)


class AuM(nn.Module):
  """Audio Mamba. `__call__` returns (logits `[batch, classes]`, intermediates: "embedding" (pooled), "tokens"
  (the whole sequence, CLS tokens included) and "patch_tokens" (the patches' outputs only, in patch order; packed
  rows: in the layout's order))."""

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
  max_time_patches: int = 0  # > 0: packed rows of clips of any length (a table of this many time patches)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array, layout: TokenLayout | None = None, *, train: bool = False,
               patch: tuple[int, int] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """spectrogram: whole-clip rows `[rows, frames, mel_bins]`, or (a model with `max_time_patches`) packed slots
    `[rows, clips, frames, mel_bins]` with their `layout`. AuM runs at its own patch shape (`patch` must be None or
    that shape). Logits `[rows, classes]`, or `[rows, clips, classes]` for packed rows."""
    if self.cls_position not in CLS_POSITIONS:
      raise ValueError(f"cls_position={self.cls_position!r} is not one of {CLS_POSITIONS}")
    own = stored_patch(self.patch_size, self.patch_time)
    if patch is not None and tuple(patch) != own:
      raise ValueError(f"AuM runs at its own {own} patches, not {tuple(patch)}")
    if self.max_time_patches:
      tokens, segment_ids, cls_index, whole = self._packed_tokens(spectrogram, layout, own)
    else:
      tokens, positions = self._whole_clip_tokens(whole_clip_rows(spectrogram, layout, "AuM"), own)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    mixer = dict(d_state=self.d_state, d_conv=self.d_conv, expand=self.expand, dt_rank=self.dt_rank,
                 bidirectional=self.bidirectional, depth=self.depth, scan=self.scan, scan_chunk=self.scan_chunk)
    encoder = AuMEncoder(self.depth, mixer, self.norm_eps, self.remat, self.scan_layers, self.dtype, name="encoder")
    if self.max_time_patches:
      hidden = encoder(tokens, segment_ids)
      rows, clips, prefix = cls_index.shape
      if prefix:  # each clip's CLS token(s)
        pooled = jnp.take_along_axis(hidden, cls_index.reshape(rows, -1, 1), axis=1)
        pooled = pooled.reshape(rows, clips, prefix, -1).mean(axis=2)
      else:
        pooled = masked_mean(hidden, segment_ids, clips)
      pooled = pooled[:, 0] if whole else pooled
      patch_tokens = without_clip_tokens(hidden, cls_index, segment_ids.shape[1] - clips * prefix)
    else:
      hidden = encoder(tokens)
      pooled = (jnp.mean(hidden[:, list(positions)], axis=1) if positions else jnp.mean(hidden, axis=1))
      patch_tokens = hidden[:, [i for i in range(hidden.shape[1]) if i not in positions]]
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=with_names(trunc_normal, "embed", "classes"),
                      bias_init=with_names(nn.initializers.zeros_init(), "classes"))(pooled)
    return logits.astype(jnp.float32), {"embedding": pooled.astype(jnp.float32), "tokens": hidden,
                                        "patch_tokens": patch_tokens}

  def _cls_tokens(self, count: int) -> list[jax.Array]:
    names = ("cls_token_head", "cls_token_tail") if self.cls_position == "head_tail" else ("cls_token",)
    return [self.param(name, with_names(trunc_normal, None, None, "embed"), (1, 1, self.width))
            for name in names[:count]]

  def _whole_clip_tokens(self, spectrogram: jax.Array, own: tuple[int, int]) -> tuple[jax.Array, tuple[int, ...]]:
    """Conv patches of whole clips, the CLS token(s) at their positions, + the positional table of this grid."""
    batch, frames, mel_bins = spectrogram.shape
    strides = (self.fstride, self.tstride)
    grid = patch_grid(mel_bins, frames, own, strides)
    tokens = PatchEmbed(self.width, own, strides, self.dtype, name="patch_embed")(spectrogram.astype(self.dtype))
    positions = cls_positions(tokens.shape[1], self.cls_position)
    prefix = self._cls_tokens(len(positions))
    pos_embed = self.param("pos_embed", with_names(trunc_normal, None, None, "embed"),
                           (1, len(positions) + grid[0] * grid[1], self.width))
    if positions:
      prefixed = jnp.concatenate([jnp.broadcast_to(p.astype(self.dtype), (batch, 1, self.width)) for p in prefix]
                                 + [tokens], axis=1)
      tokens = sequence_order(prefixed, positions)
    return tokens + sequence_order(pos_embed, positions).astype(self.dtype), positions

  def _packed_tokens(self, spectrogram: jax.Array, layout: TokenLayout | None, own: tuple[int, int]
                     ) -> tuple[jax.Array, jax.Array, jax.Array, bool]:
    """Packed rows (`models/packed_sequence.py`): each clip's patches, + the row of the positional table at its
    (frequency, time) in the clip, with the CLS token(s) inserted inside every clip where a whole clip has them.
    Returns (tokens, their segment ids, the CLS tokens' indices `[rows, clips, prefix]`, whether the input was
    whole-clip rows). The table is the whole-clip model's at `max_time_patches` time patches, so a clip filling
    it gives the whole-clip model's sequence."""
    if (self.fstride, self.tstride) != own:
      raise ValueError(f"packed AuM needs non-overlapping patches: strides {(self.fstride, self.tstride)} != {own}")
    whole = layout is None
    mel_bins = spectrogram.shape[-1]
    patches, layout = packed_patches(spectrogram, layout, own)
    freq = mel_bins // own[0]
    if whole and spectrogram.shape[1] // own[1] > self.max_time_patches:
      raise ValueError(f"{spectrogram.shape[1]} frames are {spectrogram.shape[1] // own[1]} time patches; this AuM's "
                       f"positional table has {self.max_time_patches}")
    tokens = PatchEmbed(self.width, own, own, self.dtype, name="patch_embed")(patches.astype(self.dtype),
                                                                              patchified=True)
    prefix = len(cls_positions(1, self.cls_position))
    table = self.param("pos_embed", with_names(trunc_normal, None, None, "embed"),
                       (1, prefix + freq * self.max_time_patches, self.width))[0].astype(self.dtype)
    tokens = tokens + table[prefix + layout.freq_positions * self.max_time_patches + layout.time_positions]
    rows, clips = layout.segment_ids.shape[0], layout.clips
    cls = [p[0, 0].astype(self.dtype) + table[index] for index, p in enumerate(self._cls_tokens(prefix))]
    clip_tokens = jnp.broadcast_to(jnp.stack(cls) if cls else jnp.zeros((0, self.width), self.dtype),
                                   (rows, clips, prefix, self.width))

    def positions_of(counts: jax.Array) -> tuple[jax.Array, ...]:
      return tuple(jnp.broadcast_to(position, counts.shape) for position in cls_positions(counts, self.cls_position))

    tokens, segment_ids, cls_index = insert_clip_tokens(tokens, layout.segment_ids, clip_tokens, positions_of)
    return tokens, segment_ids, cls_index, whole


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


def family_kwargs(config: Any) -> dict[str, Any]:
  """`aum_kwargs` of `config.model`; with a packing section, the time table of packed rows
  (`model.max_time_patches`, 0: `packing.max_frames` in patches)."""
  kwargs = aum_kwargs(config.model)
  if "packing" in config:
    kwargs["max_time_patches"] = (config.model.get("max_time_patches")
                                  or config.packing.max_frames // patch_of(config.model)[1])
  else:
    kwargs.pop("max_time_patches", None)
  return kwargs


def example_inputs(config: Any) -> tuple[Any, ...]:
  """A whole-clip row of the front end's frames, or for packed rows one row holding one patch of a clip slot
  (`[1, 1, patch_time, mel_bins]`: the mel bins fix the positional table's frequency extent)."""
  if "packing" not in config:
    return whole_clip_example(config)
  return one_patch_row(patch_of(config.model)[1], config.audio.num_mel_bins)


def flops(config: Any) -> dict[str, float]:
  """AuM's analytic FLOPs (models/flops.py): tokens = patches + CLS tokens; no MLP. Packed rows count a whole
  row (`packing.row_tokens` + a CLS token per clip slot) as the example, padding included."""
  from ast_jax.audio.features import FrontEnd

  kwargs = family_kwargs(config)
  patch, strides = patch_of(config.model), strides_of(config.model)
  prefix = len(cls_positions(1, kwargs.get("cls_position", "middle")))
  if "packing" in config:
    freq, time = config.audio.num_mel_bins // patch[0], config.packing.max_frames // patch[1]
    num_patches, batch = config.packing.row_tokens, config.packing.rows
    tokens, classes = num_patches + prefix * config.packing.max_clips, config.num_classes * config.packing.max_clips
  else:
    frames = FrontEnd.from_config(config.audio).frames
    freq, time = patch_grid(config.audio.num_mel_bins, frames, patch, strides)
    num_patches, batch, classes = freq * time, config.data.batch_size, config.num_classes
    tokens = num_patches + prefix
  shape = dict(width=kwargs["width"], depth=kwargs["depth"], num_tokens=tokens, patch_size=patch,
               num_patches=num_patches, num_classes=classes)
  parts = flops_lib.aum_forward_flops_breakdown(
      **shape, **{key: kwargs[key] for key in ("bidirectional", "d_state", "d_conv", "expand", "dt_rank")
                  if key in kwargs})
  return flops_lib.summary(shape, freq=freq, time=time, batch=batch, forward=sum(parts.values()))


def packing_problems(config: Any) -> list[str]:
  """What packed rows need of an AuM config (the packing section itself: train/config_checks.py):
  non-overlapping patches, a table as long as the longest clip."""
  model, packing = config.model, config.packing
  patch = patch_of(model)
  problems = []
  if strides_of(model) != patch:
    problems.append(f"model.fstride/tstride={model.fstride}/{model.tstride}: AuM on packed rows takes "
                    f"non-overlapping patches; set them to the patch's size {patch[0]}/{patch[1]}")
  table = model.get("max_time_patches") or packing.max_frames // patch[1]
  longest = max([packing.max_frames, *config.eval_sweep.lengths]) // patch[1]
  if longest > table:
    problems.append(f"model.max_time_patches={table} rows cannot index {longest} time patches (packing.max_frames or "
                    "an eval_sweep length): raise max_time_patches")
  return problems


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
  if not problems and "packing" in config:
    problems += packing_problems(config)
  if not problems:
    try:
      flops(config)  # the patch grid
    except ValueError as error:
      problems.append(f"model input: {error}")
  return problems


FAMILY = Family(
    name="aum",
    model=AuM,
    kwargs=family_kwargs,
    flops=flops,
    problems=config_problems,
    example_inputs=example_inputs,
    weight_formats=("ast_jax", "aum"),
    options=frozenset({PACKED_ROWS}),
)
