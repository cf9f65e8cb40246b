"""Every attention implementation computes the same function and gradients as the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models import attention


def inputs(batch=2, length=300, heads=3, dim=16, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, g = (jax.random.normal(key, (batch, length, heads, dim), dtype) for key in keys)
  return q * dim**-0.5, k, v, g


def numpy_attention(q, k, v, mask=None):
  """float64 reference: softmax(q k^T) v per batch and head."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def value_and_grads(implementation, q, k, v, g, mask=None):
  fn = lambda q, k, v: attention.attend(q, k, v, mask, implementation)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  return out, vjp(g)


@pytest.mark.parametrize("length", [300, 256, 40])  # several blocks with padding, one exact block, one short block
@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_matches_dense_values_and_gradients(length, masked):
  q, k, v, g = inputs(length=length)
  mask = None
  if masked:  # two segments per example, as packed rows have: attend within your own segment only
    segments = (jnp.arange(length) >= length // 3).astype(jnp.int32)
    mask = (segments[:, None] == segments[None, :])[None, None]
  out, grads = value_and_grads("blockwise", q, k, v, g, mask)
  ref_out, ref_grads = value_and_grads("xla", q, k, v, g, mask)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, mask), atol=1e-5)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_blockwise_in_bfloat16_stays_close():
  q, k, v, g = inputs(dtype=jnp.bfloat16)
  out, _ = value_and_grads("blockwise", q, k, v, g)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), numpy_attention(q, k, v), atol=2e-2)


def test_block_sizes_split_evenly():
  assert attention._block_size(1214) == 248 and 5 * 248 >= 1214  # 5 blocks, 26 padded rows instead of 66
  assert attention._block_size(100) == 100
  assert all(attention._block_size(n) % 8 == 0 for n in (257, 1000, 2426))


def test_auto_picks_per_platform_and_rejects_unknown():
  expected = {"cpu": ("blockwise", "blockwise"), "gpu": ("xla", "cudnn")}.get(jax.default_backend(), ("xla", "xla"))
  assert (attention.resolve("auto", jnp.float32), attention.resolve("auto", jnp.bfloat16)) == expected
  assert attention.resolve("xla", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="not one of"):
    attention.resolve("flash", jnp.float32)
