"""cuDNN flash attention over packed rows (NVIDIA GPUs, bf16/fp16), for `attention=cudnn` with segment ids.

A dense `[batch, 1, length, length]` mask turns cuDNN's kernel into a masked one that reads the mask; cuDNN's
packed ("ragged") layout instead takes each row's clips as segments: per row, the segments' lengths
`[batch, max_segments]` and start offsets `[batch, max_segments + 1]` (-1 in unused slots), computed here from the
segment ids. That is JAX's private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(...,
q_seqlen, kv_seqlen, q_offsets, kv_offsets)` (cuDNN >= 9.6, Hopper or later). Rows of one clip (`max_segments=1`)
use the public `jax.nn.dot_product_attention(..., query_seq_lengths=..., key_value_seq_lengths=...)`.

The contract of the ids is the packer's: each clip's tokens are contiguous, clips are numbered 1, 2, ... in the
row, 0 is padding, and one-clip rows start at token 0. `max_segments` bounds the ids; tokens of a clip beyond it
are dropped (zero output), so the default is the row length, the most clips a row can hold: pass the packer's
`max_clips` to keep cuDNN's segment grid small. Padding positions' outputs are zeros (`xla` and `blockwise` give
them the mean of all values); no real token sees them.

When the packed call cannot be built (a JAX without it, a cuDNN or GPU that lacks it, a dtype or head size it does
not take) the caller's dense-mask path runs instead, and the reason is logged once. Errors that only the compiler
raises (after tracing) are not caught.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def segment_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
  """Per row, its segments' lengths `[batch, max_segments]` and start offsets `[batch, max_segments + 1]`, in id
  order, from segment ids `[batch, length]` (contiguous clips 1 ... max_segments, 0 = padding); -1 fills the slots
  past the row's last segment (and the offsets' extra one), as cuDNN's packed layout takes them."""
  batch, length = segment_ids.shape
  rows = jnp.arange(batch)[:, None]
  # padding, and ids past the bound, go to a spare slot that is then cut off
  slots = jnp.where((segment_ids > 0) & (segment_ids <= max_segments), segment_ids - 1, max_segments)
  counts = jnp.zeros((batch, max_segments + 1), jnp.int32).at[rows, slots].add(1)[:, :max_segments]
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  starts = jnp.full((batch, max_segments + 1), length, jnp.int32).at[rows, slots].min(positions)[:, :max_segments]
  present = counts > 0
  order = jnp.argsort(~present, axis=1, stable=True)  # a row's segments first, in id order, even if an id is skipped
  lengths = jnp.take_along_axis(jnp.where(present, counts, -1), order, axis=1)
  offsets = jnp.take_along_axis(jnp.where(present, starts, -1), order, axis=1)
  return lengths, jnp.pad(offsets, [(0, 0), (0, 1)], constant_values=-1)


def packed_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                     max_segments: int | None = None) -> jax.Array:
  """cuDNN attention within each row's segments: `[batch, length, heads, head_dim]` in and out (query pre-scaled),
  zeros at padding (and at ids past `max_segments`). Raises where cuDNN's packed layout is unavailable."""
  max_segments = max_segments or segment_ids.shape[1]
  if max_segments == 1:
    lengths = jnp.sum(segment_ids == 1, axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(query, key, value, scale=1.0, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
  else:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # private: its signature is checked at the call

    lengths, offsets = segment_layout(segment_ids, max_segments)
    out = cudnn.dot_product_attention(query, key, value, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                      kv_offsets=offsets, scale=1.0, mask_type=cudnn.MaskType.NO_MASK,
                                      qkv_layout="BTNH")
  kept = (segment_ids > 0) & (segment_ids <= max_segments)  # cuDNN leaves tokens outside every segment unwritten
  return jnp.where(kept[:, :, None, None], out, jnp.zeros((), out.dtype))


@functools.lru_cache(maxsize=None)
def _log_fallback(reason: str) -> None:
  """Logs each distinct reason once (every layer of every trace would repeat it)."""
  log.warning("cuDNN packed attention unavailable, using the dense-mask path: %s", reason)


def attention_or_fallback(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                          max_segments: int | None, fallback: Callable[[], jax.Array]) -> jax.Array:
  """`packed_attention`, or `fallback()` (the dense-mask path) where it cannot be built."""
  try:
    return packed_attention(query, key, value, segment_ids, max_segments)
  except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as error:
    _log_fallback(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    return fallback()
