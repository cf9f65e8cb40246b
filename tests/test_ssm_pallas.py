"""The Pallas selective scan (ast_jax/models/ssm_pallas.py): interpret mode on CPU against the float64 recurrence,
values and gradients over several channel blocks and a padded length; the Mosaic compile for a TPU chip; what the
backward pass keeps. tests/test_ssm.py runs it through the shared parity tests at one channel block as well."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ast_jax import target
from ast_jax.models.ssm import selective_scan
from ast_jax.models.ssm_pallas import pallas_scan
from ast_jax.parallel.mesh import make_mesh
from ast_jax.parallel.sharding import partitioning
from tests.test_compile import needs_libtpu
from tests.test_ssm import inputs, numpy_scan

CHANNELS = 130  # two blocks of 128 channels, the second padded
LENGTH = 37  # not a multiple of the chunk (16) nor of the 8-step sub-block


def _resets(batch: int, length: int) -> np.ndarray:
  resets = np.zeros((batch, length), bool)
  resets[0, [0, length // 3, 4 * length // 5]] = True  # a state that restarts mid-chunk and at a row's start
  resets[1, [5, length // 2 + 1]] = True
  return resets


@pytest.mark.parametrize("reverse", [False, True])
def test_interpreted_kernel_matches_the_float64_recurrence(reverse):
  u, delta, A, B, C, D = inputs(length=LENGTH, channels=CHANNELS)
  for marks in (None, _resets(*u.shape[:2])):
    expected = numpy_scan(u, delta, A, B, C, D, marks, reverse)
    actual = selective_scan(u, delta, A, B, C, D, resets=marks, method="pallas", chunk_size=16, reverse=reverse)
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_gradients_match_the_float64_sequential_scan(reverse):
  """dB, dC summed over channel blocks and dA over batch rows, across chunk boundaries and resets."""
  arrays = inputs(length=21, channels=CHANNELS, seed=3)
  weights = np.random.default_rng(7).normal(size=arrays[0].shape)
  resets = _resets(*arrays[0].shape[:2])

  def loss(method, *xs):
    y = selective_scan(*xs, resets=resets, method=method, chunk_size=8, reverse=reverse)
    return jnp.sum(y * weights.astype(y.dtype))

  with jax.enable_x64(True):
    reference = jax.grad(lambda *xs: loss("sequential", *xs), argnums=tuple(range(6)))(
        *(jnp.asarray(x, jnp.float64) for x in arrays))
    reference = [np.asarray(g) for g in reference]
  grads = jax.grad(lambda *xs: loss("pallas", *xs), argnums=tuple(range(6)))(*arrays)
  for name, got, want in zip("u delta A B C D".split(), grads, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_backward_pass_keeps_chunk_entry_states_not_every_state():
  batch, length, channels, state = 2, 64, 128, 16
  u, delta, A, B, C, _ = inputs(batch=batch, length=length, channels=channels, state=state)
  every_state = length * channels * state

  def residual_sizes(method):
    _, backward = jax.vjp(lambda *xs: selective_scan(*xs, method=method, chunk_size=16), u, delta, A, B, C)
    return [leaf.size for leaf in jax.tree_util.tree_leaves(backward)]

  assert max(residual_sizes("associative")) >= every_state  # the check sees a [length, channels, state] residual
  sizes = residual_sizes("pallas")
  assert max(sizes) < every_state
  assert batch * (length // 16) * state * channels in sizes  # the state entering each chunk


def test_under_a_mesh_the_kernel_runs_per_shard_and_refuses_split_rows():
  u, delta, A, B, C, D = inputs(length=16)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  rules = (("batch", ("data", "fsdp")),)

  def scan(*xs):
    return selective_scan(*xs, method="pallas", chunk_size=8)

  with partitioning(mesh, rules):
    assert "shard_map" in str(jax.make_jaxpr(scan)(u, delta, A, B, C, D))
    np.testing.assert_allclose(scan(u, delta, A, B, C, D), numpy_scan(u, delta, A, B, C, D), rtol=1e-5, atol=1e-5)
  with partitioning(mesh, rules + (("length", "data"),)), pytest.raises(ValueError, match="whole rows"):
    scan(u, delta, A, B, C, D)


def test_errors():
  u, delta, A, B, C, D = inputs()
  with target.compiling_for("gpu"), pytest.raises(ValueError, match=r"TPU \(Mosaic\) kernel.*scan=chunked"):
    selective_scan(u, delta, A, B, C, D, method="pallas")
  with pytest.raises(ValueError, match="multiple of 128"):
    pallas_scan(u, delta, A, B, C, None, reverse=False, chunk_size=8, channel_block=100)


def _compile_for_tpu(reverse, abstract):
  """The forward scan and its gradient in every input, compiled for the devices `abstract` is placed on."""
  def scan(u, delta, A, B, C, D, marks):
    return selective_scan(u, delta, A, B, C, D, resets=marks, method="pallas", reverse=reverse)

  def loss(*xs):
    return jnp.sum(scan(*xs) ** 2)

  with target.compiling_for("tpu"):
    return (jax.jit(scan).lower(*abstract).compile(),
            jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*abstract).compile())


@needs_libtpu
def test_kernel_compiles_for_tpu_with_mosaic():
  """Forward and gradient, both directions with resets, compiled for one v5e chip: a Mosaic custom call each way,
  and temporaries far below one [length, channels, state] array of states per row; then with rows split over a
  v5e:2x2 slice."""
  from ast_jax.parallel.topology import parse_topology, topology_devices

  devices = topology_devices(parse_topology("v5e:2x2"))
  batch, length, channels, state = 4, 200, 256, 16
  arrays = (*inputs(batch=batch, length=length, channels=channels, state=state), _resets(batch, length))
  one_chip = jax.sharding.SingleDeviceSharding(devices[0])
  for reverse in (False, True):
    jax.eval_shape(functools.partial(selective_scan, method="pallas", reverse=reverse), *arrays[:6],
                   resets=arrays[6])  # a CPU trace, which the TPU compile must not reuse
    forward, backward = _compile_for_tpu(reverse, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_chip)
                                                   for x in arrays])
    assert "tpu_custom_call" in forward.as_text()
    assert backward.as_text().count('custom_call_target="tpu_custom_call"') == 2  # the forward and adjoint kernels
    assert backward.memory_analysis().temp_size_in_bytes < batch * length * channels * state * 4 / 4

  mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
  rows, whole = (jax.sharding.NamedSharding(mesh, PartitionSpec(*spec)) for spec in (("data",), ()))
  abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
              for x, sharding in zip(arrays, (rows, rows, whole, rows, rows, whole, rows))]
  with partitioning(mesh, (("batch", "data"), ("length", None))):
    forward, backward = _compile_for_tpu(True, abstract)
  assert "tpu_custom_call" in forward.as_text() and "tpu_custom_call" in backward.as_text()
