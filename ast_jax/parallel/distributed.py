"""Multi-host start-up: one call to `jax.distributed.initialize` before anything touches a device.

Where the arguments come from, first match wins:
  1. the arguments (`python -m ast_jax.main --distributed --coordinator_address=... --num_processes=...
     --process_id=...`);
  2. the environment: `AST_JAX_COORDINATOR` (host:port of process 0), `AST_JAX_NUM_PROCESSES`,
     `AST_JAX_PROCESS_ID` (0-based), as `launch/local.py` sets them; JAX itself also reads
     `JAX_COORDINATOR_ADDRESS` and `JAX_LOCAL_DEVICE_IDS`;
  3. JAX's cluster detection, for whatever is still unset: Cloud TPU VMs (the pod's metadata), SLURM (`SLURM_*`
     under `srun`), Open MPI and Kubernetes (JobSet).
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import Sequence

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "AST_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "AST_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "AST_JAX_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> None:
  """Joins this process to the multi-controller runtime (idempotent: a second call only logs)."""
  if jax.distributed.is_initialized():
    log.info("jax.distributed is already initialised")
    return
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  if _may_run_on_cpu():
    _use_cpu_collectives()
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=list(local_device_ids) if local_device_ids else None)
  log.info("process %d of %d: %d local devices, %d global devices (%s)", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  if jax.process_count() > 1:
    _exit_at_once_on_uncaught_exception()


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _may_run_on_cpu() -> bool:
  """False only when JAX_PLATFORMS / jax_platforms rules the CPU out (the backend is not up yet to ask)."""
  platforms = jax.config.jax_platforms
  return not platforms or "cpu" in platforms.split(",")


def _use_cpu_collectives() -> None:
  """Cross-process collectives on CPU (psum, all-gather) need an implementation; without one they fail."""
  # gloo (over TCP, rendezvous through the coordinator) is JAX 0.10's default; set it where it is unset, and leave
  # a user's choice (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi) alone. It must precede the CPU backend's creation.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _exit_at_once_on_uncaught_exception() -> None:
  """A process that fails ends now, so that its launcher (local.py, srun, the pod) sees the failure and stops the
  others; a normal exit would wait in jax.distributed's shutdown barrier for peers that wait on it in a collective."""
  previous_hook = sys.excepthook

  def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    previous_hook(kind, error, traceback)
    log.error("process %d failed; exiting without waiting for the other processes", jax.process_index())
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook
