"""ElasticAST (REFERENCE.md 2): the ViT encoder on packed rows of clips of any length.

packed patches `[rows, row_tokens, patch * patch]` (ast_jax/data/packing.py lays them out) -> linear patch
embedding -> + factorised positions (a frequency table and a time table, indexed by each patch's integer position
inside its own clip) -> the shared ViT encoder with attention masked to each token's own clip -> one pooled
vector per clip (a learned query attending to its clip, or the masked mean) -> LayerNorm + Linear.

The encoder, attention implementations and head are the AST's (`models/vit.py`, `models/ast.py`); only the
tokeniser, positions, mask and pooling differ.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.models.ast import ClassifierHead, model_kwargs
from ast_jax.models.vit import Dtype, Encoder, dense, trunc_normal, with_names

POOLING = ("attention", "mean")
POSITIONS = ("integer", "fractional")


def slot_mask(segment_ids: jax.Array, max_clips: int) -> jax.Array:
  """`[rows, max_clips, tokens]`: True where a token belongs to clip slot k (1-based slots, row k-1)."""
  slots = jnp.arange(1, max_clips + 1, dtype=segment_ids.dtype)
  return segment_ids[:, None, :] == slots[None, :, None]


def patchify(spectrogram: jax.Array, patch: int | tuple[int, int]) -> jax.Array:
  """Non-overlapping patches (`patch` square, or (frequency, time) sizes), frequency-major: `[..., frames,
  mel_bins]` -> `[..., freq * time, patch_freq * patch_time]` (frames and mel bins beyond whole patches are
  dropped; each vector is a patch's [freq, time] values)."""
  patch_freq, patch_time = (patch, patch) if isinstance(patch, int) else patch
  *lead, frames, mel_bins = spectrogram.shape
  freq, time = mel_bins // patch_freq, frames // patch_time
  x = spectrogram[..., :time * patch_time, :freq * patch_freq].reshape(*lead, time, patch_time, freq, patch_freq)
  x = jnp.moveaxis(x, (-4, -3, -2, -1), (-3, -1, -4, -2))  # [..., freq, time, patch (mel), patch (frames)]
  return x.reshape(*lead, freq * time, patch_freq * patch_time)


def gather_packed(slot_patches: jax.Array, segment_ids: jax.Array, freq_positions: jax.Array,
                  time_positions: jax.Array) -> jax.Array:
  """Packed rows `[rows, row_tokens, dim]` from each row's clip slots, patchified on a common grid
  `[rows, max_clips, freq, time, dim]` (a clip's frames padded to the slot's), by the packer's segment ids and
  in-clip positions (zeros on padding). Runs on the device, inside the step."""
  rows, max_clips, freq, time, dim = slot_patches.shape
  flat = slot_patches.reshape(rows, max_clips * freq * time, dim)
  index = (jnp.maximum(segment_ids - 1, 0) * freq + freq_positions) * time + time_positions
  gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
  return jnp.where((segment_ids > 0)[..., None], gathered, 0)


class ClipAttentionPool(nn.Module):
  """One learned query per clip attends (multi-head) to that clip's tokens only."""

  num_heads: int
  max_clips: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    rows, _, width = tokens.shape
    query = self.param("query", with_names(trunc_normal, None, None, "embed"), (1, 1, width))
    queries = jnp.broadcast_to(query.astype(self.dtype), (rows, self.max_clips, width))
    mask = slot_mask(segment_ids, self.max_clips)[:, None]  # [rows, 1, clips, tokens]
    return nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, name="attention")(
        queries, tokens, mask=mask)


def fractional_rows(table: jax.Array, positions: jax.Array, extents: jax.Array) -> jax.Array:
  """Rows of `table` `[size, width]` for position p of a clip `extents` patches long, mapped onto the whole table
  (centres aligned: coordinate (p + 0.5) * size / extent - 0.5) and linearly interpolated between rows."""
  size = table.shape[0]
  coordinate = (positions.astype(jnp.float32) + 0.5) * size / jnp.maximum(extents, 1).astype(jnp.float32) - 0.5
  coordinate = jnp.clip(coordinate, 0.0, size - 1.0)
  low = jnp.floor(coordinate).astype(jnp.int32)
  high = jnp.minimum(low + 1, size - 1)
  weight = (coordinate - low)[..., None]
  return table[low] * (1.0 - weight) + table[high] * weight


