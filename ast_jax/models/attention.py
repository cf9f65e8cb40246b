"""Attention implementations behind one function, chosen by `config.model.attention`.

- `xla`: two einsums and a softmax; materialises the `[batch, heads, length, length]` scores.
- `blockwise`: the flash-attention algorithm in plain JAX: one (batch, head) row and one block of queries at a time,
  softmax statistics kept as a log-sum-exp, and a custom backward pass that recomputes each block's probabilities
  instead of storing them. Memory is O(length) instead of O(length^2), and its speed does not depend on the host
  allocator: an AST-tiny train step at 1212 tokens, batch 4, on 2 CPU cores takes 1.50 s with either under
  tcmalloc, but 3.24 s (`xla`) against 1.81 s (`blockwise`) under glibc's malloc, with 3.6 GB against 1.4 GB of
  XLA buffers (docs/RESULTS.md).
- `splash`: Pallas splash attention, the flash-attention kernel for TPU (`ast_jax/models/splash.py`): lengths
  padded to a multiple of 128, segment ids passed to the kernel, run per shard under a mesh. Interpret mode off TPU
  (tests); refused on GPU.
- `cudnn`: `jax.nn.dot_product_attention`'s fused cuDNN kernel (NVIDIA GPUs, bf16/fp16). With segment ids it uses
  cuDNN's packed layout (per-row segment lengths and offsets, `ast_jax/models/cudnn_packed.py`), falling back to a
  dense mask where that layout is unavailable.
- `auto`: `blockwise` on CPU, `splash` on TPU, `cudnn` on GPU for 16-bit compute, otherwise `xla`.

All take query (already scaled), key and value `[batch, length, heads, head_dim]` and either an optional boolean
mask broadcastable to `[batch, heads, length, length]` (True = may attend) or, for self-attention over packed rows,
segment ids `[batch, length]` (0 = padding, k > 0 = the row's k-th clip: a token attends to its own clip only, and
padding to nothing), the same function as the mask `segment_mask(segment_ids)`. `blockwise` builds each query
block's `[block, length]` mask from the ids, so no `[length, length]` array exists; `xla` builds the dense mask.
The softmax runs in float32. A query that may attend to nothing (padding) gets the mean of all values, as a
softmax over equal logits gives, with the same finite values and gradients in `xla` and `blockwise`. The kernels
differ at padding positions only, whose outputs no real token sees: `splash` gives padding its attention over
the padding's values (padding attends to padding), packed `cudnn` gives zeros. `splash` takes no dense mask (`auto`
then picks `xla` on TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ast_jax import target
from ast_jax.models import cudnn_packed

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
BLOCK_QUERIES = 256  # on a 2-core CPU at 1212 tokens 64 and 128 were slower, 256 to 512 alike (256 x 1214: 1.2 MB)
UNROLL_BLOCKS = 8  # a row's block loop unrolled (up to 8 blocks): loop overhead was ~15 % of attention time on CPU
_MASKED = float(jnp.finfo(jnp.float32).min)


def resolve(implementation: str, dtype: jnp.dtype) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = target.platform()
  if backend == "cpu":
    return "blockwise"
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """`[batch, 1, length, length]` from segment ids `[batch, length]`: True where query and key share a segment;
  padding (0) attends nowhere and nothing attends to it."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & (segment_ids[:, None, :] > 0))[:, None]


def _check_segments(query: jax.Array, key: jax.Array, mask: jax.Array | None, segment_ids: jax.Array | None):
  if segment_ids is None:
    return
  if mask is not None:
    raise ValueError("pass either a mask or segment_ids, not both")
  if segment_ids.shape != query.shape[:2] or key.shape[1] != query.shape[1]:
    raise ValueError(f"segment_ids {segment_ids.shape} need self-attention over [batch, length] = "
                     f"{query.shape[:2]} (keys: {key.shape[1]})")


