"""The selective scan of Mamba (docs/BACKGROUND.md section 5.4) in plain JAX: one function, several implementations.

For each channel d and state n, with inputs u, step sizes delta `[batch, length, channels]`, A `[channels, state]`
(negative), B and C `[batch, length, state]` and the skip D `[channels]`:

    h_l = exp(delta_l A) * h_{l-1} + delta_l B_l u_l,        y_l = sum_n h_l C_l + D u_l

The recurrence is linear in h, so its steps compose associatively: (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2).
Implementations (`method`):
- `sequential`: `lax.scan` over the length, one step at a time (the reference; O(1) state memory, length-deep);
- `associative`: `lax.associative_scan` over the whole length (log-depth; holds every step's [channels, state]);
- `chunked`: `lax.scan` over chunks of `chunk_size` steps, the associative scan inside each chunk, the chunk
  rematerialised in the backward pass, so memory is bounded by one chunk's states plus the carries;
- `recompute`: the sequential scan with a hand-written backward pass, as the CUDA kernel does it: the forward pass
  keeps only its inputs and the state entering each chunk of `chunk_size` steps; the backward pass recomputes one
  chunk's states at a time and runs the adjoint recurrence g_l = C_l dy_l + exp(delta_{l+1} A) g_{l+1} the other
  way. A network of many scans then holds no [length, channels, state] residuals between its forward and backward
  passes, and the backward pass one chunk's (the default on CPU: docs/RESULTS.md);
- `pallas`: `recompute` as a Pallas TPU kernel (ssm_pallas.py): the state stays on chip through the length, the
  same residuals; interpreted on CPU (for tests), an error on GPU.
Every implementation runs in float32 (or float64 when given float64) and is differentiable by JAX autodiff.
`reverse=True` scans from the end (the backward direction of bidirectional Mamba without flipping arrays).
`resets` `[batch, length]` (bool) marks the steps where the scan starts from a zero state, in the scan's direction
(segment starts forward, segment ends with `reverse=True`): packed rows of several clips.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ast_jax.models import ssm_pallas

SCAN_METHODS = ("sequential", "associative", "chunked", "recompute", "pallas")


def _compute_dtype(*arrays: jax.Array) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _combine(left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Step `left` then step `right` of h -> a h + b: (a_r a_l, a_r b_l + b_r)."""
  a_left, b_left = left
  a_right, b_right = right
  return a_right * a_left, a_right * b_left + b_right


def _steps(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, resets: jax.Array | None
           ) -> tuple[jax.Array, jax.Array]:
  """The per-step maps h -> a h + b: a = exp(delta A), b = delta B u, each `[batch, length, channels, state]`;
  a = 0 where a reset starts a fresh state."""
  a = jnp.exp(delta[..., None] * A)
  if resets is not None:
    a = jnp.where(resets[..., None, None], 0.0, a)
  b = (delta * u)[..., None] * B[:, :, None, :]
  return a, b


def _sequential(u, delta, A, B, C, resets, reverse):
  batch, _, channels = u.shape
  state = A.shape[-1]

  def step(h, inputs):
    u_l, delta_l, B_l, C_l, reset_l = inputs
    a = jnp.exp(delta_l[..., None] * A)
    a = jnp.where(reset_l[:, None, None], 0.0, a)
    h = a * h + (delta_l * u_l)[..., None] * B_l[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, C_l)

  resets = jnp.zeros(u.shape[:2], bool) if resets is None else resets
  time_major = [jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C, resets)]
  h0 = jnp.zeros((batch, channels, state), u.dtype)
  _, y = jax.lax.scan(step, h0, time_major, reverse=reverse)
  return jnp.moveaxis(y, 0, 1)


def _decay(delta_l: jax.Array, A: jax.Array, reset_l: jax.Array) -> jax.Array:
  """exp(delta_l A) `[batch, channels, state]`, 0 where a reset starts a fresh state."""
  return jnp.where(reset_l[:, None, None], 0.0, jnp.exp(delta_l[..., None] * A))