def masked_mean(tokens: jax.Array, segment_ids: jax.Array, max_clips: int) -> jax.Array:
  """`[rows, max_clips, width]`: each clip's mean token (zeros for an empty slot)."""
  weights = slot_mask(segment_ids, max_clips).astype(jnp.float32)
  total = jnp.einsum("rkt,rtd->rkd", weights, tokens.astype(jnp.float32))
  return total / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)


class ElasticAST(nn.Module):
  """`__call__(patches, segment_ids, freq_positions, time_positions[, time_patches])` -> (logits `[rows,
  max_clips, classes]`, {"embedding": `[rows, max_clips, width]`, "tokens": `[rows, row_tokens, width]`}). Slots
  without a clip give meaningless outputs; the caller masks them with the batch's `clip_mask`."""

  num_classes: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  patch_size: int = 16
  max_freq_patches: int = 8  # 128 mel bins
  max_time_patches: int = 64  # 1024 frames
  max_clips: int = 16
  pooling: str = "attention"
  positions: str = "integer"  # integer: table row = in-clip position; fractional: any length spans the table
  scale_logits: bool = True  # False: upstream ElasticAST's unscaled attention logits (its released weights)
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  head_layer_norm_eps: float = 1e-5
  attention: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array, segment_ids: jax.Array, freq_positions: jax.Array,
               time_positions: jax.Array, time_patches: jax.Array | None = None, *,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`time_patches` `[rows, max_clips]`: each clip's time patches (needed by fractional positions only)."""
    if self.pooling not in POOLING:
      raise ValueError(f"pooling {self.pooling!r} is not one of {POOLING}")
    if self.positions not in POSITIONS:
      raise ValueError(f"positions {self.positions!r} is not one of {POSITIONS}")
    tokens = dense(self.width, None, "embed", self.dtype, "patch_embed")(patches.astype(self.dtype))
    freq_table = self.param("pos_embed_freq", with_names(trunc_normal, None, "embed"),
                            (self.max_freq_patches, self.width))
    time_table = self.param("pos_embed_time", with_names(trunc_normal, None, "embed"),
                            (self.max_time_patches, self.width))
    if self.positions == "fractional":
      if time_patches is None:
        raise ValueError("fractional positions need each clip's time_patches")
      extents = jnp.take_along_axis(time_patches, jnp.maximum(segment_ids - 1, 0), axis=1)
      time_rows = fractional_rows(time_table, time_positions, extents)
    else:
      time_rows = time_table[time_positions]
    tokens = tokens + (freq_table[freq_positions] + time_rows).astype(self.dtype)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    encoder = Encoder(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout, self.attention_dropout,
                      self.layer_norm_eps, self.scale_logits, attention=self.attention, remat=self.remat,
                      scan_layers=self.scan_layers, dtype=self.dtype, name="encoder")
    # Each token attends to its own clip only: the blockwise kernel masks block by block from the segment ids.
    tokens = encoder(tokens, segment_ids=segment_ids, train=train)
    if self.pooling == "attention":
      pooled = ClipAttentionPool(self.num_heads, self.max_clips, self.dtype, name="pool")(tokens, segment_ids)
    else:
      pooled = masked_mean(tokens, segment_ids, self.max_clips)
    logits = ClassifierHead(self.num_classes, self.head_layer_norm_eps, self.dtype, name="head")(pooled)
    return logits, {"embedding": pooled.astype(jnp.float32), "tokens": tokens}


def elastic_kwargs(config: Any) -> dict[str, Any]:
  """ElasticAST constructor kwargs from a config: the backbone from `config.model` (as AST), the tables' sizes
  and the clip slots from `config.audio` and `config.packing`."""
  kwargs = model_kwargs(config.model, ElasticAST)
  patch_freq, patch_time = config.model.patch_size, config.model.get("patch_time") or config.model.patch_size
  kwargs.update(max_freq_patches=config.audio.num_mel_bins // patch_freq,
                max_time_patches=config.model.get("max_time_patches") or config.packing.max_frames // patch_time,
                max_clips=config.packing.max_clips)
  return kwargs