def attend(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None,
           implementation: str = "auto", *, segment_ids: jax.Array | None = None,
           max_segments: int | None = None) -> jax.Array:
  """softmax(q k^T) v, `[batch, length, heads, head_dim]` in and out (q pre-scaled), masked by `mask` or by
  `segment_ids` `[batch, length]` (at most one of the two). `max_segments`: the most clips a row holds (packed
  `cudnn` only; default the row length)."""
  _check_segments(query, key, mask, segment_ids)
  chosen = resolve(implementation, query.dtype)
  if chosen == "splash" and mask is not None:
    if implementation != "auto":
      raise ValueError("attention='splash' takes segment ids, not a dense mask; use 'xla' or 'blockwise' for masks")
    chosen = "xla"
  if chosen == "blockwise":
    batch, length, heads, _ = query.shape
    if mask is not None:
      mask = jnp.broadcast_to(mask, (batch, heads, length, key.shape[1]))
    return _blockwise(query, key, value, mask, segment_ids)
  if chosen == "splash":
    from ast_jax.models import splash  # Pallas is imported only where the kernel runs

    return splash.splash_attention(query, key, value, segment_ids)
  if chosen == "cudnn":
    cudnn = functools.partial(jax.nn.dot_product_attention, query, key, value, scale=1.0, implementation="cudnn")
    if segment_ids is None:
      return cudnn(mask=mask)
    return cudnn_packed.attention_or_fallback(query, key, value, segment_ids, max_segments,
                                              lambda: cudnn(mask=segment_mask(segment_ids)))
  if segment_ids is not None:
    mask = segment_mask(segment_ids)
  return dense_attention(query, key, value, mask)


def attention_weights(query: jax.Array, key: jax.Array, mask: jax.Array | None = None, *,
                      segment_ids: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) `[batch, heads, queries, keys]` in float32 (materialised: `xla`, and attention dropout)."""
  _check_segments(query, key, mask, segment_ids)
  if segment_ids is not None:
    mask = segment_mask(segment_ids)
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED)
  return jax.nn.softmax(logits, axis=-1)


def dense_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  weights = attention_weights(query, key, mask).astype(value.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


# Layout: rows are (batch, head) pairs; each row's queries are cut into equal blocks of at most BLOCK_QUERIES.

def _rows(x: jax.Array) -> jax.Array:
  """`[batch, length, heads, dim]` -> `[batch * heads, length, dim]`."""
  batch, length, heads, dim = x.shape
  return x.transpose(0, 2, 1, 3).reshape(batch * heads, length, dim)


def _unrows(x: jax.Array, batch: int, heads: int) -> jax.Array:
  rows, length, dim = x.shape
  return x.reshape(batch, heads, length, dim).transpose(0, 2, 1, 3)


def _block_size(length: int) -> int:
  """Equal blocks (a multiple of 8) so that padding wastes at most a few rows: 1214 -> 5 blocks of 248."""
  blocks = -(-length // BLOCK_QUERIES)
  per_block = -(-length // blocks)
  return (per_block + 7) // 8 * 8 if blocks > 1 else length


def _query_blocks(x: jax.Array, block: int) -> jax.Array:
  """`[rows, length, ...]` -> `[rows, blocks, block, ...]` (the last block zero-padded)."""
  rows, length = x.shape[:2]
  blocks = -(-length // block)
  x = jnp.pad(x, [(0, 0), (0, blocks * block - length)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(rows, blocks, block, *x.shape[2:])


def _from_query_blocks(x: jax.Array, length: int) -> jax.Array:
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _block_forward(query, key, value, mask):
  """One row and query block: (output `[block, dim]`, log-sum-exp `[block]`)."""
  logits = jnp.einsum("qd,kd->qk", query, key, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("qk,kd->qd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32) / total
  return out.astype(value.dtype), (peak + jnp.log(total))[:, 0]


def _block_backward(query, key, value, mask, out, log_sum_exp, d_out):
  """Gradients of one row and query block: (d_query, d_key contribution, d_value contribution)."""
  logits = jnp.einsum("qd,kd->qk", query, key, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASKED)
  probs = jnp.exp(logits - log_sum_exp[:, None])
  # A fully masked query's log-sum-exp rounds to _MASKED, so its probs come out 1, not 1 / keys: as in the dense
  # path, its value gradient is d_out / keys and its logits (masked) get no gradient.
  empty = (log_sum_exp == _MASKED)[:, None]
  d_value = jnp.einsum("qk,qd->kd", probs.astype(d_out.dtype), jnp.where(empty, d_out / key.shape[0], d_out),
                       preferred_element_type=jnp.float32)
  d_out = jnp.where(empty, 0, d_out)
  d_probs = jnp.einsum("qd,kd->qk", d_out, value, preferred_element_type=jnp.float32)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = (probs * (d_probs - delta)).astype(query.dtype)
  d_query = jnp.einsum("qk,kd->qd", d_logits, key, preferred_element_type=jnp.float32)
  d_key = jnp.einsum("qk,qd->kd", d_logits, query, preferred_element_type=jnp.float32)
  return d_query, d_key, d_value


def _row_masks(mask, segment_ids, heads, block):
  """Per row, what each query block's mask is made from: (`[rows, blocks, block, keys]` blocks of a dense mask,
  None) or (`[rows, blocks, block]` query segment ids, `[rows, keys]` key segment ids); (None, None) unmasked."""
  if segment_ids is not None:
    row_segments = jnp.repeat(segment_ids, heads, axis=0)  # row b * heads + h, as _rows orders them
    # padding keys as -1: one comparison builds a block's mask, and padding queries (0) match no key
    return _query_blocks(row_segments, block), jnp.where(row_segments > 0, row_segments, -1)
  if mask is not None:
    return _query_blocks(mask.reshape(-1, *mask.shape[2:]), block), None
  return None, None


def _block_mask(block_mask, key_segments):
  """One query block's `[block, keys]` mask: a dense mask's block, or built from the block's segment ids."""
  return block_mask if key_segments is None else block_mask[:, None] == key_segments[None, :]


