"""Every attention implementation computes the same function and gradients as the dense reference."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from ast_jax.models import attention, layers
from ast_jax.models.vit import Encoder


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


def packed_segments(length, layouts):
  """Segment ids `[rows, length]` from per-row clip lengths (1-based ids in order, then padding 0)."""
  rows = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(clips)] + [np.zeros(length - sum(clips))])
          for clips in layouts]
  return jnp.asarray(np.stack(rows), jnp.int32)


def numpy_segment_mask(segment_ids):
  """The packing rule element by element: same clip, and never padding."""
  return np.array([[[a == b and b > 0 for b in row] for a in row] for row in np.asarray(segment_ids)])[:, None]


# 600 tokens in 4 query blocks of 152 (8 padded rows); clips cross block boundaries; row 0 ends in 63 padding tokens.
LAYOUTS_600 = [(250, 7, 180, 100), (1, 399, 200)]


@pytest.mark.parametrize("as_mask", [False, True])
def test_blockwise_segment_ids_match_dense_mask(monkeypatch, as_mask):
  monkeypatch.setattr(attention, "BLOCK_QUERIES", 160)
  assert attention._block_size(600) == 152
  segment_ids = packed_segments(600, LAYOUTS_600)
  mask = attention.segment_mask(segment_ids)
  q, k, v, g = inputs(length=600, heads=2, dim=8)
  fn = lambda q, k, v: attention.attend(q, k, v, implementation="blockwise",
                                        **({"mask": mask} if as_mask else {"segment_ids": segment_ids}))
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  ref_out, ref_grads = value_and_grads("xla", q, k, v, g, mask)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  for grad, ref in zip(vjp(g), ref_grads):  # g is nonzero on padding queries too: their gradients must agree
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  # padding queries attend nowhere: every implementation gives them the mean value, never NaN
  np.testing.assert_allclose(out[0, 537:], jnp.broadcast_to(v[0].mean(0), (63, 2, 8)), atol=1e-5)


def test_xla_segment_ids_equal_the_packing_mask():
  segment_ids = packed_segments(40, [(12, 3, 20), (40,)])
  mask = numpy_segment_mask(segment_ids)
  np.testing.assert_array_equal(attention.segment_mask(segment_ids), mask)
  q, k, v, _ = inputs(length=40)
  out = attention.attend(q, k, v, implementation="xla", segment_ids=segment_ids)
  np.testing.assert_array_equal(out, attention.attend(q, k, v, jnp.asarray(mask), "xla"))
  valid = mask | ~mask.any(-1, keepdims=True)  # padding queries have no float64 reference (a softmax over nothing)
  np.testing.assert_allclose(out[:, :35], numpy_attention(q, k, v, valid)[:, :35], atol=1e-5)
  weights = attention.attention_weights(q, k, segment_ids=segment_ids)
  np.testing.assert_array_equal(weights, attention.attention_weights(q, k, jnp.asarray(mask)))
  with pytest.raises(ValueError, match="not both"):
    attention.attend(q, k, v, jnp.asarray(mask), "xla", segment_ids=segment_ids)


def test_encoder_segment_ids_equal_mask(monkeypatch):
  monkeypatch.setattr(attention, "BLOCK_QUERIES", 32)  # 70 tokens: 3 blocks of 24
  segment_ids = packed_segments(70, [(30, 25), (10, 50, 10)])
  mask = attention.segment_mask(segment_ids)
  tokens = jax.random.normal(jax.random.key(1), (2, 70, 32))
  encoder = lambda implementation, **options: Encoder(depth=2, num_heads=2, mlp_dim=64, attention=implementation,
                                                      **options)
  params = nn.unbox(jax.jit(encoder("xla").init)(jax.random.key(0), tokens))
  apply = jax.jit(encoder("blockwise").apply)
  np.testing.assert_allclose(apply(params, tokens, segment_ids=segment_ids), apply(params, tokens, mask), atol=1e-5)

  # scanned and remat'd: the ids are broadcast to every layer, and the backward pass recomputes from them
  scanned = dict(scan_layers=True, remat="full", attention_dropout=0.1)
  params = {"params": layers.scan_layers({"encoder": params["params"]})["encoder"]}
  apply = jax.jit(functools.partial(encoder("xla", **scanned).apply, train=True, rngs={"dropout": jax.random.key(2)}))
  np.testing.assert_allclose(apply(params, tokens, segment_ids=segment_ids), apply(params, tokens, mask),
                             atol=1e-5)  # in training, attention dropout's materialised weights
  loss = lambda params, **masking: jnp.sum(encoder("blockwise", **scanned).apply(params, tokens, **masking) *
                                           jnp.sin(jnp.arange(32.0)))
  step = jax.jit(jax.value_and_grad(loss))
  (value, grads), (ref_value, ref_grads) = step(params, segment_ids=segment_ids), step(params, mask=mask)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def intermediate_shapes(jaxpr):
  """The shape of every equation output in a jaxpr and in the jaxprs nested in its equations (scan bodies...)."""
  for eqn in jaxpr.eqns:
    yield from (getattr(var.aval, "shape", ()) for var in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from intermediate_shapes(sub)


@pytest.mark.parametrize("as_mask", [False, True])
def test_blockwise_segment_ids_never_build_a_length_squared_array(as_mask):
  length, block = 600, attention._block_size(600)
  assert block < length
  segment_ids = packed_segments(length, LAYOUTS_600)
  q, k, v, _ = inputs(length=length, heads=2, dim=8)
  masking = {"mask": attention.segment_mask(segment_ids)} if as_mask else {"segment_ids": segment_ids}
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, implementation="blockwise", **masking))
  shapes = list(intermediate_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr))
  squared = [shape for shape in shapes if list(shape).count(length) >= 2]
  assert (block, length) in shapes  # each query block's mask (the dense mask's blocks are sliced from it)
  assert bool(squared) == as_mask, squared  # the dense mask, broadcast to every head, is L x L; the ids never are
