"""Preemption: a run that receives SIGTERM (a scheduler's notice ahead of the kill) saves a checkpoint after the step
it is on, exits with status 75, and the same command run again ends exactly as a run that was never interrupted. In
a multi-process run SIGTERM reaches one process only and every process stops after the same step.

The SIGTERM comes from the run itself (AST_JAX_FAULTS=term@step:S, ast_jax/train/faults.py), right after step S is
dispatched; in the two-process runs only process 1 has the fault armed.

Ctrl-C (ast_jax/train/interrupt.py), sent to the run's process group as a terminal does: one line, exit status 130,
no traceback or crash, and a rerun resumes from the checkpoint the line names."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from ast_jax.train import faults
from ast_jax.train.interrupt import INTERRUPTED_EXIT_CODE
from ast_jax.train.preemption import PREEMPTED_EXIT_CODE, SIGNAL, PreemptionWatch
from launch import local
from tests.test_faults import OVERRIDES, ROOT, STEPS_PER_EPOCH, environment, records, steps  # noqa: F401, F811
from tests.test_multihost import cpu_env, write_program

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")

# Checkpoints at the epochs' ends only, so that the one at the preempted step is the only one inside an epoch.
SINGLE = [*OVERRIDES, "--config.train.checkpoint_every_steps=0"]
TOTAL_STEPS = 3 * STEPS_PER_EPOCH


def preempted_line(step: int, workdir: str) -> str:
  return f"preempted: checkpoint of step {step} saved in {workdir}; run the same command to resume"


def run(environment: dict[str, str], workdir: str, faults_spec: str = "") -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *SINGLE]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**environment, "AST_JAX_FAULTS": faults_spec})


def restore_on_host(workdir: str) -> dict:
  """The latest checkpoint's state as NumPy arrays, whatever devices and processes wrote it."""
  import orbax.checkpoint as ocp

  path = os.path.join(workdir, "checkpoints", str(steps(workdir)[-1]), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def assert_same_params(expected_dir: str, actual_dir: str) -> None:
  expected, actual = restore_on_host(expected_dir), restore_on_host(actual_dir)
  assert int(actual["step"]) == int(expected["step"])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
    np.testing.assert_array_equal(a, b)


def checkpoint_meta(workdir: str, step: int) -> dict:
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as handle:
    return json.load(handle)


def preempt_mid_epoch(environment: dict[str, str], workdir: str) -> tuple[int, str]:
  """Runs the demo with SIGTERM after a random mid-epoch step S; checks exit 75, the line, and checkpoints at the
  epochs' ends before S and at S. Returns (S, a note naming it for assertion messages)."""
  step = random.Random().choice([s for s in range(1, TOTAL_STEPS) if s % STEPS_PER_EPOCH])
  note = f"SIGTERM after step {step}"
  result = run(environment, workdir, f"term@step:{step}")
  assert result.returncode == PREEMPTED_EXIT_CODE, f"{note}\n{result.stderr[-3000:]}"
  assert result.stderr.strip().splitlines()[-1] == preempted_line(step, workdir), note
  assert "Traceback" not in result.stderr, note
  epoch_ends = [s for s in range(STEPS_PER_EPOCH, step, STEPS_PER_EPOCH)]
  assert steps(workdir) == [*epoch_ends, step], note
  assert checkpoint_meta(workdir, step)["epoch"] == step // STEPS_PER_EPOCH, note  # the epochs completed
  return step, note


def test_sigterm_mid_epoch_saves_that_step_and_exits_75(environment, tmp_path):
  preempt_mid_epoch(environment, str(tmp_path / "run"))


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_that_step_exits_75_and_the_rerun_matches_an_uninterrupted_run(environment,
                                                                                                 tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = run(environment, straight)
  assert result.returncode == 0, result.stderr[-3000:]
  step, note = preempt_mid_epoch(environment, resumed)

  result = run(environment, resumed)
  assert result.returncode == 0, f"{note}\n{result.stderr[-3000:]}"
  assert f"restored checkpoint at step {step}" in result.stderr, note
  assert records(resumed) == records(straight), note
  assert_same_params(straight, resumed)


# ------------------------------------------------------------------------------------------- two processes

# Three epochs of eight steps (each process reads 4 of every 8 examples), weight averaging over the last two.
TWO_PROCESS_STEPS_PER_EPOCH = 8
TWO_PROCESS = [
    "--config=configs/demo.py", "--config.data.num_train_examples=64", "--config.data.num_eval_examples=16",
    "--config.data.batch_size=8", "--config.data.eval_batch_size=8", "--config.train.epochs=3",
    "--config.train.log_every_steps=1", "--config.train.progress_bar=False", "--config.train.tensorboard=False",
    "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=1", "--config.augment.mixup=0.5",
    "--config.train.average_weights=(2, 3)", "--config.train.checkpoint_every_steps=0",
    "--config.train.keep_checkpoints=10",
]

# ast_jax.main with the fault of PROCESS_1_FAULTS armed in process 1 only, and with a pause after every step from
# PAUSE_FROM_STEP on: the notice takes up to a second to reach every process (JAX's SIGTERM notifier polls once a
# second), and the run must not end before.
DRIVER = """
import os
import time

os.environ["AST_JAX_FAULTS"] = os.environ.get("PROCESS_1_FAULTS", "") if os.environ["AST_JAX_PROCESS_ID"] == "1" else ""

from absl import app

from ast_jax import main
from ast_jax.train import faults

after_step, pause_from = faults.after_step, int(os.environ.get("PAUSE_FROM_STEP", "0"))


def after_step_with_pause(step):
  after_step(step)
  if pause_from and step >= pause_from:
    time.sleep(0.25)


faults.after_step = after_step_with_pause
app.run(main.main)
"""


def launch_two(environment: dict[str, str], driver: str, workdir: str, **variables: str) -> local.LaunchResult:
  output = io.StringIO()
  env = {**cpu_env(), **{key: environment[key] for key in environment if key.startswith("JAX_")}, **variables}
  env.pop("AST_JAX_FAULTS", None)
  return local.launch([sys.executable, driver, "--distributed", f"--workdir={workdir}", *TWO_PROCESS], 2, env=env,
                      cwd=ROOT, stream=output, timeout=240)


@pytest.mark.slow  # 40-75 s on 2 cores; the default run checks the two-process agreement with the watch alone below
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(environment, tmp_path):
  driver = write_program(tmp_path, "train.py", DRIVER)
  step = random.Random().randint(2, TWO_PROCESS_STEPS_PER_EPOCH - 1)
  note = f"SIGTERM to process 1 after step {step}"
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  result = launch_two(environment, driver, straight)
  assert result.returncode == 0, "\n".join(result.outputs[0][-40:])

  result = launch_two(environment, driver, resumed, PROCESS_1_FAULTS=f"term@step:{step}",
                      PAUSE_FROM_STEP=str(step))
  text = ["\n".join(lines) for lines in result.outputs]
  assert result.returncode == PREEMPTED_EXIT_CODE, f"{note}\n{text[0][-3000:]}\n{text[1][-3000:]}"
  assert "fault injected: SIGTERM" in text[1] and "fault injected" not in text[0], note
  stopped = steps(resumed)[-1]  # the same on both processes: a checkpoint has one step
  note += f", both stopped after step {stopped}"
  assert step <= stopped <= 3 * TWO_PROCESS_STEPS_PER_EPOCH, (note, steps(resumed))
  for process_id in range(2):  # both processes wrote their part and ended with the line, so neither was killed
    assert preempted_line(stopped, resumed) in result.outputs[process_id], (note, process_id, text[process_id][-3000:])
    assert os.path.exists(os.path.join(resumed, "checkpoints", str(stopped), "data", f"process_{process_id}-of-2.json"))

  result = launch_two(environment, driver, resumed)
  assert result.returncode == 0, f"{note}\n" + "\n".join(result.outputs[0][-40:])
  assert all(f"restored checkpoint at step {stopped}" in "\n".join(lines) for lines in result.outputs), note
  assert records(resumed) == records(straight), note
  assert_same_params(straight, resumed)


# The watch itself in two processes, without training: process 1 sends itself SIGTERM after step 3, and every
# process reports the step after which its watch said stop.
WATCH_PROGRAM = """
import os
import signal
import sys
import time

import numpy as np
from jax.experimental import multihost_utils

from ast_jax.parallel import distributed
from ast_jax.train.preemption import PreemptionWatch

distributed.initialize()
watch = PreemptionWatch()
index = int(os.environ["AST_JAX_PROCESS_ID"])
sys.stdout.write(f"mode {watch.mode}; python handler {signal.getsignal(signal.SIGTERM) != signal.SIG_DFL}\\n")
for step in range(1, 2000):
  multihost_utils.process_allgather(np.asarray(step))  # the processes go step by step together, as in training
  if step == 3 and index == 1:
    os.kill(os.getpid(), signal.SIGTERM)
  if watch.should_stop(step):
    sys.stdout.write(f"stopped after step {step}\\n")
    break
  time.sleep(0.01)
watch.close()
"""


@pytest.mark.parametrize("service, mode", [("true", "sync point"), ("false", "agreed signal")])
def test_two_processes_stop_after_the_same_step_with_and_without_jax_preemption_service(tmp_path, service, mode):
  """With JAX's preemption service (the default) its own SIGTERM handler stays in place (Python's view of SIGTERM
  is the default action, yet process 1 lives on) and the sync point decides, a second or so later; without the
  service, a Python handler and an all-gather per step stop both after step 3."""
  program = write_program(tmp_path, "watch.py", WATCH_PROGRAM)
  output = io.StringIO()
  result = local.launch([sys.executable, program], 2, env={**cpu_env(), "JAX_ENABLE_PREEMPTION_SERVICE": service},
                        cwd=ROOT, stream=output, timeout=120)
  assert result.returncode == 0, output.getvalue()[-3000:]
  found = []
  for lines in result.outputs:
    text = "\n".join(lines)
    assert f"mode {mode}; python handler {mode != 'sync point'}" in text, text[-2000:]
    found += [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("stopped after step ")]
  assert len(found) == 2 and found[0] == found[1], output.getvalue()[-3000:]
  assert found[0] == 3 if mode == "agreed signal" else found[0] > 3, found


# ---------------------------------------------------------------------------------------------- units


def test_sigterm_sets_the_flag_and_close_puts_the_previous_handler_back():
  def previous(signum, frame):
    raise AssertionError("the watch's handler should have received SIGTERM")

  original = signal.signal(signal.SIGTERM, previous)
  try:
    watch = PreemptionWatch()
    assert watch.mode == SIGNAL and signal.getsignal(signal.SIGTERM) not in (previous, signal.SIG_DFL)
    assert not watch.should_stop(1) and watch.received_at is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.should_stop(2) and watch.should_stop(3)  # stays set
    assert watch.received_at is not None
    watch.close()
    assert signal.getsignal(signal.SIGTERM) is previous
    watch.close()  # a second close changes nothing
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, original)


def test_outside_the_main_thread_the_watch_installs_nothing():
  before = signal.getsignal(signal.SIGTERM)
  watches = []
  thread = threading.Thread(target=lambda: watches.append(PreemptionWatch()))
  thread.start()
  thread.join()
  [watch] = watches
  assert signal.getsignal(signal.SIGTERM) is before and not watch.should_stop(1)
  watch.close()
  assert signal.getsignal(signal.SIGTERM) is before


def test_the_term_fault_is_read():
  assert faults.parse("term@step:7,kill@step:9") == {("term", "step"): {7}, ("kill", "step"): {9}}
  with pytest.raises(ValueError, match="unknown fault term@eval"):
    faults.parse("term@eval:3")


# --------------------------------------------------------------------------------------------------- Ctrl-C

CTRL_C_LINE = re.compile(r"stopped by Ctrl-C at step (\d+); (?:last checkpoint: step (\d+) \((.+)\); rerun the same "
                         r"command to resume|no checkpoint yet; rerunning starts from the beginning)$")


class Started:
  """A command in a session of its own (as a terminal's job is), its output lines collected as they come."""

  def __init__(self, command: list[str], env: dict[str, str]):
    self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
    self.stdout: list[str] = []
    self.stderr: list[str] = []
    self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                    for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))]
    for reader in self.readers:
      reader.start()

  @staticmethod
  def _read(stream, lines: list[str]) -> None:
    for line in stream:
      lines.append(line.rstrip("\n"))

  def wait_for(self, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in self.stdout + self.stderr):
      assert self.process.poll() is None, f"ended ({self.process.returncode}) before {text!r}:\n" + self.output()
      assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n" + self.output()
      time.sleep(0.02)

  def ctrl_c(self) -> None:
    os.killpg(self.process.pid, signal.SIGINT)  # the whole process group, as a terminal sends it

  def running_after(self, seconds: float) -> bool:
    try:
      self.process.wait(seconds)
    except subprocess.TimeoutExpired:
      return True
    return False

  def end(self, timeout: float = 60) -> int:
    code = self.process.wait(timeout)
    for reader in self.readers:
      reader.join(10)
    return code

  def output(self) -> str:
    return "\n".join(self.stderr[-60:] + self.stdout[-20:])


