"""Pallas splash attention (TPU), the kernel behind `attention.attend(..., implementation="splash")`.

Splash attention is the flash-attention algorithm as a Mosaic kernel: query and key blocks stream through VMEM,
the softmax statistics stay in float32 scratch, and the backward pass recomputes each block's probabilities. The
kernel takes one example's query, key and value `[heads, length, head_dim]` (vmapped over the batch) and segment
ids `[length]` (a query attends to keys of its own id).

- Length: the kernel works in blocks of 128-multiple tokens, so a length that is not a multiple of 128 (AST-base:
  1214 tokens) is padded up (to 1280), with blocks of the largest of 512, 256 and 128 that divide it. Padded tokens
  are zeros with segment id 0 and are dropped from the output.
- Segment ids `[batch, length]` (0 = padding) go to the kernel as they are: a real token attends to its own clip.
  Padding (id 0, and the padded tokens) attends to padding, because splash needs every query to see some key. That
  is the one difference from `xla` and `blockwise`, where a padding query attends to nothing and gets the mean of
  all values: here a padding position's output is its attention over the padding's values instead. No real token
  sees it, and gradients through real tokens' outputs are the same.
  Rows without ids are one segment (id 1) plus any padded tokens; with an aligned length and no ids the kernel runs
  with a full mask and no segment ids at all.
- Sharding (models/kernel_sharding.py): a Pallas call runs on one device's shard. Under a mesh (steps are traced
  under `jax.set_mesh`) the kernel runs in `jax.shard_map` over that mesh: batch split as the 'batch' logical rule says, heads as 'act_heads',
  length and head_dim whole (a batch or head count the rule's axes do not divide runs whole on every device). A
  'length' rule that names a mesh axis (sequence parallelism) is refused.
- Where: on TPU it compiles to a Mosaic custom call; on CPU it runs in Pallas interpret mode (tests); on GPU it is
  refused (use `cudnn` or `xla`).
"""

from __future__ import annotations

import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from ast_jax import target
from ast_jax.models.kernel_sharding import context_mesh, require_whole_rows, split_axes

LANES = 128  # the kernel's blocks are multiples of the TPU's 128 lanes
BLOCKS = (512, 256, 128)  # the largest that divides the padded length: fewer grid steps, same VMEM budget at 512


def padded_length(length: int) -> int:
  """The length the kernel runs at: `length` rounded up to a multiple of 128 (1214 -> 1280)."""
  return -(-length // LANES) * LANES


def block_size(padded: int) -> int:
  """Query and key block: the largest of 512, 256, 128 that divides `padded` (1280 -> 256, 2048 -> 512)."""
  return next(block for block in BLOCKS if padded % block == 0)


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, block: int, interpret: bool) -> kernel_lib.SplashAttentionKernel:
  """The splash kernel for `heads` heads over `length` tokens, full mask (segments come as ids at call time).

  Its mask tables are kept as NumPy arrays, so that the cached kernel belongs to no trace and no device: they
  become constants of each program that uses it."""
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((length, length))] * heads)
  build = functools.partial(kernel_lib.make_splash_mha, mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)
  # make_splash_mha puts its tables on a device: inside a trace they would be its tracers, and under an AOT mesh
  # they would go to chips that do not exist. A fresh thread has neither trace nor mesh in scope.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    kernel = pool.submit(build).result()
  return jax.tree.map(lambda leaf: np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf, kernel)


def _interpret() -> bool:
  """Interpret mode off TPU; GPU is refused (the kernel is Mosaic, a TPU compiler's)."""
  platform = target.platform()
  if platform == "gpu":
    raise ValueError("attention='splash' is a TPU kernel (Pallas Mosaic); on GPU use 'cudnn' or 'xla'")
  return platform != "tpu"


def _per_device(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array | None,
                interpret: bool) -> jax.Array:
  """Splash attention on one device's shard: `[batch, length, heads, head_dim]` in and out."""
  batch, length, heads, _ = query.shape
  padded = padded_length(length)

  def per_head(x: jax.Array) -> jax.Array:  # [batch, length, heads, dim] -> [batch, heads, padded, dim]
    return jnp.pad(x.transpose(0, 2, 1, 3), [(0, 0), (0, 0), (0, padded - length), (0, 0)])

  if segment_ids is None and padded != length:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  kernel = _kernel(heads, padded, block_size(padded), interpret)
  if segment_ids is None:
    out = jax.vmap(kernel)(per_head(query), per_head(key), per_head(value))
  else:
    ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded - length)])
    out = jax.vmap(kernel)(per_head(query), per_head(key), per_head(value),
                           segment_ids=kernel_lib.SegmentIds(q=ids, kv=ids))
  return out[:, :, :length].transpose(0, 2, 1, 3)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     segment_ids: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) v with splash attention: query (pre-scaled), key, value `[batch, length, heads, head_dim]` in
  and out, in their own dtype; optional segment ids `[batch, length]` (0 = padding, attending to padding only)."""
  if key.shape != query.shape or value.shape[:3] != query.shape[:3]:
    raise ValueError(f"splash attention is self-attention: query {query.shape}, key {key.shape}, value "
                     f"{value.shape} must share [batch, length, heads]")
  run = functools.partial(_per_device, interpret=_interpret())
  mesh = context_mesh()
  if mesh is None:
    return run(query, key, value, segment_ids)
  require_whole_rows("splash attention", "attention='xla'")
  batch_axes, head_axes = split_axes("batch", query.shape[0], mesh), split_axes("act_heads", query.shape[2], mesh)
  tokens = PartitionSpec(batch_axes, None, head_axes, None)
  if segment_ids is None:
    sharded = jax.shard_map(lambda q, k, v: run(q, k, v, None), mesh=mesh, in_specs=(tokens,) * 3,
                            out_specs=tokens, check_vma=False)
    return sharded(query, key, value)
  sharded = jax.shard_map(run, mesh=mesh, in_specs=(tokens,) * 3 + (PartitionSpec(batch_axes, None),),
                          out_specs=tokens, check_vma=False)
  return sharded(query, key, value, segment_ids)
