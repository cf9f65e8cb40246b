"""The selective scan (ssm.py) as a Pallas TPU kernel with a hand-written backward pass: `selective_scan(...,
method="pallas")`.

The recurrence h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l, y_l = sum_n h_l C_l runs inside one kernel per
(batch row, block of channels), channels on the lanes and the state `[state, channel_block]` in registers, one step
after another. The grid's last axis walks the length in chunks of `chunk` steps in the scan's direction, carrying the
state from chunk to chunk in a VMEM scratch; inside a chunk, time goes in sub-blocks of 8 steps (one sublane tile):
u and delta arrive as `[8, channel_block]` tiles, B and C (with the reset marks, packed into one
`[batch, length, 2 state + 1]` array) as `[8, 2 state + 1]` tiles transposed in the kernel so that each step's B_l
and C_l are `[state, 1]` columns, and the 8 steps are unrolled.

What the backward pass keeps is what `recompute` keeps: the inputs and the state entering each chunk,
`[batch, chunks, state, channels]`, never `[length, channels, state]`. The backward kernel walks the chunks the other
way; for each it recomputes the chunk's states from its entry state into a `[chunk, state, channel_block]` VMEM
scratch, then runs the adjoint recurrence g_l = C_l dy_l + exp(delta_{l+1} A) g_{l+1} through the chunk (the formulas
of `ssm._recompute_backward`). dB and dC are sums over channels and dA over batch and length: the kernel writes one
partial per channel block (dB, dC) or per batch row (dA) and the sums are taken outside.

`reverse=True` runs the grid and the steps inside each chunk from the end; nothing is flipped. A reset zeroes the
decay of its step (a = 0). The length is padded to a multiple of `chunk` with delta = 0 (identity steps) and the
channels to a multiple of `channel_block`; padded outputs are dropped.

Sharding (models/kernel_sharding.py): XLA cannot partition a Mosaic call, so under a mesh (steps are traced under
`jax.set_mesh`) the kernel runs in a shard_map, rows split as the 'batch' logical rule says, length and channels
whole; a 'length' rule that splits rows is refused. The platform and the rows' mesh axes (`Placement`) are static arguments of `selective_scan`.

Platforms: on TPU the kernel is compiled by Mosaic; on CPU it runs in Pallas interpret mode (the tests' reference
check; slow, never a training choice). GPU is refused: the kernel carries the state from one grid step to the next
along the length, which a TPU core runs in order but a GPU (Triton) runs as concurrent programs, and it uses TPU
memory spaces and sublane transposes; `scan=chunked` is the GPU choice. The kernel computes in its inputs' dtype
(float32 as `selective_scan` casts them; float64 only in interpret mode, TPUs have none).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from ast_jax import target
from ast_jax.models.kernel_sharding import context_mesh, require_whole_rows, split_axes

SUBLANES = 8  # steps per unrolled sub-block: one sublane tile of u and delta
LANES = 128
STATES_VMEM = 4 * 2**20  # bytes for one chunk's states in the backward kernel, a quarter of v5e's scoped VMEM


class _Tiling(NamedTuple):
  chunk: int  # steps per grid step (a multiple of SUBLANES); the backward pass recomputes one chunk at a time
  block: int  # channels per kernel instance (a multiple of LANES, or every channel when fewer)
  state: int
  reverse: bool
  interpret: bool


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _sub_blocks(tiling: _Tiling, backward: bool):
  """(index of the i-th sub-block of a chunk, steps inside a sub-block) in scan order, or in the opposite order
  for the adjoint (`backward`)."""
  count = tiling.chunk // SUBLANES
  later_first = tiling.reverse != backward
  steps = tuple(reversed(range(SUBLANES))) if later_first else tuple(range(SUBLANES))
  return (lambda i: count - 1 - i) if later_first else (lambda i: i), steps


def _chunk_index(tiling: _Tiling, chunks: int, backward: bool):
  """The grid's chunk axis k -> the chunk it works on: in scan order, or the opposite for the backward pass."""
  later_first = tiling.reverse != backward
  return lambda k: chunks - 1 - k if later_first else k


def _load(rows: pl.Slice, u_ref, delta_ref, bcr_ref, state: int):
  """u, delta `[8, block]` and columns B, C `[8][state, 1]`, keep `[8][1, 1]` (0 at a reset) of one sub-block."""
  u, delta = u_ref[rows, :], delta_ref[rows, :]
  columns = bcr_ref[rows, :].T  # [2 state + 1, 8]: each step's B and C as columns that broadcast over channels
  B = [columns[:state, j:j + 1] for j in range(SUBLANES)]
  C = [columns[state:2 * state, j:j + 1] for j in range(SUBLANES)]
  keep = [columns[2 * state:, j:j + 1] for j in range(SUBLANES)]
  return u, delta, B, C, keep


