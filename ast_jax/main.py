"""Train and evaluate: `python -m ast_jax.main --config=configs/X.py[:arg] [--config.key=value] [--workdir=DIR]`.

Re-running the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

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
flags.mark_flags_as_required(["config"])


def default_workdir(config_argument: str) -> str:
  """workdirs/<config file stem>[_<arg>]: a fixed place, so that re-running a command resumes it."""
  path, _, arg = config_argument.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{name}_{arg}" if arg else name)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)  # our progress; library chatter (Orbax, JAX) stays at WARNING
  if _DISTRIBUTED.value:
    from ast_jax.parallel import distributed

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
  from ast_jax.audio import AudioError
  from ast_jax.data import DataError
  from ast_jax.train.config_checks import ConfigError
  from ast_jax.train.trainer import train_and_evaluate  # after distributed init: it touches devices

  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
  logging.getLogger("ast_jax").info("workdir %s", os.path.abspath(workdir))
  try:
    record = train_and_evaluate(_CONFIG.value, workdir)
  except (ConfigError, DataError, AudioError, FileNotFoundError) as error:  # bad input: the message, without a traceback
    print(f"error: {error}", file=sys.stderr, flush=True)
    # A multi-process run exits at once rather than wait in jax.distributed's shutdown barrier for its peers.
    os._exit(1) if _DISTRIBUTED.value else sys.exit(1)
  print(json.dumps({"workdir": workdir, **record}))


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # 15-30 % faster CPU steps (ast_jax/runtime.py)
  app.run(main)