def _forward(query, key, value, mask, segment_ids):
  """An outer scan over rows (each row's keys and values sliced once) and an inner scan over its query blocks."""
  batch, length, heads, _ = query.shape
  block = _block_size(length)
  query_blocks = _query_blocks(_rows(query), block)
  mask_blocks, key_segments = _row_masks(mask, segment_ids, heads, block)

  def row_step(_, row):
    query_row, key_row, value_row, mask_row, key_segments_row = row

    def block_step(_, block_inputs):
      block_query, block_mask = block_inputs
      return None, _block_forward(block_query, key_row, value_row, _block_mask(block_mask, key_segments_row))

    return None, jax.lax.scan(block_step, None, (query_row, mask_row), unroll=UNROLL_BLOCKS)[1]

  rows = (query_blocks, _rows(key), _rows(value), mask_blocks, key_segments)
  _, (out, log_sum_exp) = jax.lax.scan(row_step, None, rows)
  return _unrows(_from_query_blocks(out, length), batch, heads), log_sum_exp


def _backward(query, key, value, mask, segment_ids, out, log_sum_exp, d_out):
  batch, length, heads, _ = query.shape
  block = _block_size(length)
  blocked = [_query_blocks(_rows(x), block) for x in (query, out, d_out)]
  mask_blocks, key_segments = _row_masks(mask, segment_ids, heads, block)

  def row_step(_, row):
    query_row, out_row, d_out_row, lse_row, key_row, value_row, mask_row, key_segments_row = row

    def block_step(carry, block_inputs):
      block_query, block_out, block_d_out, block_lse, block_mask = block_inputs
      d_query, d_key, d_value = _block_backward(block_query, key_row, value_row,
                                                _block_mask(block_mask, key_segments_row), block_out, block_lse,
                                                block_d_out)
      return (carry[0] + d_key, carry[1] + d_value), d_query

    zeros = jnp.zeros(key_row.shape, jnp.float32)
    (d_key, d_value), d_query = jax.lax.scan(block_step, (zeros, zeros),
                                             (query_row, out_row, d_out_row, lse_row, mask_row),
                                             unroll=UNROLL_BLOCKS)
    return None, (d_query, d_key, d_value)

  rows = (*blocked, log_sum_exp, _rows(key), _rows(value), mask_blocks, key_segments)
  _, (d_query, d_keys, d_values) = jax.lax.scan(row_step, None, rows)
  d_query = _unrows(_from_query_blocks(d_query, length), batch, heads)
  return (d_query.astype(query.dtype), _unrows(d_keys, batch, heads).astype(key.dtype),
          _unrows(d_values, batch, heads).astype(value.dtype))


@jax.custom_vjp
def _blockwise(query, key, value, mask, segment_ids):
  """Blockwise attention; `mask` None or boolean `[batch, heads, length, length]`, `segment_ids` None or
  `[batch, length]` (at most one given; neither has a gradient)."""
  return _forward(query, key, value, mask, segment_ids)[0]


def _blockwise_fwd(query, key, value, mask, segment_ids):
  out, log_sum_exp = _forward(query, key, value, mask, segment_ids)
  return out, (query, key, value, mask, segment_ids, out, log_sum_exp)


def _blockwise_bwd(residuals, d_out):
  query, key, value, mask, segment_ids, out, log_sum_exp = residuals
  return (*_backward(query, key, value, mask, segment_ids, out, log_sum_exp, d_out), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
