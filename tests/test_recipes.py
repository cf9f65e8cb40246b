"""Every paper recipe builds and trains two steps (then evaluates) on a few fabricated files in its data format.

`get_config('smoke')` keeps each recipe's data format, front end, augmentation, loss and schedule, with a tiny model.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from ast_jax.data import BadDataError
from ast_jax.train.trainer import train_and_evaluate
from configs import audioset, audioset_balanced, esc50, speechcommands
from configs.common import AUDIOSET_LABELS, SPEECHCOMMANDS_LABELS


def write_clip(path, seconds, sample_rate=16000, channels=1, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  clip = 0.1 * rng.standard_normal((int(seconds * sample_rate), channels)).astype(np.float32)
  sf.write(path, clip, sample_rate)


def audioset_datafiles(tmp_path, extra_train=()):
  with open(AUDIOSET_LABELS) as handle:
    mids = [row["mid"] for row in csv.DictReader(handle)]
  entries = []
  for index in range(7):  # 4 training clips, 3 evaluation clips (a clip in both splits is leakage: bad data)
    write_clip(str(tmp_path / f"clip{index}.flac"), 1.5, seed=index)
    entries.append({"wav": str(tmp_path / f"clip{index}.flac"), "labels": f"{mids[index]},{mids[100 + index]}"})
  (tmp_path / "train.json").write_text(json.dumps({"data": entries[:4] + list(extra_train)}))
  (tmp_path / "eval.json").write_text(json.dumps({"data": entries[4:]}))
  return str(tmp_path / "train.json"), str(tmp_path / "eval.json")


def check_two_steps(record, workdir, num_examples):
  assert record["step"] == 2 and record["num_examples"] == num_examples
  assert np.isfinite(record["loss"]) and np.isfinite(record["train_loss"])
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[-1])["step"] == 2
  # Throughput from the analytic count: tokens/s = examples/s x tokens per example; no MFU without a known peak.
  assert record["examples_per_sec"] > 0 and record["tokens_per_sec"] > record["examples_per_sec"]
  assert "mfu" not in record


@pytest.mark.parametrize("recipe, arg", [(audioset, "smoke"), pytest.param(audioset_balanced, "smoke",
                                                                           marks=pytest.mark.slow),
                                         pytest.param(audioset, "aum_smoke", marks=pytest.mark.slow)])
def test_audioset_recipes_run_two_steps(tmp_path, recipe, arg):
  config = recipe.get_config(arg)
  train, evaluation = audioset_datafiles(tmp_path)
  config.data.update(train_datafile=train, eval_datafile=evaluation)
  record = train_and_evaluate(config, str(tmp_path / "work"))
  check_two_steps(record, tmp_path / "work", 3)
  # Both recipes average weights; the smoke run averages its single epoch.
  assert record["weights"] == "averaged"


@pytest.mark.slow  # the elastic trainer path runs in the default suite (test_elastic_train.py); this adds the recipe
def test_audioset_elastic_recipe_trains_and_sweeps(tmp_path):
  config = audioset.get_config("elastic_smoke")
  config.eval_sweep.update(lengths=(256,), resolutions=(4.0,))
  train, evaluation = audioset_datafiles(tmp_path)
  config.data.update(train_datafile=train, eval_datafile=evaluation)
  record = train_and_evaluate(config, str(tmp_path / "work"))
  assert record["num_examples"] == 3 and np.isfinite(record["loss"]) and record["weights"] == "averaged"
  assert 0 < record["packing_efficiency"] <= 1 and record["examples_per_sec"] > 0
  assert len((tmp_path / "work" / "sweep.csv").read_text().splitlines()) == 3  # header + 2 points


@pytest.mark.slow  # the ESC-50 source has its test in tests/test_data.py; a recipe trains in the AudioSet test
def test_esc50_recipe_runs_two_steps(tmp_path):
  root = tmp_path / "ESC-50"
  rows = []
  for target in range(50):
    # Four clips in folds 2-5 train (two steps of two); the other 46 sit in the held-out fold 1.
    fold = 2 + target if target < 4 else 1
    name = f"{fold}-{target}-A-0.wav"
    write_clip(str(root / "audio" / name), 0.5, sample_rate=44100, channels=2, seed=target)
    rows.append([name, fold, target, f"class{target}", False, "src", "A"])
  (root / "meta").mkdir()
  with open(root / "meta" / "esc50.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
    writer.writerows(rows)
  config = esc50.get_config("smoke")
  config.data.path = str(root)
  record = train_and_evaluate(config, str(tmp_path / "work"))
  check_two_steps(record, tmp_path / "work", 46)


@pytest.mark.slow  # the Speech Commands source has its tests in tests/test_data.py
def test_speechcommands_recipe_runs_two_steps(tmp_path):
  root = tmp_path / "speech_commands_v0.02"
  for word, count in (("yes", 3), ("no", 3)):
    for index in range(count):
      write_clip(str(root / word / f"spk{index}_nohash_0.wav"), 1.0, seed=index)
  (root / "testing_list.txt").write_text("yes/spk2_nohash_0.wav\n")
  (root / "validation_list.txt").write_text("no/spk2_nohash_0.wav\n")
  config = speechcommands.get_config("smoke")
  config.data.path = str(root)
  assert config.data.label_csv == SPEECHCOMMANDS_LABELS
  record = train_and_evaluate(config, str(tmp_path / "work"))
  check_two_steps(record, tmp_path / "work", 1)


def bad_files(tmp_path):
  missing = str(tmp_path / "missing.wav")
  corrupt = tmp_path / "corrupt.wav"
  corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
  empty = tmp_path / "empty.wav"
  empty.write_bytes(b"")
  mid = "/m/09x0r"
  return [{"wav": path, "labels": mid} for path in (missing, str(corrupt), str(empty))]


def test_bad_files_fail_at_once_listing_all(tmp_path):
  config = audioset.get_config("smoke")
  train, evaluation = audioset_datafiles(tmp_path, extra_train=bad_files(tmp_path))
  config.data.update(train_datafile=train, eval_datafile=evaluation)
  with pytest.raises(BadDataError) as error:
    train_and_evaluate(config, str(tmp_path / "work"))
  message = str(error.value)
  for name in ("missing.wav", "corrupt.wav", "empty.wav"):
    assert name in message
  assert not (tmp_path / "work" / "checkpoints").exists() or not os.listdir(tmp_path / "work" / "checkpoints")


@pytest.mark.slow  # skip-mode training over every kind of bad entry runs in tests/test_bad_data.py
def test_bad_files_skipped_and_counted(tmp_path):
  config = audioset.get_config("smoke")
  train, evaluation = audioset_datafiles(tmp_path, extra_train=bad_files(tmp_path))
  config.data.update(train_datafile=train, eval_datafile=evaluation, on_bad_audio="skip")
  record = train_and_evaluate(config, str(tmp_path / "work"))
  assert record["skipped_files"] == 3 and record["step"] == 2


def test_training_starts_from_imagenet_weights(tmp_path):
  """config.init_from='imagenet:...' with a timm DeiT state dict; upstream's warm-up holds the lr at 0 for the first
  50 steps, so the exported model after two steps is exactly the converted ImageNet weights."""
  import torch

  from ast_jax.convert.model_dir import load_model_dir
  from ast_jax.models.positions import resize_table

  width, depth = 64, 2
  generator = torch.Generator().manual_seed(0)
  state = {"cls_token": torch.randn(1, 1, width, generator=generator),
           "dist_token": torch.randn(1, 1, width, generator=generator),
           "pos_embed": torch.randn(1, 2 + 24 * 24, width, generator=generator),
           "patch_embed.proj.weight": torch.randn(width, 3, 16, 16, generator=generator),
           "patch_embed.proj.bias": torch.randn(width, generator=generator),
           "norm.weight": torch.randn(width, generator=generator), "norm.bias": torch.randn(width, generator=generator),
           "head.weight": torch.randn(1000, width, generator=generator), "head.bias": torch.zeros(1000),
           "head_dist.weight": torch.randn(1000, width, generator=generator), "head_dist.bias": torch.zeros(1000)}
  for index in range(depth):
    for name, shape in (("norm1", (width,)), ("norm2", (width,)), ("attn.qkv", (3 * width, width)),
                        ("attn.proj", (width, width)), ("mlp.fc1", (4 * width, width)),
                        ("mlp.fc2", (width, 4 * width))):
      state[f"blocks.{index}.{name}.weight"] = torch.randn(*shape, generator=generator)
      state[f"blocks.{index}.{name}.bias"] = torch.randn(shape[0], generator=generator)
  torch.save(state, tmp_path / "deit.pth")

  config = audioset.get_config("smoke")
  train, evaluation = audioset_datafiles(tmp_path)
  config.data.update(train_datafile=train, eval_datafile=evaluation)
  config.init_from = f"imagenet:{tmp_path / 'deit.pth'}"
  train_and_evaluate(config, str(tmp_path / "work"))
  params = load_model_dir(str(tmp_path / "work")).params
  np.testing.assert_allclose(params["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                             state["blocks.1.mlp.fc1.weight"].numpy().T, rtol=0, atol=0)
  np.testing.assert_allclose(params["patch_embed"]["proj"]["kernel"][..., 0, :],
                             state["patch_embed.proj.weight"].numpy().sum(1).transpose(1, 2, 0), atol=1e-6)
  np.testing.assert_allclose(params["pos_embed"],
                             resize_table(state["pos_embed"].numpy(), (24, 24), (12, 101), rule="upstream"),
                             rtol=0, atol=0)