def _forward_step(A, keep_states: bool):
  """One step of the recurrence for lax.scan: (h, inputs) -> (h', y) or (h', (y, h)) with `keep_states`."""

  def step(h, inputs):
    u_l, delta_l, B_l, C_l, reset_l = inputs
    h_next = _decay(delta_l, A, reset_l) * h + (delta_l * u_l)[..., None] * B_l[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h_next, C_l)
    return h_next, ((y, h) if keep_states else y)

  return step


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """`[batch, length, ...]` -> time-major chunks `[length / chunk, chunk, batch, ...]`, the length padded with zeros
  (delta = 0 makes a padded step the identity map)."""
  pad = -x.shape[1] % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = jnp.moveaxis(x, 1, 0)
  return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _from_chunks(x: jax.Array, length: int) -> jax.Array:
  """The inverse of `_to_chunks`: `[chunks, chunk, batch, ...]` -> `[batch, length, ...]`."""
  return jnp.moveaxis(x.reshape(-1, *x.shape[2:]), 0, 1)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _recompute(u, delta, A, B, C, resets, chunk):
  return _recompute_forward(u, delta, A, B, C, resets, chunk)[0]


def _recompute_forward(u, delta, A, B, C, resets, chunk):
  """Forward scan in chunks; keeps only the state entering each chunk (`[chunks, batch, channels, state]`)."""
  step = _forward_step(A, keep_states=False)

  def one_chunk(h, inputs):
    h_last, y = jax.lax.scan(step, h, inputs)
    return h_last, (y, h)

  inputs = [_to_chunks(x, chunk) for x in (u, delta, B, C, resets)]
  h0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype)
  _, (y, h_in) = jax.lax.scan(one_chunk, h0, inputs)
  return _from_chunks(y, u.shape[1]), (u, delta, A, B, C, resets, h_in)


def _recompute_backward(chunk, saved, dy):
  # The barrier ties the recomputation to this scan's incoming gradient, so that it runs when that arrives.
  u, delta, A, B, C, resets, h_in, dy = jax.lax.optimization_barrier((*saved, dy))
  forward_step = _forward_step(A, keep_states=True)

  def adjoint_step(carry, inputs):
    g_later, dA = carry  # g_later = exp(delta_{l+1} A) g_{l+1}: the gradient reaching h_l through step l+1
    u_l, delta_l, B_l, C_l, reset_l, dy_l, h_prev = inputs
    decay = _decay(delta_l, A, reset_l)
    g = dy_l[..., None] * C_l[:, None, :] + g_later  # dL/dh_l
    h_l = decay * h_prev + (delta_l * u_l)[..., None] * B_l[:, None, :]
    through_decay = g * h_prev * decay  # dL/d(delta_l A), elementwise
    g_B = jnp.einsum("bdn,bn->bd", g, B_l)
    d_delta = jnp.einsum("bdn,dn->bd", through_decay, A) + g_B * u_l
    dA = dA + jnp.einsum("bdn,bd->dn", through_decay, delta_l)
    grads = (g_B * delta_l, d_delta, jnp.einsum("bdn,bd->bn", g, delta_l * u_l), jnp.einsum("bdn,bd->bn", h_l, dy_l))
    return (decay * g, dA), grads

  def one_chunk(carry, inputs):
    *chunk_inputs, dy_c, h_start = inputs
    _, (_, h_before) = jax.lax.scan(forward_step, h_start, chunk_inputs)  # this chunk's states, recomputed
    return jax.lax.scan(adjoint_step, carry, (*chunk_inputs, dy_c, h_before), reverse=True)

  inputs = [_to_chunks(x, chunk) for x in (u, delta, B, C, resets, dy)]
  g0 = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype)
  (_, dA), grads = jax.lax.scan(one_chunk, (g0, jnp.zeros_like(A)), (*inputs, h_in), reverse=True)
  du, d_delta, dB, dC = (_from_chunks(x, u.shape[1]) for x in grads)
  return du, d_delta, dA, dB, dC, None


_recompute.defvjp(_recompute_forward, _recompute_backward)


def _associative(u, delta, A, B, C, resets, reverse):
  a, b = _steps(u, delta, A, B, resets)
  _, h = jax.lax.associative_scan(_combine, (a, b), axis=1, reverse=reverse)
  return jnp.einsum("bldn,bln->bld", h, C)


