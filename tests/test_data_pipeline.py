"""The Grain pipelines: batch contract, sharding, epochs, mixup, balanced sampling, resume, faults."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio.io import AudioError, remove_mean
from ast_jax.data import build_sources, clip_samples, eval_iterator, steps_per_epoch, train_iterator
from ast_jax.data import demo
from ast_jax.data.mixup import draw_mixup, mix_waveforms
from ast_jax.data.reader import TrainRecords, WaveformReader
from ast_jax.data.sampling import EpochSampler, balanced_weights
from ast_jax.data.sources import Example, Sources
from configs.common import base_config

TARGET_LENGTH = 64  # frames: 0.655 s, so the demo's 0.3-1.5 s clips are both padded and cut
CLIP = 400 + 160 * (TARGET_LENGTH - 1)


def write_tone(path, seconds=0.2, sample_rate=16000, channels=1):
  """A 440 Hz tone with a 0.05 DC offset (which mean removal must take out)."""
  tone = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(int(seconds * sample_rate)) / sample_rate) + 0.05
  sf.write(path, np.stack([tone] * channels, axis=1), sample_rate)


def datafile_config(tmp_path, names, mid):
  """A datafile source over `{name}.wav` files in `tmp_path`, all labelled `mid` (three classes)."""
  (tmp_path / "labels.csv").write_text("index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,Cat\n2,/m/car,Car\n")
  entries = [{"wav": str(tmp_path / f"{name}.wav"), "labels": mid} for name in names]
  (tmp_path / "train.json").write_text(json.dumps({"data": entries}))
  config = base_config()
  config.data.update(source="datafile", train_datafile=str(tmp_path / "train.json"),
                     label_csv=str(tmp_path / "labels.csv"))
  config.num_classes = 3
  config.audio.target_length = TARGET_LENGTH
  return config


def demo_setup(num_train=32, num_eval=21, batch_size=8, **data):
  config = base_config()
  config.num_classes = len(demo.DEMO_CLASSES)
  config.audio.target_length = TARGET_LENGTH
  config.data.update(num_train_examples=num_train, num_eval_examples=num_eval, batch_size=batch_size, **data)
  return config, build_sources(config)


def one_clip(batch):
  """A whole-clip batch `[rows, 1, ...]` as `[rows, ...]` (the contract holds one clip slot per row)."""
  assert all(value.shape[1] == 1 for value in batch.values()), {k: v.shape for k, v in batch.items()}
  return {key: value[:, 0] for key, value in batch.items()}


def take(iterator, count):
  return [one_clip(next(iterator)) for _ in range(count)]


def assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_batch_contract():
  config, sources = demo_setup()
  assert clip_samples(config) == CLIP
  batch = next(train_iterator(config, sources, seed=0))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "waveform": ((8, 1, CLIP), np.float32), "num_samples": ((8, 1), np.int32), "label": ((8, 1, 8), np.float32),
      "clip_mask": ((8, 1), np.float32), "index": ((8, 1), np.int32),
  }
  batch = one_clip(batch)
  np.testing.assert_array_equal(batch["clip_mask"], 1.0)
  np.testing.assert_array_equal(batch["label"].sum(1), 1.0)  # no mixup: one-hot
  for waveform, num_samples, label, index in zip(batch["waveform"], batch["num_samples"], batch["label"],
                                                 batch["index"]):
    example = sources.train[index]
    assert label.argmax() == example.labels[0]
    source = remove_mean(demo.demo_waveform(example.audio))  # mean over the whole clip, before the cut
    assert num_samples == min(len(source), CLIP)
    np.testing.assert_array_equal(waveform[:num_samples], source[:num_samples])
    np.testing.assert_array_equal(waveform[num_samples:], 0.0)
  assert (batch["num_samples"] < CLIP).any() and (batch["num_samples"] == CLIP).any()


def test_file_batches_are_16k_mono_mean_removed(tmp_path):
  for name, rate in (("a", 44100), ("b", 8000)):
    write_tone(str(tmp_path / f"{name}.wav"), seconds=0.25, sample_rate=rate, channels=2)
  config = datafile_config(tmp_path, "ab", "/m/car")
  config.data.batch_size = 2
  batch = one_clip(next(train_iterator(config, build_sources(config), seed=0)))
  np.testing.assert_array_equal(batch["num_samples"], 4000)  # 0.25 s at 16 kHz
  assert np.abs(batch["waveform"][:, :4000].mean(1)).max() < 1e-4  # the 0.05 DC offset is gone
  assert 0.2 < batch["waveform"][:, :4000].std() < 0.25  # 0.3 * sin has std 0.21
  np.testing.assert_array_equal(batch["label"], [[0, 0, 1], [0, 0, 1]])


def test_train_stream_epochs_are_fresh_permutations():
  config, sources = demo_setup(num_train=16, batch_size=4)
  assert steps_per_epoch(config, sources) == 4
  indices = np.concatenate([b["index"] for b in take(train_iterator(config, sources, seed=3), 8)])
  first, second = indices[:16], indices[16:]
  assert sorted(first) == list(range(16)) and sorted(second) == list(range(16))
  assert not np.array_equal(first, second)
  again = np.concatenate([b["index"] for b in take(train_iterator(config, sources, seed=3), 8)])
  other_seed = np.concatenate([b["index"] for b in take(train_iterator(config, sources, seed=4), 8)])
  np.testing.assert_array_equal(indices, again)
  assert not np.array_equal(indices, other_seed)


def test_hosts_split_each_global_batch():
  config, sources = demo_setup()
  config.augment.mixup = 0.5
  single = take(train_iterator(config, sources, seed=1), 3)
  hosts = [take(train_iterator(config, sources, seed=1, shard_index=h, shard_count=2), 3) for h in range(2)]
  for step in range(3):
    for key in single[step]:
      assert hosts[0][step][key].shape[0] == 4
      # Host h holds the h-th contiguous half, so the assembled global batch is the single-host batch.
      np.testing.assert_array_equal(single[step][key][:4], hosts[0][step][key], err_msg=key)
      np.testing.assert_array_equal(single[step][key][4:], hosts[1][step][key], err_msg=key)


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_covers_every_example_once(shard_count):
  config, sources = demo_setup(num_eval=21, eval_batch_size=8)
  config.augment.mixup = 1.0  # evaluation must ignore it
  hosts = [[one_clip(b) for b in eval_iterator(config, sources, shard_index=h, shard_count=shard_count)]
           for h in range(shard_count)]
  assert all(len(batches) == 3 for batches in hosts)
  indices = np.concatenate([b["index"] for batches in hosts for b in batches])
  masks = np.concatenate([b["clip_mask"] for batches in hosts for b in batches])
  assert sorted(indices[masks == 1]) == list(range(21)) and np.all(indices[masks == 0] == -1)
  assert (masks == 0).sum() == 3
  if shard_count == 1:
    np.testing.assert_array_equal(indices[:21], np.arange(21))  # in order
  for batches in hosts:
    for batch in batches:
      np.testing.assert_array_equal(batch["waveform"][batch["clip_mask"] == 0], 0.0)
      np.testing.assert_array_equal(batch["label"][batch["clip_mask"] == 0], 0.0)
      np.testing.assert_array_equal(batch["label"][batch["clip_mask"] == 1].sum(1), 1.0)
      for waveform, index in zip(batch["waveform"][batch["clip_mask"] == 1], batch["index"][batch["clip_mask"] == 1]):
        np.testing.assert_array_equal(waveform, _padded(sources.eval[index]))
  assert_same_batches(hosts[0], [one_clip(b) for b in eval_iterator(config, sources, shard_index=0,
                                                                     shard_count=shard_count)])


def _padded(example):
  waveform = remove_mean(demo.demo_waveform(example.audio))[:CLIP]
  return np.pad(waveform, (0, CLIP - len(waveform)))


# ----------------------------------------------------------------------------------------------- mixup


def test_mix_waveforms_follows_upstream():
  rng = np.random.default_rng(0)
  clip, long_partner, short_partner = rng.normal(size=100), rng.normal(size=150), rng.normal(size=60)
  y1, y2 = np.eye(4)[0], np.eye(4)[2]
  for partner in (long_partner, short_partner):
    mixed, label = mix_waveforms(clip, partner, y1, y2, 0.7)
    padded = np.pad(partner, (0, max(0, 100 - len(partner))))[:100]
    expected = 0.7 * clip + 0.3 * padded
    np.testing.assert_allclose(mixed, expected - expected.mean(), atol=1e-6)
    np.testing.assert_allclose(label, [0.7, 0, 0.3, 0], atol=1e-7)
  draws = [draw_mixup(rng, 0.5, 10.0, 7) for _ in range(4000)]
  mixed_draws = [d for d in draws if d is not None]
  assert 0.45 < len(mixed_draws) / len(draws) < 0.55
  lambdas = np.array([d[1] for d in mixed_draws])
  assert abs(lambdas.mean() - 0.5) < 0.01 and abs(lambdas.std() - (1 / 84) ** 0.5) < 0.01  # Beta(10, 10)
  assert set(d[0] for d in mixed_draws) == set(range(7))


def test_mixup_in_the_training_stream():
  config, sources = demo_setup(num_train=40)
  config.augment.mixup = 1.0
  batches = take(train_iterator(config, sources, seed=0), 4)
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-6)
  two_classes = labels[(labels > 0).sum(1) == 2]
  assert len(two_classes) > 20  # most partners carry another class
  # Beta(10, 10) has sd 0.109, so E|lambda - 0.5| is about 0.087.
  assert 0.05 < two_classes.max(1).mean() - 0.5 < 0.13 and two_classes.max() < 0.95
  waveforms, num_samples = (np.concatenate([b[key] for b in batches]) for key in ("waveform", "num_samples"))
  short = num_samples < CLIP
  assert short.sum() >= 3
  means = [waveform[:n].mean() for waveform, n in zip(waveforms[short], num_samples[short])]
  assert np.abs(means).max() < 1e-5  # mean removed after mixing (over the whole clip)


# ----------------------------------------------------------------------------------------------- balanced sampling


def test_balanced_sampling_favours_rare_labels():
  label_sets = [(0,)] * 80 + [(1,)] * 15 + [(2,)] * 4 + [(1, 2)]
  weights = balanced_weights(label_sets, 3)
  np.testing.assert_allclose(weights[:3], 1000 / 80.01)
  np.testing.assert_allclose(weights[-1], 1000 / 16.01 + 1000 / 5.01)
  sampler = EpochSampler(len(label_sets), seed=5, weights=weights)
  draws = np.concatenate([sampler.epoch_order(epoch) for epoch in range(30)])
  first_label = np.array([labels[0] for labels in label_sets])
  share = np.bincount(first_label[draws], minlength=3) / len(draws)
  expected = np.bincount(first_label, weights=weights) / weights.sum()
  np.testing.assert_allclose(share, expected, atol=0.03)
  assert share[2] > 0.15 > 0.04  # label 2 is 5 % of the data but about a quarter of the draws
  np.testing.assert_array_equal(sampler.epoch_order(7), EpochSampler(100, seed=5, weights=weights).epoch_order(7))
  assert len(set(sampler.epoch_order(0))) < 100  # with replacement


def test_balanced_sampling_in_the_training_stream():
  config, sources = demo_setup(num_train=64, batch_size=16, balanced_sampling=True)
  rare = Sources(
      tuple(e for e in sources.train if e.labels[0] != 1 or int(e.audio.split("/")[-1]) < 8),
      sources.eval, sources.label_names,
  )
  labels = np.concatenate([b["label"] for b in take(train_iterator(config, rare, seed=0), 12)]).argmax(1)
  share = np.bincount(labels, minlength=8) / len(labels)
  assert share[1] > 0.08  # one example of class 1 among 57, yet about 1/8 of the draws


# ----------------------------------------------------------------------------------------------- resume


def test_resume_from_saved_state_in_process():
  config, sources = demo_setup()
  config.augment.mixup = 0.5
  iterator = train_iterator(config, sources, seed=0)
  take(iterator, 5)  # mid-epoch (4 steps per epoch)
  state = iterator.get_state()
  expected = take(iterator, 4)
  restored = train_iterator(config, sources, seed=0)
  restored.set_state(state)
  assert_same_batches(expected, take(restored, 4))


def test_resume_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  config, sources = demo_setup()
  config.augment.mixup = 0.5
  iterator = train_iterator(config, sources, seed=0)
  take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, 3)
  restored = train_iterator(config, sources, seed=0)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(expected, take(restored, 3))


def test_resume_with_a_worker_process():
  config, sources = demo_setup(num_workers=1)
  config.augment.mixup = 0.5
  iterator = train_iterator(config, sources, seed=0)
  take(iterator, 2)
  state = iterator.get_state()
  expected = take(iterator, 3)
  restored = train_iterator(config, sources, seed=0)
  restored.set_state(state)
  assert_same_batches(expected, take(restored, 3))
  evaluation = list(eval_iterator(config, sources))
  config.data.num_workers = 0  # batches do not depend on the worker count
  assert_same_batches(expected, take(train_iterator(config, sources, seed=0), 5)[2:])
  assert_same_batches(list(eval_iterator(config, sources)), evaluation)


# ----------------------------------------------------------------------------------------------- faults and cache


def test_run_time_failures(tmp_path, caplog):
  for name in ("a", "b", "c"):
    write_tone(str(tmp_path / f"{name}.wav"))
  config = datafile_config(tmp_path, "abc", "/m/dog")
  config.data.update(batch_size=3, scan="off")
  sources = build_sources(config)
  sources = Sources(sources.train, sources.train, sources.label_names)
  os.remove(tmp_path / "b.wav")  # breaks after the scan
  with pytest.raises(AudioError, match="b.wav: file not found"):
    next(train_iterator(config, sources, seed=0))
  config.data.on_bad_audio = "skip"
  batches = take(train_iterator(config, sources, seed=0), 4)
  assert 1 not in np.concatenate([b["index"] for b in batches])
  assert "b.wav: file not found" in caplog.text
  reader = WaveformReader(sources.train, 16000, skip_bad=True)
  assert reader.read(1)[1] == 2 and reader.replaced == 1 and reader.replaced_by_kind == {"file not found": 1}
  records = TrainRecords(reader, [e.labels for e in sources.train], 3, CLIP)
  assert records(1, np.random.default_rng(0))["index"] == 2
  evaluation = one_clip(next(iter(eval_iterator(config, sources))))
  np.testing.assert_array_equal(evaluation["clip_mask"], [1, 0, 1])  # left out, not counted twice


def test_cache_keeps_decoded_audio(tmp_path):
  write_tone(str(tmp_path / "a.wav"))
  examples = [Example(str(tmp_path / "a.wav"), (0,))]
  reader = WaveformReader(examples, 16000, cache=True)
  first = reader.decode(0)
  os.remove(tmp_path / "a.wav")
  assert reader.decode(0) is first
  with pytest.raises(AudioError):
    WaveformReader(examples, 16000).decode(0)


def test_configuration_errors():
  config, sources = demo_setup(num_train=6, batch_size=8)
  with pytest.raises(ValueError, match="do not fill one batch"):
    steps_per_epoch(config, sources)
  with pytest.raises(ValueError, match="multiple of the host count"):
    train_iterator(config, sources, seed=0, shard_count=3)
  config.num_classes = 527
  with pytest.raises(ValueError, match="num_classes is 527 but the data set has 8 labels"):
    train_iterator(config, sources, seed=0)
