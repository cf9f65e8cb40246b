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


def command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *OVERRIDES,
          *extra]


def run_to_end(workdir: str, *extra: str) -> None:
  subprocess.run(command(workdir, *extra), cwd=ROOT, check=True, capture_output=True, timeout=300)


def run_and_kill_in_epoch_two(workdir: str, *extra: str, after_checkpoint: int = STEPS_PER_EPOCH) -> None:
  """Starts the run and SIGKILLs it at the first step it logs after the checkpoint at step `after_checkpoint` has
  been committed (saves are asynchronous; a kill before the commit would restart earlier and test less)."""
  process = subprocess.Popen(command(workdir, *extra), cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True)
  committed = os.path.join(workdir, "checkpoints", str(after_checkpoint))
  killed_at = None
  try:
    for line in process.stderr:
      match = re.search(r"step (\d+)/", line)
      if match and int(match.group(1)) > after_checkpoint and os.path.isdir(committed):
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


@pytest.mark.slow  # the default run kills and resumes in tests/test_faults.py
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


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_sigkill_inside_the_second_phase_resumes_there(tmp_path):
  """Coarse-to-fine: one epoch max-pooled 2x along time, then two at full resolution. Killed after the checkpoint at
  step 30 (inside the second phase), the run resumes at step 30 in the second phase and ends as the uninterrupted
  run does."""
  phases = ["--config.train.phases=max_pool:2:1, full:1:2", "--config.train.checkpoint_every_steps=30"]
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  run_to_end(straight, *phases)
  run_and_kill_in_epoch_two(resumed, *phases, after_checkpoint=30)
  checkpoints = sorted(int(n) for n in os.listdir(os.path.join(resumed, "checkpoints")) if n.isdigit())
  assert checkpoints[-1] == 30, checkpoints
  log = subprocess.run(command(resumed, *phases), cwd=ROOT, check=True, capture_output=True, text=True,
                       timeout=300).stderr
  assert "restored checkpoint at step 30" in log and "phase 2/2 (full), model" in log
  assert "phase 1/2 (max_pool x2), model" not in log  # resumed in the second phase, not before it
  expected, actual = records(straight), records(resumed)
  assert [r["phase"] for r in actual] == ["max_pool x2", "full", "full", "full"]  # the last: averaged weights
  assert actual == expected
  for a, b in zip(jax.tree.leaves(final_params(straight)), jax.tree.leaves(final_params(resumed))):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_other_shapes_is_refused_and_left_in_place(tmp_path):
  """A checkpoint written for another model (or the earlier fused attention layout) is intact: the run stops with
  a message naming the first array that differs and how to go on; nothing is moved aside."""
  from ast_jax.train.checkpoint import CheckpointMismatch, Checkpointer

  fused = {"params": {"attn": {"qkv": np.ones((8, 24), np.float32)}}, "step": np.asarray(5, np.int32)}
  per_head = {"params": {"attn": {"qkv": np.zeros((8, 3, 2, 4), np.float32)}}, "step": np.asarray(0, np.int32)}
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
  checkpointer.save(5, fused, None, {})
  checkpointer.wait()
  with pytest.raises(CheckpointMismatch, match=r"params/attn/qkv: saved \[8, 24\], model \[8, 3, 2, 4\]"):
    checkpointer.restore(per_head, None)
  assert checkpointer.latest_step() == 5 and not (tmp_path / "corrupt_checkpoints").exists()
  state, _ = checkpointer.restore(fused, None)
  np.testing.assert_array_equal(state["params"]["attn"]["qkv"], fused["params"]["attn"]["qkv"])
  checkpointer.close()
