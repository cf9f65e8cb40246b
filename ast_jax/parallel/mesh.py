"""The device mesh. Batches are split over the 'data' axis; training state is replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(devices: list[Any] | None = None) -> Mesh:
  """A one-axis ('data',) mesh over every device of every process."""
  devices = devices if devices is not None else jax.devices()
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays split over the 'data' axis."""
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in host_batch.items()}