def _forward_kernel(u_ref, delta_ref, bcr_ref, a_ref, y_ref, h_in_ref, carry_ref, *, tiling: _Tiling):
  """One chunk of one (batch row, channel block): u, delta, y `[chunk, block]`, bcr `[chunk, 2 state + 1]`,
  A `[state, block]`; writes the state entering the chunk to h_in `[state, block]`."""
  @pl.when(pl.program_id(2) == 0)
  def _start():
    carry_ref[...] = jnp.zeros_like(carry_ref)

  h_in_ref[...] = carry_ref[...]
  A = a_ref[...]
  sub_block, steps = _sub_blocks(tiling, backward=False)
  row = jax.lax.broadcasted_iota(jnp.int32, (SUBLANES, A.shape[1]), 0)

  def one_sub_block(i, h):
    rows = pl.ds(pl.multiple_of(sub_block(i) * SUBLANES, SUBLANES), SUBLANES)
    u, delta, B, C, keep = _load(rows, u_ref, delta_ref, bcr_ref, tiling.state)
    y = jnp.zeros((SUBLANES, A.shape[1]), h.dtype)
    for j in steps:
      h = keep[j] * jnp.exp(delta[j:j + 1] * A) * h + (delta[j:j + 1] * u[j:j + 1]) * B[j]
      y = jnp.where(row == j, jnp.sum(h * C[j], axis=0, keepdims=True), y)
    y_ref[rows, :] = y.astype(y_ref.dtype)
    return h

  carry_ref[...] = jax.lax.fori_loop(0, tiling.chunk // SUBLANES, one_sub_block, carry_ref[...])


def _recompute_states(h_in, A, u_ref, delta_ref, bcr_ref, states_ref, tiling: _Tiling) -> None:
  """Fills states_ref `[chunk, state, block]` with the state before each step of the chunk, from its entry state."""
  sub_block, steps = _sub_blocks(tiling, backward=False)

  def one_sub_block(i, h):
    start = pl.multiple_of(sub_block(i) * SUBLANES, SUBLANES)
    u, delta, B, _, keep = _load(pl.ds(start, SUBLANES), u_ref, delta_ref, bcr_ref, tiling.state)
    for j in steps:
      states_ref[start + j] = h
      h = keep[j] * jnp.exp(delta[j:j + 1] * A) * h + (delta[j:j + 1] * u[j:j + 1]) * B[j]
    return h

  jax.lax.fori_loop(0, tiling.chunk // SUBLANES, one_sub_block, h_in)


def _backward_kernel(u_ref, delta_ref, bcr_ref, a_ref, h_in_ref, dy_ref, du_ref, d_delta_ref, dbc_ref, da_ref,
                     states_ref, g_ref, *, tiling: _Tiling):
  """The adjoint of one chunk, walked against the scan: du, d_delta `[chunk, block]`, this block's share of dB and
  dC `[chunk, 2 state]`, and dA `[state, block]` summed over the chunks of this batch row."""
  @pl.when(pl.program_id(2) == 0)
  def _start():
    g_ref[...] = jnp.zeros_like(g_ref)
    da_ref[...] = jnp.zeros_like(da_ref)

  A = a_ref[...]
  _recompute_states(h_in_ref[...], A, u_ref, delta_ref, bcr_ref, states_ref, tiling)
  sub_block, steps = _sub_blocks(tiling, backward=True)
  row = jax.lax.broadcasted_iota(jnp.int32, (SUBLANES, A.shape[1]), 0)
  lane = jax.lax.broadcasted_iota(jnp.int32, (2 * tiling.state, SUBLANES), 1)

  def one_sub_block(i, carry):
    g_later, dA = carry  # g_later = exp(delta_{l+1} A) g_{l+1}: the gradient reaching h_l through step l+1
    start = pl.multiple_of(sub_block(i) * SUBLANES, SUBLANES)
    rows = pl.ds(start, SUBLANES)
    u, delta, B, C, keep = _load(rows, u_ref, delta_ref, bcr_ref, tiling.state)
    dy = dy_ref[rows, :]
    du = d_delta = jnp.zeros_like(u)
    dbc = jnp.zeros((2 * tiling.state, SUBLANES), u.dtype)
    for j in steps:
      decay = keep[j] * jnp.exp(delta[j:j + 1] * A)
      g = dy[j:j + 1] * C[j] + g_later  # dL/dh_l
      h_prev = states_ref[start + j]
      input_l = delta[j:j + 1] * u[j:j + 1]
      through_decay = g * h_prev * decay  # dL/d(delta_l A), elementwise
      g_B = jnp.sum(g * B[j], axis=0, keepdims=True)
      du = jnp.where(row == j, g_B * delta[j:j + 1], du)
      d_delta = jnp.where(row == j, jnp.sum(through_decay * A, axis=0, keepdims=True) + g_B * u[j:j + 1], d_delta)
      dA = dA + through_decay * delta[j:j + 1]
      h = decay * h_prev + input_l * B[j]
      column = jnp.concatenate([jnp.sum(g * input_l, axis=1, keepdims=True),
                                jnp.sum(h * dy[j:j + 1], axis=1, keepdims=True)], axis=0)
      dbc = jnp.where(lane == j, column, dbc)
      g_later = decay * g
    du_ref[rows, :] = du.astype(du_ref.dtype)
    d_delta_ref[rows, :] = d_delta.astype(d_delta_ref.dtype)
    dbc_ref[rows, :] = dbc.T.astype(dbc_ref.dtype)
    return g_later, dA

  g_ref[...], da_ref[...] = jax.lax.fori_loop(0, tiling.chunk // SUBLANES, one_sub_block, (g_ref[...], da_ref[...]))


def _specs(tiling: _Tiling, chunks: int, backward: bool):
  """BlockSpecs over the grid (batch, channel blocks, chunks) for `[batch, length, channels]`, the packed
  `[batch, length, 2 state + 1]`, `[state, channels]` and the chunk entry states `[batch, chunks, state, channels]`."""
  chunk_of = _chunk_index(tiling, chunks, backward)
  rows = pl.BlockSpec((None, tiling.chunk, tiling.block), lambda b, c, k: (b, chunk_of(k), c))
  packed = pl.BlockSpec((None, tiling.chunk, 2 * tiling.state + 1), lambda b, c, k: (b, chunk_of(k), 0))
  per_channel = pl.BlockSpec((tiling.state, tiling.block), lambda b, c, k: (0, c))
  entry = pl.BlockSpec((None, None, tiling.state, tiling.block), lambda b, c, k: (b, chunk_of(k), 0, c))
  return rows, packed, per_channel, entry


def _call(kernel, tiling: _Tiling, grid: tuple[int, int, int], in_specs, out_specs, out_shape, scratch_shapes):
  return pl.pallas_call(
      functools.partial(kernel, tiling=tiling), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=scratch_shapes, interpret=tiling.interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))


def _forward(u, delta, AT, bcr, tiling: _Tiling):
  """y `[batch, length, channels]` and the chunk entry states `[batch, chunks, state, channels]`."""
  batch, length, channels = u.shape
  chunks = length // tiling.chunk
  rows, packed, per_channel, entry = _specs(tiling, chunks, backward=False)
  out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, chunks, tiling.state, channels), u.dtype))
  call = _call(_forward_kernel, tiling, (batch, channels // tiling.block, chunks), [rows, rows, packed, per_channel],
               (rows, entry), out_shape, [pltpu.VMEM((tiling.state, tiling.block), u.dtype)])
  return call(u, delta, bcr, AT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _scan(u, delta, AT, bcr, tiling: _Tiling):
  return _forward(u, delta, AT, bcr, tiling)[0]


def _scan_forward(u, delta, AT, bcr, tiling: _Tiling):
  y, h_in = _forward(u, delta, AT, bcr, tiling)
  return y, (u, delta, AT, bcr, h_in)


def _scan_backward(tiling: _Tiling, saved, dy):
  u, delta, AT, bcr, h_in = saved
  batch, length, channels = u.shape
  blocks, chunks = channels // tiling.block, length // tiling.chunk
  rows, packed, per_channel, entry = _specs(tiling, chunks, backward=True)
  chunk_of = _chunk_index(tiling, chunks, backward=True)
  dbc_spec = pl.BlockSpec((None, None, tiling.chunk, 2 * tiling.state), lambda b, c, k: (b, c, chunk_of(k), 0))
  da_spec = pl.BlockSpec((None, tiling.state, tiling.block), lambda b, c, k: (b, 0, c))
  out_shape = (jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, blocks, length, 2 * tiling.state), u.dtype),
               jax.ShapeDtypeStruct((batch, tiling.state, channels), u.dtype))
  scratch = [pltpu.VMEM((tiling.chunk, tiling.state, tiling.block), u.dtype),
             pltpu.VMEM((tiling.state, tiling.block), u.dtype)]
  call = _call(_backward_kernel, tiling, (batch, blocks, chunks), [rows, rows, packed, per_channel, entry, rows],
               (rows, rows, dbc_spec, da_spec), out_shape, scratch)
  du, d_delta, dbc, dA = call(u, delta, bcr, AT, h_in, dy.astype(u.dtype))
  dbc = jnp.pad(jnp.sum(dbc, axis=1), ((0, 0), (0, 0), (0, 1)))  # no gradient for the reset marks
  return du, d_delta, jnp.sum(dA, axis=0), dbc


