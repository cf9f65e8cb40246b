"""Bad configuration: unknown keys, empty patch grids, batches that do not split over the mesh, unwritable or full
work directories. Each gives one message that names the field and the fix, before any data is read or compiled."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import types

import jax
import pytest

from ast_jax import overrides
from ast_jax.models import build_model, example_inputs, init_params
from ast_jax.train import config_checks, trainer
from ast_jax.train.config_checks import ConfigError
from ast_jax.train.workdir import check_workdir, checkpoint_bytes
from configs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_keys_name_the_key_and_the_nearest_real_ones():
  problems = overrides.override_problems([
      "--config=configs/demo.py", "--config.workdir=/tmp/run", "--config.optim.lrr=1e-4", "--config.model.lr=1",
      "--config.batch_size=8", "--config.nosuch.field=1", "--config.optim.lr=1e-4"])
  assert len(problems) == 5  # the last override is a real field
  assert "--workdir=DIR is a flag of its own" in problems[0]
  assert "no field 'optim.lrr' in section 'optim'; did you mean --config.optim.lr" in problems[1]
  assert "did you mean --config.optim.lr" in problems[2]  # a field in the wrong section
  assert "did you mean --config.data.batch_size" in problems[3]
  assert "no field 'nosuch.field' in configs/demo.py" in problems[4]
  assert overrides.override_problems(["--config=configs/demo.py", "--config.data.batch_size=4"]) == []


@pytest.mark.parametrize("module", ["ast_jax.main", "ast_jax.sweep"])
def test_unknown_key_on_the_command_line_exits_with_one_message(tmp_path, module):
  workdir = tmp_path / "run"
  result = subprocess.run([sys.executable, "-m", module, "--config=configs/demo.py", f"--workdir={workdir}",
                           "--config.workdir=/elsewhere", "--config.train.epoch=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert "--config.workdir: --workdir=DIR is a flag of its own" in result.stderr
  assert "--config.train.epoch: no field 'train.epoch' in section 'train'; did you mean --config.train.epochs" in (
      result.stderr)
  assert not workdir.exists()  # nothing ran


EMPTY_GRIDS = {
    "frames": (dict(audio=dict(target_length=8), augment=dict(time_mask=0)), "raise audio.target_length"),
    "mel bins": (dict(audio=dict(num_mel_bins=8), augment=dict(freq_mask=0)), "lower model.patch_size"),
    "pooled phase": (dict(train=dict(phases="avg_pool:16:6, full:1:6")), "smaller than one 16x16 patch"),
    "frame-shift phase": (dict(train=dict(phases="frame_shift:10:6, full:1:6")), "smaller than one 16x16 patch"),
    "patch phase": (dict(train=dict(phases="patch:10:6, full:1:6")), "smaller than one 16x160 patch"),
    "sweep length": (dict(eval_sweep=dict(lengths=(4,))), "every length must be a whole number of frames >= "),
    "stride": (dict(model=dict(tstride=0)), "model.tstride=0 must be positive"),
}


@pytest.mark.parametrize("case", sorted(EMPTY_GRIDS))
def test_empty_patch_grids_fail_before_anything_is_read(tmp_path, case):
  fields, fix = EMPTY_GRIDS[case]
  config = demo.get_config()
  for section, values in fields.items():
    config[section].update(values)
  with pytest.raises(ConfigError, match="invalid config") as error:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert fix in str(error.value)
  assert not (tmp_path / "run").exists()  # checked before the workdir is made


@pytest.mark.parametrize("recipe", ["audioset", "esc50"])
def test_a_recipe_without_its_data_names_the_flags_before_making_the_workdir(tmp_path, recipe):
  """The AudioSet and ESC-50 recipes as they ship (their data paths are placeholders): one message naming each
  `--config.data.*` flag to set, and no workdir left behind."""
  import importlib

  config = importlib.import_module(f"configs.{recipe}").get_config()
  with pytest.raises(ConfigError, match="the data is not where the config says") as error:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  flags = ["--config.data.train_datafile=PATH", "--config.data.eval_datafile=PATH"] if recipe == "audioset" else [
      "--config.data.path=DIR"]
  assert all(flag in str(error.value) for flag in flags), str(error.value)
  assert not (tmp_path / "run").exists()


def fake_mesh(**shape: int) -> types.SimpleNamespace:
  return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **shape})


def test_a_batch_that_does_not_split_over_the_data_parallel_devices_names_a_size_that_does():
  config = demo.get_config()
  config.data.update(batch_size=12, eval_batch_size=16)
  with pytest.raises(ConfigError, match=r"config.data.batch_size=12 does not split evenly over the 8 data-parallel "
                                        r"devices .* set it to a multiple of 8 \(e.g. --config.data.batch_size=8\)"):
    config_checks.check_batch_divides(config, fake_mesh(data=4, fsdp=2, tensor=2))
  config.data.update(batch_size=16, eval_batch_size=20)
  with pytest.raises(ConfigError, match=r"config.data.eval_batch_size=20 .* --config.data.eval_batch_size=16"):
    config_checks.check_batch_divides(config, fake_mesh(data=4, fsdp=2))
  config.data.update(eval_batch_size=16)
  config.train.grad_accum_steps = 4
  with pytest.raises(ConfigError, match=r"grad_accum_steps=4 micro-batches over 8 .* a multiple of 32"):
    config_checks.check_batch_divides(config, fake_mesh(data=8))
  config_checks.check_batch_divides(config, fake_mesh(data=4))  # 16 = 4 micro-batches x 4 devices


def test_an_unwritable_workdir_is_refused_with_the_fix(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match=r"is not writable .*choose another --workdir"):
    check_workdir(str(blocker / "run"), 1)
  if os.geteuid() != 0:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=r"is not writable \(Permission denied\)"):
      check_workdir(str(locked / "run"), 1)


@contextlib.contextmanager
def small_file_system(path: str, options: str):
  """A tmpfs mounted at `path` (root with mount rights only; else the test is skipped)."""
  os.makedirs(path, exist_ok=True)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", path], check=False)


def test_a_read_only_workdir_is_refused_even_for_root(tmp_path):
  """Root writes through permissions; a read-only file system stops everyone."""
  with small_file_system(str(tmp_path / "ro"), "ro,size=1m") as read_only:
    with pytest.raises(ConfigError, match=r"is not writable \(Read-only file system\); fix its permissions or "
                                          r"choose another --workdir"):
      check_workdir(os.path.join(read_only, "run"), 1)


def test_a_full_workdir_is_refused_before_training(tmp_path, monkeypatch):
  config = demo.get_config()
  size = checkpoint_bytes(config)
  params = init_params(build_model(config), jax.random.key(0), *example_inputs(config))
  assert size == 3 * 4 * sum(x.size for x in jax.tree.leaves(params))  # float32 parameters, Adam's two moments
  monkeypatch.setattr("shutil.disk_usage", lambda path: types.SimpleNamespace(total=2**30, used=2**30, free=2**16))
  with pytest.raises(ConfigError, match=r"has 0.1 MiB free, but a checkpoint and the exported model need about"):
    check_workdir(str(tmp_path / "run"), size)
  monkeypatch.undo()

  def no_space(_):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr("os.fsync", no_space)
  with pytest.raises(ConfigError, match=r"the file system is full \(No space left on device\)"):
    check_workdir(str(tmp_path / "run"), size)