def _chunked(u, delta, A, B, C, resets, reverse, chunk_size):
  batch, length, channels = u.shape
  state = A.shape[-1]
  chunk = max(1, min(chunk_size, length))
  pad = -length % chunk
  resets = jnp.zeros((batch, length), bool) if resets is None else resets
  if pad:  # padded steps at the end: delta = 0 gives a = 1, b = 0 (identity maps); their outputs are dropped
    u, delta, B, C = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (u, delta, B, C))
    resets = jnp.pad(resets, ((0, 0), (0, pad)))
  chunks = (length + pad) // chunk

  def split(x):
    return jnp.moveaxis(x.reshape(batch, chunks, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one_chunk(h, inputs):
    u_c, delta_c, B_c, C_c, resets_c = inputs
    a, b = _steps(u_c, delta_c, A, B_c, resets_c)
    a_cum, b_cum = jax.lax.associative_scan(_combine, (a, b), axis=1, reverse=reverse)
    h_all = a_cum * h[:, None] + b_cum  # every step's state, from the carry into this chunk
    y = jnp.einsum("bldn,bln->bld", h_all, C_c)
    return (h_all[:, 0] if reverse else h_all[:, -1]), y

  h0 = jnp.zeros((batch, channels, state), u.dtype)
  _, y = jax.lax.scan(one_chunk, h0, [split(x) for x in (u, delta, B, C, resets)], reverse=reverse)
  y = jnp.moveaxis(y, 0, 1).reshape(batch, chunks * chunk, channels)
  return y[:, :length]


def selective_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, *, resets: jax.Array | None = None, method: str = "chunked",
                   chunk_size: int = 128, reverse: bool = False) -> jax.Array:
  """y `[batch, length, channels]` of the selective scan (module docstring), in the promoted float dtype (at least
  float32). u, delta `[batch, length, channels]`; A `[channels, state]`; B, C `[batch, length, state]`; D
  `[channels]` or None; resets `[batch, length]` bool or None."""
  # The kernel's platform and rules are static: a trace cached for the CPU must not serve a TPU compile.
  where = ssm_pallas.placement(jnp.shape(u)) if method == "pallas" else None
  return _selective_scan(u, delta, A, B, C, D, resets=resets, method=method, chunk_size=chunk_size, reverse=reverse,
                         where=where)


@functools.partial(jax.jit, static_argnames=("method", "chunk_size", "reverse", "where"))
def _selective_scan(u, delta, A, B, C, D, *, resets, method, chunk_size, reverse, where):
  if method not in SCAN_METHODS:
    raise ValueError(f"selective scan method {method!r} is not one of {SCAN_METHODS}")
  if u.ndim != 3 or delta.shape != u.shape or A.ndim != 2 or A.shape[0] != u.shape[-1]:
    raise ValueError(f"selective scan shapes: u {u.shape} and delta {delta.shape} must be [batch, length, channels] "
                     f"and A {A.shape} [channels, state]")
  if B.shape != (*u.shape[:2], A.shape[1]) or C.shape != B.shape:
    raise ValueError(f"selective scan shapes: B {B.shape} and C {C.shape} must be [batch, length, state] = "
                     f"{(*u.shape[:2], A.shape[1])}")
  dtype = _compute_dtype(u, delta, A, B, C)
  u, delta, A, B, C = (x.astype(dtype) for x in (u, delta, A, B, C))
  resets = None if resets is None else resets.astype(bool)
  if method == "sequential":
    y = _sequential(u, delta, A, B, C, resets, reverse)
  elif method == "recompute":
    resets = jnp.zeros(u.shape[:2], bool) if resets is None else resets
    chunk = max(1, min(chunk_size, u.shape[1]))
    if reverse:  # the reversed sequence scanned forward (a flip of [batch, length, channels] costs little)
      flipped = [jnp.flip(x, axis=1) for x in (u, delta, B, C, resets)]
      y = jnp.flip(_recompute(flipped[0], flipped[1], A, *flipped[2:], chunk), axis=1)
    else:
      y = _recompute(u, delta, A, B, C, resets, chunk)
  elif method == "associative":
    y = _associative(u, delta, A, B, C, resets, reverse)
  elif method == "pallas":
    y = ssm_pallas.pallas_scan(u, delta, A, B, C, resets, reverse=reverse, chunk_size=chunk_size, where=where)
  else:
    y = _chunked(u, delta, A, B, C, resets, reverse, chunk_size)
  if D is not None:
    y = y + u * D.astype(dtype)
  return y