_scan.defvjp(_scan_forward, _scan_backward)


def _per_device(u, delta, A, B, C, resets, *, reverse: bool, chunk_size: int, interpret: bool,
                channel_block: int) -> jax.Array:
  """The kernel on one device's arrays: tiles chosen, inputs padded and packed, padding dropped from y."""
  batch, length, channels = u.shape
  block = channels if channels <= channel_block else channel_block
  states_bytes = A.shape[1] * _round_up(block, LANES) * u.dtype.itemsize  # one step's state in VMEM
  fits = max(SUBLANES, STATES_VMEM // states_bytes // SUBLANES * SUBLANES)  # the longest chunk whose states fit
  chunk = min(_round_up(max(1, min(chunk_size, length)), SUBLANES), fits)
  tiling = _Tiling(chunk, block, A.shape[1], reverse, interpret)
  pad_length, pad_channels = _round_up(length, chunk) - length, _round_up(channels, block) - channels
  keep = jnp.pad(1 - resets.astype(u.dtype), ((0, 0), (0, pad_length)), constant_values=1)  # padding: no reset
  B, C = (jnp.pad(x, ((0, 0), (0, pad_length), (0, 0))) for x in (B, C))
  bcr = jnp.concatenate([B, C, keep[..., None]], axis=-1)
  u, delta = (jnp.pad(x, ((0, 0), (0, pad_length), (0, pad_channels))) for x in (u, delta))
  AT = jnp.pad(A.T, ((0, 0), (0, pad_channels)))
  return _scan(u, delta, AT, bcr, tiling)[:, :length, :channels]


class Placement(NamedTuple):
  """What a trace of the kernel depends on besides its arguments; `selective_scan` makes it a static argument, so a
  trace cached for one platform or set of rules never serves another."""
  interpret: bool  # Pallas interpret mode: off TPU
  rows: PartitionSpec | None  # under a mesh, the mesh axes that split rows (the 'batch' rule); None without one


def placement(shape: tuple[int, ...]) -> Placement:
  """The placement of a scan of u `shape` `[batch, length, channels]` on the target platform (ast_jax.target) and
  the mesh and logical rules in scope. A clear error on GPU, or where the rules split the length."""
  platform = target.platform()
  if platform == "gpu":
    raise ValueError("scan=pallas is a TPU (Mosaic) kernel and has no GPU (Triton) lowering; use scan=chunked on GPU")
  mesh = context_mesh()
  if mesh is None:
    return Placement(platform != "tpu", None)
  require_whole_rows("scan=pallas", "scan=chunked")
  return Placement(platform != "tpu", PartitionSpec(split_axes("batch", shape[0] if shape else 1, mesh)))


def pallas_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, resets: jax.Array | None,
                *, reverse: bool, chunk_size: int, where: Placement | None = None,
                channel_block: int = LANES) -> jax.Array:
  """y `[batch, length, channels]` = sum_n h_l C_l (no D term), differentiable in u, delta, A, B, C. u, delta
  `[batch, length, channels]`; A `[channels, state]`; B, C `[batch, length, state]`; resets `[batch, length]` bool
  or None. `chunk_size`: steps per chunk, rounded up to a multiple of 8 and capped at what fits STATES_VMEM (512
  steps for 16 states and 128 channels). `where`: `placement(u.shape)` unless given. Under a mesh the kernel runs
  per device in a shard_map, rows split as the 'batch' logical rule says, length and channels whole."""
  where = placement(u.shape) if where is None else where
  if channel_block % LANES:
    raise ValueError(f"channel_block {channel_block} must be a multiple of {LANES} (the TPU lane width)")
  resets = jnp.zeros(u.shape[:2], bool) if resets is None else resets
  run = functools.partial(_per_device, reverse=reverse, chunk_size=chunk_size, interpret=where.interpret,
                          channel_block=channel_block)
  if where.rows is None:
    return run(u, delta, A, B, C, resets)
  # Mosaic calls cannot be partitioned by XLA: each device runs the kernel on its own rows.
  rows = where.rows
  sharded = jax.shard_map(run, mesh=context_mesh(), in_specs=(rows, rows, PartitionSpec(), rows,
                          rows, rows), out_specs=rows, check_vma=False)
  return sharded(u, delta, A, B, C, resets)
