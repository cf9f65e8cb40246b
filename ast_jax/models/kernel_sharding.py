"""Where a Pallas kernel runs under a mesh: XLA cannot partition a Mosaic call, so a kernel runs in a `jax.shard_map`
over the mesh the step is traced under (`jax.set_mesh`), each device on its own rows (and heads), as the logical
axis rules in scope (`nn.logical_axis_rules`) split them. The kernels need whole rows: a rule that splits the
length is refused."""

from __future__ import annotations

import math

import flax.linen as nn
import jax


def context_mesh() -> jax.sharding.AbstractMesh | None:
  """The mesh in scope, or None when the step is traced without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def mesh_axes(name: str) -> str | tuple[str, ...] | None:
  """The mesh axes the logical rules in scope give `name` (None: replicated)."""
  return nn.logical_to_mesh_axes((name,))[0]


def require_whole_rows(kernel: str, alternative: str) -> None:
  """Raises when the 'length' rule shards rows over a mesh axis (sequence parallelism)."""
  if mesh_axes("length") is not None:
    raise ValueError(f"{kernel} needs whole rows on each device, but the 'length' rule shards them over "
                     f"{mesh_axes('length')!r}; map 'length' to None or use {alternative}")


def split_axes(name: str, size: int, mesh: jax.sharding.AbstractMesh) -> str | tuple[str, ...] | None:
  """`name`'s mesh axes for a dimension of `size`, or None where they do not divide it (initialisation traces one
  example: it runs whole on every device)."""
  axes = mesh_axes(name)
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if size % math.prod(mesh.shape[axis] for axis in names) == 0 else None
