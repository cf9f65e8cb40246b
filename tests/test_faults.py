"""Fault injection: runs killed with SIGKILL during a step, an evaluation or an asynchronous checkpoint save, latest
checkpoints corrupted on disk, and non-finite losses. Each resumed run must end with the parameters and metrics of a
run that was never interrupted (demo config, CPU, same seed); a run with too many non-finite steps must stop with a
clear message and its checkpoints intact.

Faults are armed with AST_JAX_FAULTS (ast_jax/train/faults.py). The runs share a persistent compilation cache, so
only the first compiles."""

from __future__ import annotations

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 24  # 192 examples / batch 8; 3 epochs; a checkpoint every 12 steps, all kept
OVERRIDES = [
    "--config.data.num_train_examples=192", "--config.data.num_eval_examples=40", "--config.data.batch_size=8",
    "--config.data.eval_batch_size=16", "--config.train.epochs=3", "--config.train.log_every_steps=1",
    "--config.train.progress_bar=False", "--config.model.width=32", "--config.model.depth=1",
    "--config.model.num_heads=2", "--config.augment.mixup=0.5", "--config.train.average_weights=(2, 3)",
    "--config.train.checkpoint_every_steps=12", "--config.train.keep_checkpoints=10", "--config.train.tensorboard=False",
]
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> dict[str, str]:
  cache = str(tmp_path_factory.mktemp("compilation_cache"))
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "AST_JAX_FAULTS": ""}


def run(environment: dict[str, str], workdir: str, faults: str = "", *extra: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *OVERRIDES,
             *extra]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**environment, "AST_JAX_FAULTS": faults})


def run_killed(environment: dict[str, str], workdir: str, faults: str, *extra: str) -> str:
  result = run(environment, workdir, faults, *extra)
  assert result.returncode == -signal.SIGKILL, f"{faults}: the run was not killed\n{result.stderr[-3000:]}"
  assert "fault injected: SIGKILL" in result.stderr
  return result.stderr


def run_to_end(environment: dict[str, str], workdir: str, *extra: str) -> str:
  result = run(environment, workdir, "", *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


@pytest.fixture(scope="module")
def straight(environment, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("straight"))
  run_to_end(environment, workdir)
  return workdir


def steps(workdir: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def restore(workdir: str, step: int | None = None) -> dict:
  """The raw state tree of checkpoint `step` (default: the latest)."""
  import orbax.checkpoint as ocp

  step = steps(workdir)[-1] if step is None else step
  return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as handle:
    lines = [json.loads(line) for line in handle]
  wall_clock = ("examples_per_sec", "tokens_per_sec", "mfu", "seconds")
  return [{key: value for key, value in line.items() if not key.endswith(wall_clock)} for line in lines]


def assert_same_run(straight: str, resumed: str) -> None:
  assert records(resumed) == records(straight)
  expected, actual = restore(straight), restore(resumed)
  assert int(actual["step"]) == int(expected["step"]) == 3 * STEPS_PER_EPOCH
  for a, b in zip(jax.tree.leaves(expected["params"]), jax.tree.leaves(actual["params"])):
    np.testing.assert_array_equal(a, b)


def test_killed_during_a_step_an_evaluation_and_a_save_resumes_to_the_uninterrupted_result(environment, straight,
                                                                                          tmp_path):
  """One workdir, killed three times (as a preemptible machine may be), then run to the end. The step of the first
  kill is drawn at random; the message names it."""
  kill_step = random.Random().randint(13, 2 * STEPS_PER_EPOCH - 1)
  workdir = str(tmp_path / "resumed")
  run_killed(environment, workdir, f"kill@step:{kill_step}")
  assert all(step <= kill_step for step in steps(workdir)), f"killed at step {kill_step}: {steps(workdir)}"

  log = run_killed(environment, workdir, f"kill@eval:{2 * STEPS_PER_EPOCH}")
  assert "during the evaluation at step 48" in log, f"first kill at step {kill_step}"
  assert 2 * STEPS_PER_EPOCH not in steps(workdir)  # the epoch's checkpoint comes after its evaluation

  log = run_killed(environment, workdir, f"kill@save:{2 * STEPS_PER_EPOCH}")
  assert "while the checkpoint of step 48 is being written" in log
  half_written = glob.glob(os.path.join(workdir, "checkpoints", "48.orbax-checkpoint-tmp*"))
  assert half_written and steps(workdir)[-1] == 36, (steps(workdir), half_written)

  log = run_to_end(environment, workdir)
  assert "restored checkpoint at step 36" in log  # not the half-written 48
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))  # removed on restart
  assert_same_run(straight, workdir)

  # A finished run started again does nothing: no new records, no new checkpoints.
  before = records(workdir), steps(workdir)
  run_to_end(environment, workdir)
  assert (records(workdir), steps(workdir)) == before



