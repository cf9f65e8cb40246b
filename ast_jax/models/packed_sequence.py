"""Packed rows for a sequence model (AuM): per-clip summary tokens, state resets and clip-bounded convolutions.

A packed row `[rows, row_tokens]` holds several clips back to back in slot order (segment k + 1 = slot k), then
padding (segment 0); `data/packer.py` lays them out so. Attention keeps clips apart with a mask; a recurrent model
instead needs
- its CLS token(s) inside every clip, where the model puts them in a whole clip (`cls_positions` of that clip's
  token count: the middle by default), so each clip is the same sequence it would be on its own row
  (`insert_clip_tokens`);
- its state zeroed where a clip begins, in the scan's direction (`scan_resets`);
- its short convolution blind to the neighbouring clip (`same_segment`).
With these, a clip in a packed row gives the outputs it gives alone (tests/test_aum_packed.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def clip_extents(segment_ids: jax.Array, clips: int) -> tuple[jax.Array, jax.Array]:
  """(start, count) `[rows, clips]` of each slot's tokens (slots in order from the row's start; count 0 = empty)."""
  slots = jnp.arange(1, clips + 1, dtype=segment_ids.dtype)
  counts = jnp.sum(segment_ids[:, None, :] == slots[None, :, None], axis=-1).astype(jnp.int32)
  starts = jnp.cumsum(counts, axis=1) - counts
  return starts, counts


def insert_clip_tokens(tokens: jax.Array, segment_ids: jax.Array, clip_tokens: jax.Array,
                       positions_of: Callable[[jax.Array], tuple[jax.Array, ...]]
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inserts `clip_tokens` `[rows, clips, prefix, width]` (each slot's CLS tokens) into the packed `tokens`
  `[rows, row_tokens, width]`, at `positions_of(count)` inside each clip (ascending, in the final sequence, as
  `models/aum.py:cls_positions` gives them for a clip of `count` patches).

  Returns (sequence `[rows, row_tokens + clips * prefix, width]`, its segment ids, and `[rows, clips, prefix]` the
  index of each inserted token). Empty slots' tokens go to the end of the row with segment 0 (padding).
  """
  rows, length = segment_ids.shape
  clips, prefix = clip_tokens.shape[1:3]
  if not prefix:
    return tokens, segment_ids, jnp.zeros((rows, clips, 0), jnp.int32)
  starts, counts = clip_extents(segment_ids, clips)
  within = jnp.stack(positions_of(counts), axis=-1)
  slot = jnp.arange(clips, dtype=jnp.int32)
  # A clip's sequence starts after the earlier clips' tokens and their inserted tokens; empty slots come last.
  present = counts > 0
  cls_index = jnp.where(present[..., None], (starts + prefix * slot)[..., None] + within,
                        length + prefix * slot[None, :, None] + jnp.arange(prefix, dtype=jnp.int32))
  token = jnp.arange(length, dtype=jnp.int32)
  token_slot = jnp.clip(segment_ids - 1, 0, clips - 1)
  within_clip = token[None] - jnp.take_along_axis(starts, token_slot, axis=1)
  # Patch j of a clip moves past every inserted token c with position p_c <= j + c (positions in the final order).
  shifted = within - jnp.arange(prefix, dtype=jnp.int32)
  before = jnp.sum(jnp.take_along_axis(shifted, token_slot[..., None], axis=1) <= within_clip[..., None], axis=-1)
  clips_before = jnp.where(segment_ids > 0, token_slot, jnp.sum(present, axis=1, keepdims=True))
  token_index = token[None] + prefix * clips_before + jnp.where(segment_ids > 0, before, 0)

  total = length + clips * prefix
  destination = jnp.concatenate([token_index, cls_index.reshape(rows, -1)], axis=1)
  source = jax.vmap(lambda d: jnp.zeros(total, jnp.int32).at[d].set(jnp.arange(total, dtype=jnp.int32)))(destination)
  width = tokens.shape[-1]
  merged = jnp.concatenate([tokens, clip_tokens.reshape(rows, clips * prefix, width).astype(tokens.dtype)], axis=1)
  cls_segments = jnp.where(present, slot + 1, 0)[..., None].repeat(prefix, axis=-1).reshape(rows, -1)
  merged_segments = jnp.concatenate([segment_ids, cls_segments.astype(segment_ids.dtype)], axis=1)
  sequence = jnp.take_along_axis(merged, source[..., None], axis=1)
  return sequence, jnp.take_along_axis(merged_segments, source, axis=1), cls_index


def scan_resets(segment_ids: jax.Array, reverse: bool) -> jax.Array:
  """`[rows, length]` bool: where a scan in that direction enters a new segment (its first step in that order)."""
  if reverse:
    following = jnp.concatenate([segment_ids[:, 1:], jnp.full_like(segment_ids[:, :1], -1)], axis=1)
    return segment_ids != following
  preceding = jnp.concatenate([jnp.full_like(segment_ids[:, :1], -1), segment_ids[:, :-1]], axis=1)
  return segment_ids != preceding


def same_segment(segment_ids: jax.Array, offset: int) -> jax.Array:
  """`[rows, length]` bool: token l and token l + offset exist and share a segment (a conv tap may read it)."""
  length = segment_ids.shape[1]
  shifted = jnp.roll(segment_ids, -offset, axis=1)
  index = jnp.arange(length) + offset
  return (shifted == segment_ids) & (index >= 0)[None] & (index < length)[None]
