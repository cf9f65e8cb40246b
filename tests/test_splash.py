"""Splash attention (Pallas, interpret mode on CPU; compiled for TPU) and packed cuDNN attention against the dense
reference: values and gradients on real tokens, with several clips per row, padding and unaligned lengths."""

import importlib.util
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax import target
from ast_jax.models import attention, cudnn_packed, splash
from ast_jax.parallel.mesh import make_mesh
from ast_jax.parallel.sharding import partitioning

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu.txt)")
needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on NVIDIA GPUs only")


def inputs(batch=2, length=200, heads=2, dim=32, dtype=jnp.float32):
  q, k, v, g = (jax.random.normal(key, (batch, length, heads, dim), dtype) for key in jax.random.split(
      jax.random.key(0), 4))
  return q * jnp.asarray(dim**-0.5, dtype), k, v, g


def packed_segments(length, layouts):
  """Segment ids `[rows, length]` from per-row clip lengths (ids 1, 2, ... in order, then padding 0)."""
  rows = [np.concatenate([np.full(n, i + 1) for i, n in enumerate(clips)] + [np.zeros(length - sum(clips))])
          for clips in layouts]
  return jnp.asarray(np.stack(rows), jnp.int32)


def reference(q, k, v, segment_ids):
  return attention.dense_attention(q, k, v, None if segment_ids is None else attention.segment_mask(segment_ids))


def test_lengths_pad_to_lanes_with_blocks_that_divide_them():
  assert (splash.padded_length(1214), splash.block_size(1280)) == (1280, 256)  # AST-base: 66 padded tokens
  assert (splash.padded_length(2048), splash.block_size(2048)) == (2048, 512)  # ElasticAST rows
  assert (splash.padded_length(200), splash.block_size(256)) == (256, 256)
  assert splash.block_size(384) == 128


# 200 tokens (padded to 256 inside the kernel): clips cross the 128-token block boundary, row 0 ends in padding;
# 256 tokens: aligned, no padded tokens, one row without padding.
@pytest.mark.parametrize("length, layouts", [(200, [(60, 90, 30), (150, 1)]), (256, [(100, 100, 50), (128, 128)])])
def test_splash_matches_dense_values_and_gradients_on_real_tokens(length, layouts):
  segment_ids = packed_segments(length, layouts)
  q, k, v, g = inputs(length=length)
  real = (segment_ids > 0)[:, :, None, None]
  g = jnp.where(real, g, 0)  # a loss over real tokens' outputs: padding's outputs differ by design

  def run(implementation):
    fn = lambda q, k, v: attention.attend(q, k, v, implementation=implementation, segment_ids=segment_ids)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    return out, vjp(g)

  (out, grads), (ref_out, ref_grads) = run("splash"), run("xla")
  assert np.isfinite(out).all()
  np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref_out, 0), atol=1e-5)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("length", [200, 256])  # padded tokens given id 0 and the rest 1; aligned: a full mask
def test_splash_whole_rows_without_segment_ids(length):
  q, k, v, _ = inputs(length=length)
  out = jax.jit(lambda q, k, v: attention.attend(q, k, v, implementation="splash"))(q, k, v)
  np.testing.assert_allclose(out, reference(q, k, v, None), atol=1e-5)


def test_splash_under_a_mesh_runs_per_shard_and_refuses_split_rows():
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  rules = (("batch", ("data", "fsdp")), ("act_heads", "tensor"))
  segment_ids = packed_segments(200, [(60, 90, 30), (200,)])
  q, k, v, _ = inputs(length=200)
  fn = jax.jit(lambda q, k, v: attention.attend(q, k, v, implementation="splash", segment_ids=segment_ids))
  with partitioning(mesh, rules):
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
  real = (segment_ids > 0)[:, :, None, None]
  np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, reference(q, k, v, segment_ids), 0), atol=1e-5)
  split_rows = lambda q, k, v: attention.attend(q, k, v, implementation="splash", segment_ids=segment_ids)
  with partitioning(mesh, rules + (("length", "data"),)), pytest.raises(ValueError, match="whole rows"):
    jax.eval_shape(split_rows, q, k, v)


def test_splash_choices_per_platform():
  q, k, v, _ = inputs(length=40, dim=8)
  mask = attention.segment_mask(packed_segments(40, [(10, 30), (40,)]))
  with target.compiling_for("tpu"):
    assert attention.resolve("auto", jnp.float32) == "splash"
    np.testing.assert_array_equal(attention.attend(q, k, v, mask), attention.attend(q, k, v, mask, "xla"))  # auto
    with pytest.raises(ValueError, match="not a dense mask"):
      attention.attend(q, k, v, mask, "splash")
  with target.compiling_for("gpu"), pytest.raises(ValueError, match="cudnn"):
    attention.attend(q, k, v, implementation="splash")