@pytest.mark.slow
def test_killed_at_random_moments_then_finished(environment, straight, tmp_path):
  """Five attempts, each SIGKILLed from outside at a random moment 0-3 s after it logs its first training step (in
  steps, evaluations, saves: wherever it lands), then the same command to the end: the result is the uninterrupted
  run's."""
  rng, workdir, kills = random.Random(), str(tmp_path / "resumed"), []
  command = [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *OVERRIDES]
  for attempt in range(5):
    log_path = tmp_path / f"attempt_{attempt}.log"
    with open(log_path, "w") as log:
      process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, env=environment)
      while process.poll() is None and not re.search(r"step \d+/", log_path.read_text()):
        time.sleep(0.02)
      delay = rng.uniform(0.0, 3.0)
      try:
        process.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        logged = re.findall(r"step (\d+)/", log_path.read_text())
        kills.append({"after_s": round(delay, 2), "last_logged_step": int(logged[-1]), "checkpoints": steps(workdir)})
    if process.returncode == 0:
      break
  run_to_end(environment, workdir)
  print(f"{len(kills)} kills: {kills}")
  assert kills
  assert_same_run(straight, workdir)

def flip_one_bit(path: str) -> None:
  with open(path, "r+b") as handle:
    data = bytearray(handle.read())
    data[len(data) // 2] ^= 0x10
    handle.seek(0)
    handle.write(data)


def test_corrupt_latest_checkpoints_are_moved_aside_and_the_previous_one_used(environment, straight, tmp_path):
  """Killed at step 62: checkpoints up to 60 (or 48, if the save of 60 had not committed). The latest gets one
  flipped bit in its largest array file, which Orbax restores without complaint (the digest catches it); the one
  before loses its iterator state. The run warns about both, resumes from the third latest and ends as the
  uninterrupted run."""
  workdir = str(tmp_path / "resumed")
  run_killed(environment, workdir, "kill@step:62")
  *_, earlier, previous, latest = steps(workdir)
  arrays = glob.glob(os.path.join(workdir, "checkpoints", str(latest), "state", "ocdbt.process_0", "d", "*"))
  flip_one_bit(max(arrays, key=os.path.getsize))
  os.remove(glob.glob(os.path.join(workdir, "checkpoints", str(previous), "data", "*.json"))[0])

  log = run_to_end(environment, workdir)
  assert f"checkpoint {latest} is unusable" in log and "differ from the digest" in log, log[-3000:]
  assert f"checkpoint {previous} is unusable" in log
  assert f"restored checkpoint at step {earlier}" in log
  moved = sorted(int(name.split("-")[0]) for name in os.listdir(os.path.join(workdir, "corrupt_checkpoints")))
  assert moved == [previous, latest]
  assert_same_run(straight, workdir)



@pytest.mark.slow
def test_with_every_checkpoint_corrupt_the_run_starts_from_the_beginning(environment, straight, tmp_path):
  workdir = str(tmp_path / "resumed")
  run_killed(environment, workdir, "kill@eval:48")
  for step in steps(workdir):
    arrays = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
    flip_one_bit(max(arrays, key=os.path.getsize))
  corrupted = steps(workdir)
  assert corrupted
  log = run_to_end(environment, workdir)
  assert "no earlier checkpoint is left: the run starts from the beginning" in log
  assert "restored checkpoint" not in log
  assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == len(corrupted)
  assert_same_run(straight, workdir)

def test_non_finite_steps_are_skipped_and_counted(environment, tmp_path):
  """NaN waveforms in the batches of steps 5, 40 and 41: those updates are skipped and counted, nothing else
  changes, and the run completes with finite parameters and losses."""
  workdir = str(tmp_path / "nan")
  result = run(environment, workdir, "nan@step:5,nan@step:40-41", "--config.train.max_consecutive_skips=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "loss nan" in result.stderr  # the poisoned steps' own loss is logged as it is
  final = records(workdir)
  assert [r["skipped_steps"] for r in final] == [1, 3, 3, 3]
  assert all(np.isfinite(r["train_loss"]) for r in final)
  state = restore(workdir)
  assert int(state["skipped_steps"]) == 3 and int(state["consecutive_skips"]) == 0
  assert int(state["longest_skip_run"]) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_too_many_consecutive_non_finite_steps_stop_the_run_with_its_checkpoint_intact(environment, straight,
                                                                                      tmp_path):
  """NaN from step 30 on, at most 3 in a row: the run stops at step 32 with one clear line, writes no checkpoint
  after the limit, and its last checkpoint (24) equals the uninterrupted run's."""
  workdir = str(tmp_path / "diverged")
  result = run(environment, workdir, "nan@step:30-72", "--config.train.max_consecutive_skips=3")
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("error: 3 consecutive training steps had a non-finite loss or gradient"), message
  assert "The last checkpoint (step 24) is intact" in message and "Traceback" not in result.stderr
  assert steps(workdir) == [12, 24]
  expected, actual = restore(straight, 24), restore(workdir, 24)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 10 s; the pre-flight checks of a full or unwritable workdir run in tests/test_config_errors.py
def test_a_disk_that_fills_mid_run_stops_it_cleanly_and_the_run_resumes_once_there_is_room(environment, straight,
                                                                                           tmp_path):
  """The workdir on a 1.5 MB tmpfs: the pre-flight check passes, a later checkpoint does not fit. The run stops with
  one message naming the last complete checkpoint, leaves no half-written checkpoint visible, and run again with
  room (the same command) ends as the uninterrupted run."""
  mount = str(tmp_path / "disk")
  os.makedirs(mount)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", mount], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    workdir = os.path.join(mount, "run")
    result = run(environment, workdir)
    assert result.returncode == 1, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "No space left on device" in message, message
    committed = steps(workdir)
    assert committed and committed[-1] < 3 * STEPS_PER_EPOCH
    if "the last complete checkpoint is step" in message:
      assert f"the last complete checkpoint is step {committed[-1]}." in message
    subprocess.run(["mount", "-o", "remount,size=50m", mount], check=True)
    log = run_to_end(environment, workdir)
    assert f"restored checkpoint at step {committed[-1]}" in log
    assert_same_run(straight, workdir)
  finally:
    subprocess.run(["umount", "-l", mount], check=False)


# ---------------------------------------------------------------------------------------------- units


def test_a_non_finite_loss_or_gradient_leaves_the_state_alone_and_is_counted():
  import jax.numpy as jnp
  import optax

  from ast_jax.train.state import apply_gradients, create_train_state

  params = {"w": jnp.array([1.0, 2.0])}
  tx = optax.adam(0.1)
  state = create_train_state(params, tx, False)
  good = {"w": jnp.array([1.0, -1.0])}
  for loss, grads, skipped, consecutive, longest in [
      (1.0, good, 0, 0, 0), (jnp.nan, good, 1, 1, 1), (1.0, {"w": jnp.array([jnp.inf, 0.0])}, 2, 2, 2),
      (2.0, good, 2, 0, 2)]:
    before = state
    state, grad_norm = apply_gradients(state, tx, jnp.float32(loss), grads)
    assert (int(state.skipped_steps), int(state.consecutive_skips), int(state.longest_skip_run)) == (
        skipped, consecutive, longest)
    changed = not np.array_equal(state.params["w"], before.params["w"])
    assert changed == bool(consecutive == 0), (loss, grads)
    if consecutive:  # skipped: optimiser moments and the epoch's loss untouched too
      for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)
      assert float(state.epoch_loss_sum) == float(before.epoch_loss_sum)
  assert int(state.step) == 4 and float(state.epoch_loss_count) == 2.0 and float(state.epoch_loss_sum) == 3.0


def test_the_state_digest_changes_with_any_flipped_bit_or_moved_element():
  from ast_jax.train.checkpoint import digest_of

  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int32),
          "c": rng.standard_normal(4).astype(np.float32).astype(jax.numpy.bfloat16)}
  reference = digest_of(tree)
  assert digest_of({k: v.copy() for k, v in tree.items()}) == reference
  for name, array in tree.items():
    for index in range(array.size):
      for bit in (0, 7, array.dtype.itemsize * 8 - 1):
        raw = array.copy().reshape(-1).view(f"u{array.dtype.itemsize}")
        raw[index] ^= raw.dtype.type(1 << bit)
        flipped = {**tree, name: raw.view(array.dtype).reshape(array.shape)}
        assert digest_of(flipped)[sorted(tree).index(name)] != reference[sorted(tree).index(name)], (name, index, bit)
  swapped = tree["a"].copy()
  swapped[0, [0, 1]] = swapped[0, [1, 0]]
  assert digest_of({**tree, "a": swapped})[0] != reference[0]


def test_fault_specs_are_read_strictly():
  from ast_jax.train import faults

  assert faults.parse("kill@save:48, nan@step:3-5,nan@step:9") == {("kill", "save"): {48},
                                                                   ("nan", "step"): {3, 4, 5, 9}}
  assert faults.parse("") == {}
  for bad in ("kill@nowhere:3", "kill@step", "explode@step:1", "nan@step:a-b"):
    with pytest.raises(ValueError, match="AST_JAX_FAULTS"):
      faults.parse(bad)


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
  from ast_jax.train.writers import MetricsWriter

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 24, "loss": 1.5}\n{"step": 48, "loss": 1.2}\n{"step": 72, "lo')
  writer = MetricsWriter(str(tmp_path), resume_step=48, tensorboard=False)
  assert writer.last_record() == {"step": 48, "loss": 1.2}
  assert path.read_text() == '{"step": 24, "loss": 1.5}\n{"step": 48, "loss": 1.2}\n'
