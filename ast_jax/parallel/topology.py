"""TPU pod topologies as compile targets: the devices of a pod slice, without the pod.

With libtpu installed (`requirements-tpu.txt`), `jax.experimental.topologies` describes the chips of any TPU slice
on any host: `jax.jit(f).lower(...).compile()` over a mesh of those devices yields the executable the slice would
run, with XLA's memory and cost analyses, but nothing can execute. `python -m ast_jax.compile` builds on this.

Names are `<generation>:<chips per dimension>`, as JAX and libtpu spell slice shapes: `v5e:16x16` is a full v5e
pod (v5litepod-256), `v5p:4x4x4` a v5p-128, `v4:4x4x4` a v4-128, `v6e:8x8` a v6e-64. v4 and v5p chips run as one
device each (megacore); every listed generation's hosts drive a 2x2 block of chips (4 chips per host) in pods.

Chip figures (Google Cloud TPU system architecture pages: per chip, bf16 peak, HBM capacity and bandwidth) feed
the roofline estimates of the compile report; they are the vendor's numbers, not measurements.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GIB = 2**30


class TopologyError(RuntimeError):
  """A topology that cannot be described here: libtpu missing, or a slice libtpu does not know."""


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # as in topology names
  device_kind: str  # jax.Device.device_kind
  peak_flops: float  # bf16 FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  megacore: bool  # two TensorCores run as one device
  slice_name: str  # how Cloud names a slice: f"{slice_name}-{count}" (v4, v5p count TensorCores)
  cores_per_chip: int = 1


CHIPS = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200e9, True, "v4", 2),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, False, "v5litepod"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * 10**9, 2765e9, True, "v5p", 2),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1640e9, False, "v6e"),
}
# libtpu's own generation names for a topology string
_LIBTPU_NAMES = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
HOST_CHIPS = (2, 2, 1)  # chips per host in each dimension, for the slices above


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # e.g. 'v5e:16x16'
  chip: Chip
  shape: tuple[int, ...]  # chips per dimension

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host in each of three dimensions (a slice smaller than a host's block has one host)."""
    shape = self.shape + (1,) * (3 - len(self.shape))
    return tuple(min(size, host) for size, host in zip(shape, HOST_CHIPS))

  @property
  def num_hosts(self) -> int:
    return self.num_chips // math.prod(self.host_bounds)

  @property
  def slice_name(self) -> str:
    """Cloud's name of the slice, e.g. 'v5litepod-256', 'v5p-128' (v4 and v5p count TensorCores)."""
    return f"{self.chip.slice_name}-{self.num_chips * self.chip.cores_per_chip}"


def parse_topology(name: str) -> Topology:
  """'v5e:16x16' -> Topology; a clear error for an unknown generation or a malformed shape."""
  generation, _, dims = name.partition(":")
  if generation not in CHIPS:
    raise ValueError(f"unknown TPU generation {generation!r} in topology {name!r}; known: {sorted(CHIPS)} "
                     "(e.g. v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:8x8)")
  if not re.fullmatch(r"\d+(x\d+){1,2}", dims):
    raise ValueError(f"topology {name!r}: expected <generation>:<chips per dimension>, e.g. {generation}:2x2")
  shape = tuple(int(size) for size in dims.split("x"))
  if min(shape) < 1:
    raise ValueError(f"topology {name!r}: every dimension needs at least one chip")
  return Topology(name, CHIPS[generation], shape)


def topology_devices(topology: Topology) -> list[Any]:
  """The compile-only devices of `topology` (needs libtpu; no TPU is used or needed)."""
  try:
    import libtpu  # noqa: F401 - only to give a clear message when it is missing
  except ImportError:
    raise TopologyError("compiling for a TPU topology needs libtpu: pip install -r requirements-tpu.txt") from None
  # A host with no TPU chips has no hostnames or accelerator type for libtpu to read; these defaults keep its start
  # quiet and let several processes compile at once (each takes the TPU lock file otherwise). Real TPU hosts set
  # their own values and are left alone.
  from jax._src import hardware_utils

  if not hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  full_torus = len(topology.shape) == 3 and all(size % 4 == 0 for size in topology.shape)
  libtpu_name = f"{_LIBTPU_NAMES[topology.chip.generation]}:{'x'.join(map(str, topology.shape))}"
  try:
    description = topologies.get_topology_desc(
        libtpu_name, "tpu", chip_config_name="megacore" if topology.chip.megacore else "default",
        chips_per_host_bounds=topology.host_bounds, num_slices=1,
        wrap=(full_torus,) * 3)
  except Exception as error:  # noqa: BLE001 - libtpu's runtime error type differs between releases
    raise TopologyError(f"libtpu cannot describe the slice {topology.name}: {str(error).splitlines()[0]}") from None
  devices = list(description.devices)
  if len(devices) != topology.num_chips:
    raise TopologyError(f"libtpu describes {len(devices)} devices for {topology.name}, expected {topology.num_chips}")
  return devices


def chip_of(device_kind: str) -> Chip | None:
  """The chip whose `device_kind` is `device_kind` (None for CPUs, GPUs and unknown kinds)."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None
