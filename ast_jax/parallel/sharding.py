"""Sharding as data: logical axis names on parameters and activations, one rules table mapping them to mesh axes.

Parameters are created with `nn.with_logical_partitioning` (names such as 'embed', 'mlp', 'heads', 'layers') and
activations constrained with `nn.with_logical_constraint` ('batch', 'length', 'act_embed', 'act_heads', 'act_mlp');
input batches are placed by the 'batch' rule (`mesh.py:batch_sharding`). The rules table (`config.sharding_rules`,
defaults in configs/common.py) maps each name to a mesh axis, several, or None; a name it does not mention is
replicated. Changing parallelism is a config edit. The default table gives FSDP over `fsdp` ('embed' dimensions of
parameters sharded, batch split over data x fsdp) and Megatron-style tensor parallelism over `tensor` (heads and
MLP columns split; the attention's kernels are laid out per head, `[embed, 3, heads, head_dim]` and
`[heads, head_dim, embed]`, so a split never falls between q, k and v).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

Rules = Sequence[tuple[str, Any]]


def logical_rules(config_rules: Rules) -> tuple[tuple[str, Any], ...]:
  """The config's table as Flax takes it (lists of mesh axes, as a JSON round trip leaves them, become tuples)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config_rules)


@contextlib.contextmanager
def partitioning(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """The context in which step functions are traced: the mesh (Auto axes) and the logical rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def shardings_of(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may be boxed with logical names (unboxed leaves are replicated)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (which returns a tree with logically boxed leaves) so that every leaf is created
  directly in its shard, never whole on one device. Returns (unboxed tree, its shardings)."""
  with partitioning(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = shardings_of(abstract, mesh, rules)
    tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def put_host_tree(tree: Any, shardings: Any) -> Any:
  """Places a tree of host arrays (identical on every process) on the mesh under `shardings`."""
  def put(value: Any, sharding: NamedSharding) -> jax.Array:
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(put, tree, shardings)


def describe(shardings: Any) -> dict[str, str]:
  """{'encoder/blocks_0/mlp/fc1/kernel': "PartitionSpec('fsdp', 'tensor')", ...} for logs and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {"/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path): str(sharding.spec)
          for path, sharding in flat}


def to_host(tree: Any) -> Any:
  """Whole numpy copies of a tree of (possibly sharded, possibly multi-host) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)  # tiled: whole global arrays, not stacked


def sharded_jit(fn: Callable[..., Any], mesh: Mesh, rules: Rules, **jit_kwargs: Any) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, traced under the mesh and the rules so that logical constraints apply. Like a
  jitted function, the result has `.lower(*args)` (to read the compiled program)."""
  jitted = jax.jit(fn, **jit_kwargs)

  def call(*args: Any) -> Any:
    with partitioning(mesh, rules):
      return jitted(*args)

  def lower(*args: Any) -> Any:
    with partitioning(mesh, rules):
      return jitted.lower(*args)

  call.lower = lower
  return call
