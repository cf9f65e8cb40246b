"""Multi-process runs on one machine (jax.distributed over localhost, gloo CPU collectives), started by
launch/local.py: the launcher's contract, cross-process collectives, and two processes training the demo config
step for step like one process."""

from __future__ import annotations

import io
import json
import os
import re
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One epoch of three steps, so the run also evaluates (a cross-process gather), checkpoints and exports.
OVERRIDES = [
    "--config=configs/demo.py", "--config.data.num_train_examples=24", "--config.data.num_eval_examples=16",
    "--config.data.batch_size=8", "--config.data.eval_batch_size=8", "--config.train.epochs=1",
    "--config.train.max_steps=3", "--config.train.log_every_steps=1", "--config.train.progress_bar=False",
    "--config.train.tensorboard=False", "--config.model.width=32", "--config.model.depth=1",
    "--config.model.num_heads=1",
]

# ast_jax.main with each process printing its exact training loss per step (the log line rounds it to 4 digits).
TRAIN_DRIVER = """
from absl import app

from ast_jax import main
from ast_jax.train import writers

write_scalars = writers.MetricsWriter.write_scalars


def write_and_print_loss(self, step, scalars):
  if "train/loss" in scalars:
    print(f"train_loss {step} {scalars['train/loss']!r}", flush=True)
  write_scalars(self, step, scalars)


writers.MetricsWriter.write_scalars = write_and_print_loss
app.run(main.main)
"""

LOSS_LINE = re.compile(r"^train_loss (\d+) (\S+)$")

COLLECTIVES = """
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ast_jax.parallel import distributed

distributed.initialize()
index = jax.process_index()
gathered = multihost_utils.process_allgather(np.array([index, 10 * index])).tolist()
sys.stdout.write(f"gathered {gathered}\\n")  # one write: gloo's threads log to the same stream meanwhile
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")),
                                              np.full((jax.local_device_count(), 2), index + 1.0, np.float32))
sys.stdout.write(f"sum {float(jax.jit(lambda x: x.sum())(rows))}\\n")
"""


# Each process's packed (ElasticAST) training batches and one evaluation pass, as the trainer asks for them, and
# the evaluation clips its reader decoded.
PACKED_HOSTS = """
import sys

import jax
import numpy as np

from ast_jax.data.demo import demo_sources
from ast_jax.data.inputs import PackedInput
from ast_jax.data.reader import WaveformReader
from ast_jax.parallel import distributed
from configs import demo


class CountingReader(WaveformReader):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.decoded = []

  def decode(self, index):
    self.decoded.append(int(index))
    return super().decode(index)


distributed.initialize()
config = demo.get_config("elastic")
sources = demo_sources(config.seed, 24, 16)
inputs = PackedInput(config, sources)
inputs.eval_reader = CountingReader(sources.eval, inputs.spec.sample_rate)
host = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
train = inputs.train_iterator(config.seed, **host)
arrays = {f"train{step}/{key}": value for step in range(2) for key, value in next(train).items()}
arrays.update({f"eval{number}/{key}": value for number, batch in enumerate(inputs.eval_batches(**host))
               for key, value in batch.items()})
np.savez(f"{sys.argv[1]}/host_{jax.process_index()}.npz", decoded=np.sort(inputs.eval_reader.decoded), **arrays)
"""


def cpu_env() -> dict[str, str]:
  """CPU only, one device per process, and the repository importable from a script in a temporary directory."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
      "PYTHONPATH")])))
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def write_program(tmp_path: pathlib.Path, name: str, source: str) -> str:
  path = tmp_path / name
  path.write_text(textwrap.dedent(source))
  return str(path)


def run_launch(command: list[str], num_processes: int, **kwargs) -> local.LaunchResult:
  output = io.StringIO()
  result = local.launch(command, num_processes, env=cpu_env(), cwd=ROOT, stream=output, timeout=150, **kwargs)
  assert result.returncode == 0, output.getvalue()[-6000:]
  return result


def test_launcher_stops_the_others_and_returns_the_first_failure():
  fail_one = ("import os, sys, time\n"
              "print('process', os.environ['AST_JAX_PROCESS_ID'], 'of', os.environ['AST_JAX_NUM_PROCESSES'])\n"
              "sys.exit(3) if os.environ['AST_JAX_PROCESS_ID'] == '1' else time.sleep(60)\n")
  output = io.StringIO()
  result = local.launch([sys.executable, "-c", fail_one], 2, env=cpu_env(), stream=output, timeout=30)
  assert result.returncode == 3
  assert result.outputs == [["process 0 of 2"], ["process 1 of 2"]]
  assert "[p1] process 1 of 2" in output.getvalue()


def test_launcher_command_and_environment():
  assert local.process_command(["-m", "ast_jax.main", "--config=c.py"]) == [
      sys.executable, "-m", "ast_jax.main", "--distributed", "--config=c.py"]
  assert local.process_command(["python", "-m", "ast_jax.main", "--distributed"]).count("--distributed") == 1
  env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x"},
                          "127.0.0.1:1234", 4, 2, devices_per_process=2)
  assert (env["AST_JAX_COORDINATOR"], env["AST_JAX_NUM_PROCESSES"], env["AST_JAX_PROCESS_ID"]) == (
      "127.0.0.1:1234", "4", "2")
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"


def test_cross_process_collectives_on_cpu(tmp_path: pathlib.Path):
  program = write_program(tmp_path, "collectives.py", COLLECTIVES)
  result = run_launch([sys.executable, program], 2, devices_per_process=2)
  for lines in result.outputs:
    # stdout and stderr share the stream: gloo's own messages may land on the same line as ours
    text = "\n".join(lines)
    assert "gathered [[0, 0], [1, 10]]" in text, lines
    assert "sum 12.0" in text, lines  # 4 rows of 2: process 0's ones and process 1's twos


def train_losses(lines: list[str], steps: tuple[int, ...] = (1, 2, 3)) -> list[float]:
  """The driver's `train_loss STEP VALUE` lines, in step order; exactly `steps` must be there."""
  losses = {int(m.group(1)): float(m.group(2)) for m in map(LOSS_LINE.match, lines) if m}
  assert tuple(sorted(losses)) == steps, lines[-40:]
  return [losses[step] for step in sorted(losses)]


