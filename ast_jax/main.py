"""Train and evaluate: `python -m ast_jax.main --config=configs/X.py[:arg] [--config.key=value] [--workdir=DIR]`.

Re-running the same command resumes from the latest checkpoint in the workdir. A run stopped by SIGTERM (a
scheduler's preemption or time-limit notice) saves a checkpoint where it stops and exits with status 75
(`ast_jax.train.preemption.PREEMPTED_EXIT_CODE`); the launch scripts run it again (launch/README.md). Ctrl-C prints
one line naming the checkpoint a rerun resumes from and exits with status 130 (`ast_jax/train/interrupt.py`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ast_jax.train import interrupt

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file, optionally ':arg'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard logs go here "
                               "(default: workdirs/<config name>[_<arg>]).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed) first. On TPU "
                                 "pods and SLURM the cluster is detected; elsewhere give the flags below or the "
                                 "AST_JAX_COORDINATOR, AST_JAX_NUM_PROCESSES, AST_JAX_PROCESS_ID variables.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0-based (with --distributed).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Accelerators this process drives, e.g. 0,1,2,3 "
                                      "(with --distributed; default: all, one per task under SLURM on GPUs).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (overrides applied), each field "
                                  "with its one-line meaning, and exit without training.")
flags.mark_flags_as_required(["config"])


def default_workdir(config_argument: str) -> str:
  """workdirs/<config file stem>[_<arg>]: a fixed place, so that re-running a command resumes it."""
  path, _, arg = config_argument.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{name}_{arg}" if arg else name)


def failure_message(error: Exception) -> str | None:
  """The one-line message for an error that ends a run without a traceback (bad input, a full or unwritable disk,
  a run stopped for non-finite numbers); None for a bug, which keeps its traceback."""
  from ast_jax.audio import AudioError
  from ast_jax.data import DataError
  from ast_jax.train.checkpoint import CheckpointMismatch, CheckpointWriteError
  from ast_jax.train.config_checks import ConfigError
  from ast_jax.train.trainer import TrainingStopped

  if isinstance(error, (ConfigError, DataError, AudioError, FileNotFoundError, TrainingStopped,
                        CheckpointWriteError, CheckpointMismatch)):
    return str(error)
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
    return (f"cannot write {error.filename or 'to the workdir'}: {error.strerror}. The checkpoints written so far "
            "are complete: free space (or fix permissions) and run the same command again to resume.")
  return None


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:
    from ast_jax.config_help import describe

    print(describe(_CONFIG.value, flags.FLAGS["config"].serialize().partition("=")[2]))
    return
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
  interrupt.install(os.path.join(workdir, "checkpoints"))  # first: before any thread or worker process starts
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)  # our progress; library chatter (Orbax, JAX) stays at WARNING
  if _DISTRIBUTED.value:
    from ast_jax.parallel import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
  from ast_jax.train.preemption import PREEMPTED_EXIT_CODE
  from ast_jax.train.trainer import Preempted, train_and_evaluate  # after distributed init: it touches devices

  logging.getLogger("ast_jax").info("workdir %s", os.path.abspath(workdir))
  try:
    record = train_and_evaluate(_CONFIG.value, workdir)
  except Preempted as stop:
    if interrupt.requested():  # Ctrl-C stopped it as SIGTERM does, with a checkpoint at the step where it stopped
      interrupt.exit_now(stop.step)
    print(f"preempted: checkpoint of step {stop.step} saved in {workdir}; run the same command to resume",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    end_workers()
    os._exit(PREEMPTED_EXIT_CODE)  # at once, as on a failure below: no wait in jax.distributed's shutdown
  except Exception as error:  # noqa: BLE001 - bad input or a run that stopped itself: the message, no traceback
    message = failure_message(error)
    if message is None:
      raise
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    end_workers()
    # Exit at once: a multi-process run rather than wait in jax.distributed's shutdown barrier for its peers, and
    # any run rather than print library threads' own reports of the same failure after the message.
    os._exit(1)
  print(json.dumps({"workdir": workdir, **record}))


def end_workers() -> None:
  """Ends this process's input worker processes (Grain's), which `os._exit` would leave running."""
  import multiprocessing

  for child in multiprocessing.active_children():
    child.terminate()


if __name__ == "__main__":
  from ast_jax import overrides, runtime

  overrides.exit_on_unknown(sys.argv)  # a misspelt --config.key: one line naming it, before anything loads
  runtime.restart_with_tcmalloc()  # 15-30 % faster CPU steps (ast_jax/runtime.py)
  app.run(main)
