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
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs). "
                                 "On TPU pods and SLURM the cluster is detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0-based (with --distributed).")
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
    import jax

    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from ast_jax.audio import AudioError
  from ast_jax.data import DataError
  from ast_jax.train.config_checks import ConfigError
  from ast_jax.train.trainer import train_and_evaluate  # after distributed init: it touches devices

  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().partition("=")[2])
  logging.getLogger("ast_jax").info("workdir %s", os.path.abspath(workdir))
  try:
    record = train_and_evaluate(_CONFIG.value, workdir)
  except (ConfigError, DataError, AudioError, FileNotFoundError) as error:  # bad input: the message, without a traceback
    sys.exit(f"error: {error}")
  print(json.dumps({"workdir": workdir, **record}))


if __name__ == "__main__":
  app.run(main)