def last_record(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as handle:
    return json.loads(handle.read().splitlines()[-1])


def test_two_processes_train_like_one(tmp_path: pathlib.Path):
  driver = write_program(tmp_path, "train.py", TRAIN_DRIVER)
  one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
  single = subprocess.run([sys.executable, driver, f"--workdir={one_dir}", *OVERRIDES], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=150)
  assert single.returncode == 0, single.stderr[-6000:]
  two = run_launch([sys.executable, driver, "--distributed", f"--workdir={two_dir}", *OVERRIDES], 2)

  for process_id, lines in enumerate(two.outputs):
    assert any(f"process {process_id} of 2: 1 local devices, 2 global devices" in line for line in lines)
  one_process = train_losses(single.stdout.splitlines())
  process_0, process_1 = (train_losses(lines) for lines in two.outputs)
  np.testing.assert_allclose(process_1, process_0, rtol=1e-5)
  np.testing.assert_allclose(process_0, one_process, rtol=1e-5)

  # Evaluation gathers both processes' halves: the same 16 examples, the same metrics (written by process 0).
  one_record, two_record = last_record(one_dir), last_record(two_dir)
  assert two_record["num_examples"] == one_record["num_examples"] == 16
  for key in ("loss", "accuracy", "train_loss"):
    np.testing.assert_allclose(two_record[key], one_record[key], rtol=1e-5, err_msg=key)
  assert os.path.isdir(os.path.join(two_dir, "model")) and os.path.isdir(os.path.join(two_dir, "checkpoints", "3"))


def test_two_processes_decode_only_their_packed_rows(tmp_path: pathlib.Path):
  """Packed batches: each process decodes only the clips of its own block of rows, and the two blocks are the
  single process's global batches."""
  from ast_jax.data.demo import demo_sources
  from ast_jax.data.inputs import PackedInput
  from configs import demo

  run_launch([sys.executable, write_program(tmp_path, "packed_hosts.py", PACKED_HOSTS), str(tmp_path)], 2)
  hosts = [np.load(tmp_path / f"host_{index}.npz") for index in range(2)]
  config = demo.get_config("elastic")
  inputs = PackedInput(config, demo_sources(config.seed, 24, 16))
  train = inputs.train_iterator(config.seed)
  expected = {f"train{step}/{key}": value for step in range(2) for key, value in next(train).items()}
  expected.update({f"eval{number}/{key}": value for number, batch in enumerate(inputs.eval_batches())
                   for key, value in batch.items()})
  for name, value in expected.items():
    np.testing.assert_array_equal(np.concatenate([host[name] for host in hosts]), value, err_msg=name)
  assert sorted(name for name in hosts[0].files if name != "decoded") == sorted(expected)
  [plans] = inputs.eval_plans.values()
  for index, host in enumerate(hosts):
    rows = slice(index * plans.spec.rows // 2, (index + 1) * plans.spec.rows // 2)
    share = sorted(clip for batch in plans.epoch(0).batches for row in batch[rows] for clip in row)
    assert 0 < len(share) < 16 and host["decoded"].tolist() == share  # its own clips, each decoded once
  assert sum(len(host["decoded"]) for host in hosts) == 16


@pytest.mark.slow  # about 40 s; single-process resume after kills runs in the default suite (tests/test_faults.py)
def test_two_processes_resume_each_from_its_own_iterator_state(tmp_path: pathlib.Path):
  """Stopped after two steps and started again, each process restores its own iterator position and shards:
  step 3 is the uninterrupted two-process run's step 3."""
  driver = write_program(tmp_path, "train.py", TRAIN_DRIVER)
  process_0 = train_losses(run_launch([sys.executable, driver, "--distributed", f"--workdir={tmp_path / 'two'}",
                                       *OVERRIDES], 2).outputs[0])
  staged_dir = str(tmp_path / "staged")
  command = [sys.executable, driver, "--distributed", f"--workdir={staged_dir}", *OVERRIDES]
  first = run_launch([*command, "--config.train.max_steps=2"], 2)
  assert all(os.path.exists(os.path.join(staged_dir, "checkpoints", "2", "data", f"process_{index}-of-2.json"))
             for index in range(2)), os.listdir(os.path.join(staged_dir, "checkpoints", "2", "data"))
  second = run_launch(command, 2)
  for process_id in range(2):
    staged = train_losses(first.outputs[process_id], (1, 2)) + train_losses(second.outputs[process_id], (3,))
    np.testing.assert_allclose(staged, process_0, rtol=1e-5)