@needs_libtpu
@pytest.mark.slow  # compiles cost seconds; tests/test_compile.py's default TPU compiles run splash too (`auto`)
@pytest.mark.parametrize("arg", ["elastic", None])
def test_tpu_compile_runs_the_splash_kernel_per_shard(arg, tmp_path):
  """A one-block train step of the demo recipe for v5e:2x2 under data x tensor: ElasticAST's packed rows with
  segment ids (`auto` picks splash for TPU), AST's 34 tokens padded to 128. The program holds Mosaic kernels."""
  from ast_jax.train.aot import Target, compile_config
  from configs import demo

  config = demo.get_config(arg)
  config.mesh.update(data=2, fsdp=1, tensor=2)
  config.model.update(depth=1, width=128, num_heads=4, attention="auto" if arg else "splash")
  report = compile_config(config, Target("v5e:2x2"), ("train",), hlo_dir=str(tmp_path))
  program = report["phases"][0]["programs"][0]
  assert report["fits"] and program["memory"]["temp"] > 0
  with open(program["hlo_file"]) as file:
    assert "tpu_custom_call" in file.read()


def test_cudnn_segment_layout_lengths_and_offsets():
  segment_ids = packed_segments(12, [(3, 4, 2), (12,), (), (5,)])
  lengths, offsets = cudnn_packed.segment_layout(segment_ids, 4)
  np.testing.assert_array_equal(lengths, [[3, 4, 2, -1], [12, -1, -1, -1], [-1] * 4, [5, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 3, 7, -1, -1], [0, -1, -1, -1, -1], [-1] * 5, [0, -1, -1, -1, -1]])
  # a skipped id still packs the row's segments first; ids past the bound are left out
  skipped = jnp.asarray([[1, 1, 3, 3, 3, 0], [1, 2, 3, 4, 5, 0]], jnp.int32)
  lengths, offsets = cudnn_packed.segment_layout(skipped, 3)
  np.testing.assert_array_equal(lengths, [[2, 3, -1], [1, 1, 1]])
  np.testing.assert_array_equal(offsets, [[0, 2, -1, -1], [0, 1, 2, -1]])


def test_cudnn_packed_falls_back_to_the_dense_path_and_says_so_once(caplog):
  if jax.default_backend() == "gpu":
    pytest.skip("the packed path may well run here")
  cudnn_packed._log_fallback.cache_clear()
  segment_ids = packed_segments(40, [(10, 30), (25,)])
  q, k, v, _ = inputs(length=40, dim=8)
  fallback = lambda: reference(q, k, v, segment_ids)
  with caplog.at_level(logging.WARNING, logger="ast_jax.models.cudnn_packed"):
    for _ in range(2):
      out = cudnn_packed.attention_or_fallback(q, k, v, segment_ids, None, fallback)
  np.testing.assert_array_equal(out, fallback())
  assert len(caplog.records) == 1 and "dense-mask path" in caplog.records[0].getMessage()


@needs_gpu
@pytest.mark.parametrize("max_segments, layouts", [(None, [(100, 60, 90), (256,)]), (4, [(30, 200, 20, 6), (7,)]),
                                                   (1, [(200,), (256,)])])
def test_cudnn_packed_matches_dense_in_bfloat16(max_segments, layouts):
  segment_ids = packed_segments(256, layouts)
  q, k, v, g = inputs(length=256, heads=4, dim=64, dtype=jnp.bfloat16)
  real = (segment_ids > 0)[:, :, None, None]
  g = jnp.where(real, g, 0)
  try:
    out, vjp = jax.vjp(jax.jit(lambda q, k, v: cudnn_packed.packed_attention(q, k, v, segment_ids, max_segments)),
                       q, k, v)
  except NotImplementedError as error:  # e.g. the packed layout needs Hopper or later
    pytest.skip(str(error))
  ref_out, ref_vjp = jax.vjp(lambda *x: reference(*(y.astype(jnp.float32) for y in x), segment_ids), q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float32), jnp.where(real, ref_out, 0), atol=2e-2)
  for grad, ref in zip(vjp(g), ref_vjp(g.astype(jnp.float32))):
    np.testing.assert_allclose(np.asarray(grad, np.float32), ref, atol=3e-2 * float(jnp.max(jnp.abs(ref))) + 1e-2)
