"""The device mesh from the config, and host-local batches placed on it as global arrays.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimiser state sharded over it) and `tensor` (heads and MLP columns split). Which tensor dimension goes to which
axis is the rules table (`config.sharding_rules`, see `sharding.py`); batches are split by its `batch` rule
(`data` x `fsdp` by default).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ast_jax.parallel.sharding import Rules, logical_rules

MESH_AXES = ("data", "fsdp", "tensor")
# The default table's `batch` rule (configs/common.py), for callers that pass no rules.
DEFAULT_BATCH_RULES = (("batch", ("data", "fsdp")),)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves `{'data': -1, 'fsdp': 2, 'tensor': 1}` over `num_devices` (at most one -1: every remaining device)."""
  unknown = [name for name in MESH_AXES if name not in axis_sizes]
  extra = [name for name in axis_sizes if name not in MESH_AXES]
  if unknown or extra:
    raise ValueError(f"config.mesh needs exactly the axes {MESH_AXES}; got {sorted(axis_sizes)}")
  sizes = [int(axis_sizes[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"config.mesh sizes must be positive, with at most one -1; got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are "
                     f"{num_devices}")
  return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: every device of every process).

  Axes are Auto (sharding propagated by XLA from the constraints we place), which Linen's logical partitioning
  needs; `jax.make_mesh` defaults to Explicit axes in newer JAX.
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(axis_sizes if axis_sizes is not None else {"data": -1, "fsdp": 1, "tensor": 1}, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_axes(rules: Rules | None = None) -> tuple[str, ...]:
  """The mesh axes a batch's leading dimension is split over: the rules' `batch` entry (none: replicated)."""
  axes = nn.logical_to_mesh_axes(("batch",), logical_rules(DEFAULT_BATCH_RULES if rules is None else rules))[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  """Leading (batch) dimension split over the `batch` rule's axes (default: data x fsdp); the rest replicated."""
  axes = batch_axes(rules)
  return NamedSharding(mesh, PartitionSpec(axes) if axes else PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: Rules | None = None) -> int:
  """How many ways a batch is split: the product of the `batch` rule's mesh axis sizes."""
  return math.prod(mesh.shape[name] for name in batch_axes(rules))


def global_batch(mesh: Mesh, host_batch: Mapping[str, np.ndarray], rules: Rules | None = None
                 ) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch (its contiguous block, in process order) into global arrays placed
  by the `batch` rule."""
  sharding = batch_sharding(mesh, rules)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in host_batch.items()}
