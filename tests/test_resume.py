"""Exact resume: a run killed with SIGKILL in its second epoch and started again with the same command ends with the
same metrics and parameters as a run that was never interrupted (demo config, CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 24
OVERRIDES = [
    "--config.data.num_train_examples=192", "--config.data.num_eval_examples=40", "--config.data.batch_size=8",
    "--config.data.eval_batch_size=16", "--config.train.epochs=3", "--config.train.log_every_steps=1",
    "--config.train.progress_bar=False", "--config.model.width=32", "--config.model.depth=1",
    "--config.model.num_heads=2", "--config.augment.mixup=0.5", "--config.train.average_weights=(2, 3)",
]


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *OVERRIDES]


def run_to_end(workdir: str) -> None:
  subprocess.run(command(workdir), cwd=ROOT, check=True, capture_output=True, timeout=300)


def run_and_kill_in_epoch_two(workdir: str) -> None:
  """Starts the run and SIGKILLs it at the first step it logs after the epoch-1 checkpoint has been committed
  (saves are asynchronous; a kill before the commit would restart from scratch and test less)."""
  process = subprocess.Popen(command(workdir), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True)
  committed = os.path.join(workdir, "checkpoints", str(STEPS_PER_EPOCH))
  killed_at = None
  try:
    for line in process.stderr:
      match = re.search(r"step (\d+)/", line)
      if match and int(match.group(1)) > STEPS_PER_EPOCH and os.path.isdir(committed):
        process.send_signal(signal.SIGKILL)
        killed_at = int(match.group(1))
        break
  finally:
    process.wait(timeout=300)
  assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert killed_at < 2 * STEPS_PER_EPOCH, f"killed at step {killed_at}, after epoch 2"


def final_params(workdir: str) -> dict:
  checkpoints = os.path.join(workdir, "checkpoints")
  last = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(checkpoints, str(last), "state"))
  return restored["params"]


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as handle:
    lines = [json.loads(line) for line in handle]
  wall_clock = ("examples_per_sec", "tokens_per_sec", "mfu", "seconds")  # seconds: the phase ledger's wall time
  return [{key: value for key, value in line.items() if not key.endswith(wall_clock)} for line in lines]


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_sigkill_in_epoch_two_then_rerun_matches_uninterrupted(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  run_to_end(straight)
  run_and_kill_in_epoch_two(resumed)
  checkpoints = sorted(int(n) for n in os.listdir(os.path.join(resumed, "checkpoints")) if n.isdigit())
  assert checkpoints == [STEPS_PER_EPOCH], f"expected only the epoch-1 checkpoint after the kill, got {checkpoints}"
  run_to_end(resumed)

  expected, actual = records(straight), records(resumed)
  assert [r["epoch"] for r in actual] == [1, 2, 3, 3]  # three epochs, then the averaged weights; no duplicates
  assert actual == expected
  straight_params, resumed_params = final_params(straight), final_params(resumed)
  for a, b in zip(jax.tree.leaves(straight_params), jax.tree.leaves(resumed_params)):
    np.testing.assert_array_equal(a, b)

  # A finished run started again does nothing: no new records, no new checkpoints.
  before = open(os.path.join(resumed, "metrics.jsonl")).read()
  run_to_end(resumed)
  assert open(os.path.join(resumed, "metrics.jsonl")).read() == before
