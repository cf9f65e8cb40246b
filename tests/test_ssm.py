"""The selective scan (ast_jax/models/ssm.py): every implementation against a float64 NumPy loop of the recurrence,
values and gradients, both directions, with state resets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.ssm import SCAN_METHODS, selective_scan

JAX_METHODS = tuple(method for method in SCAN_METHODS if method != "pallas")  # the kernel: tests/test_ssm_pallas.py


def numpy_scan(u, delta, A, B, C, D, resets=None, reverse=False):
  """h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l, y_l = sum_n h_l C_l + D u_l, step by step in float64."""
  u, delta, A, B, C, D = (np.asarray(x, np.float64) for x in (u, delta, A, B, C, D))
  batch, length, channels = u.shape
  y = np.zeros((batch, length, channels))
  order = range(length - 1, -1, -1) if reverse else range(length)
  for b in range(batch):
    h = np.zeros((channels, A.shape[1]))
    for l in order:
      if resets is not None and resets[b, l]:
        h = np.zeros_like(h)
      h = np.exp(delta[b, l][:, None] * A) * h + (delta[b, l] * u[b, l])[:, None] * B[b, l][None, :]
      y[b, l] = h @ C[b, l] + D * u[b, l]
  return y


def inputs(batch=2, length=37, channels=6, state=4, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(batch, length, channels)).astype(np.float32)
  delta = np.log1p(np.exp(rng.normal(size=(batch, length, channels)) - 1.0)).astype(np.float32)  # softplus > 0
  A = -np.exp(rng.normal(size=(channels, state))).astype(np.float32)
  B = rng.normal(size=(batch, length, state)).astype(np.float32)
  C = rng.normal(size=(batch, length, state)).astype(np.float32)
  D = rng.normal(size=(channels,)).astype(np.float32)
  return u, delta, A, B, C, D


@pytest.mark.parametrize("method", JAX_METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_the_float64_recurrence(method, reverse):
  u, delta, A, B, C, D = inputs()
  resets = np.zeros(u.shape[:2], bool)
  resets[0, [0, 11, 30]] = True  # clips packed in a row: a fresh state at each start
  for marks in (None, resets):
    expected = numpy_scan(u, delta, A, B, C, D, marks, reverse)
    actual = selective_scan(u, delta, A, B, C, D, resets=marks, method=method, chunk_size=8, reverse=reverse)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("method", JAX_METHODS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradients_match_float64(method, reverse):
  """Gradients of sum(y * w) w.r.t. every input, state resets included, against the float64 sequential scan
  (itself checked against the NumPy loop above)."""
  arrays = inputs(length=21)
  weights = np.random.default_rng(5).normal(size=arrays[0].shape)
  resets = np.zeros(arrays[0].shape[:2], bool)
  resets[1, [0, 9, 15]] = True

  def loss(dtype, scan_method, *xs):
    y = selective_scan(*(x.astype(dtype) for x in xs), resets=resets, method=scan_method, chunk_size=8,
                       reverse=reverse)
    return jnp.sum(y * weights.astype(dtype))

  with jax.enable_x64(True):
    reference = jax.grad(lambda *xs: loss(jnp.float64, "sequential", *xs), argnums=tuple(range(6)))(
        *(jnp.asarray(x, jnp.float64) for x in arrays))
    reference = [np.asarray(g) for g in reference]
  grads = jax.grad(lambda *xs: loss(jnp.float32, method, *xs), argnums=tuple(range(6)))(*arrays)
  for name, got, want in zip("u delta A B C D".split(), grads, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_float64_reference_scan_matches_numpy():
  u, delta, A, B, C, D = inputs(length=9)
  with jax.enable_x64(True):
    y = selective_scan(*(jnp.asarray(x, jnp.float64) for x in (u, delta, A, B, C, D)), method="sequential")
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, numpy_scan(u, delta, A, B, C, D), rtol=1e-12)


def test_bad_shapes_and_method_are_errors():
  u, delta, A, B, C, D = inputs()
  with pytest.raises(ValueError, match="not one of"):
    selective_scan(u, delta, A, B, C, D, method="cuda")
  with pytest.raises(ValueError, match=r"B .* must be \[batch, length, state\]"):
    selective_scan(u, delta, A, B[:, :5], C, D)