def ctrl_c_line(started: Started) -> re.Match:
  """The run's one Ctrl-C line, last on stderr; log lines may come before it, a traceback never."""
  text = started.output()
  assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
  found = [line for line in started.stderr if "Ctrl-C" in line and not re.match(r"\d{4}-\d\d-\d\d ", line)]
  assert len(found) == 1 and found[0] == started.stderr[-1], text
  match = CTRL_C_LINE.match(found[0])
  assert match, found[0]
  return match


def start_demo(environment: dict[str, str], workdir: str) -> Started:
  command = [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py", f"--workdir={workdir}", *SINGLE]
  return Started(command, environment)


def stop_after_a_step(environment: dict[str, str], workdir: str) -> re.Match:
  """Ctrl-C once the demo has logged a step: exit 130, and the one line names the step it saved, the only
  checkpoint, complete. Returns the line."""
  run = start_demo(environment, workdir)
  run.wait_for("loss")  # a step's log line (every step)
  run.ctrl_c()
  assert run.end() == INTERRUPTED_EXIT_CODE, run.output()
  line = ctrl_c_line(run)
  step = int(line.group(1))
  assert step >= 1 and line.group(2) == str(step), line.group(0)  # the run stopped after a step and saved it
  assert line.group(3) == os.path.join(workdir, "checkpoints")
  assert steps(workdir) == [step] and not [name for name in os.listdir(os.path.join(workdir, "checkpoints"))
                                           if not name.isdigit()]  # committed, nothing half-written beside it
  return line


def test_ctrl_c_after_a_step_saves_that_step_and_exits_130_with_one_line(environment, tmp_path):
  stop_after_a_step(environment, str(tmp_path / "run"))


@pytest.mark.slow  # one more start of the demo (5-10 s on 2 cores): the default run stays under 20 s
def test_after_ctrl_c_the_same_command_resumes_from_the_checkpoint_the_line_named(environment, tmp_path):
  workdir = str(tmp_path / "run")
  line = stop_after_a_step(environment, workdir)
  step = int(line.group(1))
  rerun = start_demo(environment, workdir)  # the same command
  rerun.wait_for(f"restored checkpoint at step {step}")
  rerun.ctrl_c()  # before its first step: at once, nothing lost
  assert rerun.end() == INTERRUPTED_EXIT_CODE, rerun.output()
  assert ctrl_c_line(rerun).group(0) == line.group(0)


def test_ctrl_c_while_compiling_exits_at_once_with_one_line_and_no_crash(environment, tmp_path):
  workdir = str(tmp_path / "run")
  run = start_demo(environment, workdir)
  run.wait_for("model ast")  # logged just before the first step is traced and compiled
  time.sleep(0.3)
  run.ctrl_c()
  code = run.end()
  assert code == INTERRUPTED_EXIT_CODE, (code, run.output())  # -11: a segmentation fault
  assert ctrl_c_line(run).group(0) == "stopped by Ctrl-C at step 0; no checkpoint yet; rerunning starts from the " \
                                      "beginning"
  assert steps(workdir) == []


# The interrupt module alone, without training: the main thread blocks (as in a long compilation) at a stage.
STAGE_PROGRAM = """
import sys
import threading

from ast_jax.train import interrupt

interrupt.install(sys.argv[1])
if sys.argv[2] != "starting":
  interrupt.training(7)
if sys.argv[2] == "finishing":
  interrupt.finishing()
print("ready", flush=True)
threading.Event().wait()
"""


def start_stage(tmp_path, stage: str, checkpoint_names: list[str]) -> tuple[Started, str]:
  directory = tmp_path / "checkpoints"
  for name in checkpoint_names:
    (directory / name).mkdir(parents=True)
  program = write_program(tmp_path, "stage.py", STAGE_PROGRAM)
  started = Started([sys.executable, program, str(directory), stage], cpu_env())
  started.wait_for("ready", timeout=60)
  return started, str(directory)


def test_while_training_a_second_ctrl_c_exits_at_once_naming_the_last_committed_checkpoint(tmp_path):
  started, directory = start_stage(tmp_path, "training", ["3", "5.orbax-checkpoint-tmp-1796000000"])
  started.ctrl_c()
  assert started.running_after(0.5), started.output()  # it waits for the next step boundary, which never comes
  started.ctrl_c()
  assert started.end(10) == INTERRUPTED_EXIT_CODE, started.output()
  assert ctrl_c_line(started).group(0) == (f"stopped by Ctrl-C at step 7; last checkpoint: step 3 ({directory}); "
                                           "rerun the same command to resume")  # the save of 5 is abandoned


def test_after_training_ctrl_c_exits_once_the_save_in_flight_is_committed(tmp_path):
  started, directory = start_stage(tmp_path, "finishing", ["3"])
  os.mkdir(os.path.join(directory, "7.orbax-checkpoint-tmp-1796000000"))  # the last step's save, begun
  started.ctrl_c()
  assert started.running_after(0.5), started.output()  # waiting for checkpoint 7
  os.rename(os.path.join(directory, "7.orbax-checkpoint-tmp-1796000000"), os.path.join(directory, "7"))
  assert started.end(10) == INTERRUPTED_EXIT_CODE, started.output()
  assert ctrl_c_line(started).group(0) == (f"stopped by Ctrl-C at step 7; last checkpoint: step 7 ({directory}); "
                                           "rerun the same command to resume")


def test_before_training_ctrl_c_exits_at_once_past_a_save_an_earlier_run_left_unfinished(tmp_path):
  started, directory = start_stage(tmp_path, "starting", ["4", "6.orbax-checkpoint-tmp-1796000000"])
  started.ctrl_c()
  assert started.end(10) == INTERRUPTED_EXIT_CODE, started.output()
  assert ctrl_c_line(started).group(0) == (f"stopped by Ctrl-C at step 4; last checkpoint: step 4 ({directory}); "
                                           "rerun the same command to resume")


def test_the_local_launcher_passes_ctrl_c_on_to_every_process(tmp_path):
  program = write_program(tmp_path, "stage.py", STAGE_PROGRAM)
  launcher = Started([sys.executable, "launch/local.py", "--num_processes=2", "--", sys.executable, program,
                      str(tmp_path / "checkpoints"), "starting"], cpu_env())
  launcher.wait_for("[p0] ready", timeout=60)
  launcher.wait_for("[p1] ready", timeout=60)
  launcher.ctrl_c()  # the launcher's group only: the processes run in sessions of their own
  assert launcher.end(20) == INTERRUPTED_EXIT_CODE, launcher.output()
  text = launcher.output()
  assert "Traceback" not in text and "stopping the others" not in text, text
  for process_id in range(2):
    assert (f"[p{process_id}] stopped by Ctrl-C at step 0; no checkpoint yet; rerunning starts from the beginning"
            in launcher.stdout), text


@pytest.mark.slow  # two training processes: about a minute on 2 cores
def test_ctrl_c_through_the_launcher_stops_two_processes_after_the_same_step_with_a_checkpoint(environment,
                                                                                               tmp_path):
  workdir = str(tmp_path / "run")
  env = {**cpu_env(), **{key: environment[key] for key in environment if key.startswith("JAX_")}}
  command = [sys.executable, "launch/local.py", "--num_processes=2", "--", "-m", "ast_jax.main",
             f"--workdir={workdir}", *TWO_PROCESS]
  launcher = Started(command, env)
  launcher.wait_for("[p0] ", timeout=240)
  launcher.wait_for(f"step 2/{3 * TWO_PROCESS_STEPS_PER_EPOCH}", timeout=240)
  launcher.ctrl_c()
  assert launcher.end(120) == INTERRUPTED_EXIT_CODE, launcher.output()
  text = launcher.output()
  assert "Traceback" not in text, text
  lines = [CTRL_C_LINE.match(line.split("] ", 1)[1]) for line in launcher.stdout if "stopped by Ctrl-C" in line]
  assert len(lines) == 2 and all(lines), text
  step = int(lines[0].group(1))
  assert all(line.group(1) == line.group(2) == str(step) for line in lines), text  # the same step, saved
  assert steps(workdir)[-1] == step
  for process_id in range(2):
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(step), "data", f"process_{process_id}-of-2.json"))
