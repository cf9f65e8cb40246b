"""Data sources on small files in their real formats, the demo set, and the bad-audio scan."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio.io import AudioError
from ast_jax.data import BadDataError, DataError, build_sources, demo
from ast_jax.data.sources import natural_key
from configs.common import base_config

FSDD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fsdd")


def write_tone(path, seconds=0.2, sample_rate=16000, channels=1, frequency=440.0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  time = np.arange(int(seconds * sample_rate)) / sample_rate
  tone = 0.3 * np.sin(2 * np.pi * frequency * time) + 0.05  # a DC offset that mean removal must take out
  sf.write(path, np.stack([tone] * channels, axis=1) if channels > 1 else tone, sample_rate)


def write_label_csv(path, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "mid", "display_name"])
    writer.writerows((i, mid, name) for i, (mid, name) in enumerate(rows))


def datafile_config(tmp_path, train_entries, eval_entries=()):
  write_label_csv(tmp_path / "labels.csv", [("/m/dog", "Dog"), ("/m/cat", "Cat"), ("/m/car", "Car")])
  for name, entries in (("train.json", train_entries), ("eval.json", eval_entries)):
    (tmp_path / name).write_text(json.dumps({"data": list(entries)}))
  config = base_config()
  config.data.update(source="datafile", train_datafile=str(tmp_path / "train.json"),
                     eval_datafile=str(tmp_path / "eval.json"), label_csv=str(tmp_path / "labels.csv"))
  config.num_classes = 3
  return config


def test_datafile_source(tmp_path):
  for name in ("a", "b", "c"):
    write_tone(str(tmp_path / f"{name}.flac"))
  config = datafile_config(
      tmp_path,
      [{"wav": str(tmp_path / "a.flac"), "labels": "/m/cat,/m/dog"},
       {"wav": str(tmp_path / "b.flac"), "labels": "/m/car"}],
      [{"wav": str(tmp_path / "c.flac"), "labels": "/m/dog"}],
  )
  sources = build_sources(config)
  assert sources.label_names == ("Dog", "Cat", "Car")
  assert [e.labels for e in sources.train] == [(0, 1), (2,)]
  assert sources.eval[0].audio.endswith("c.flac") and sources.eval[0].labels == (0,)
  assert sources.skipped_files == 0


def test_datafile_unknown_label_names_the_entry(tmp_path):
  write_tone(str(tmp_path / "a.wav"))
  config = datafile_config(tmp_path, [{"wav": str(tmp_path / "a.wav"), "labels": "/m/dog,/m/unicorn"}])
  with pytest.raises(DataError, match=r"a.wav: unknown label: .*train.json entry 0: /m/unicorn not in"):
    build_sources(config)


def test_datafile_entry_without_labels_names_the_entry(tmp_path):
  write_tone(str(tmp_path / "a.wav"))
  write_tone(str(tmp_path / "b.wav"))
  config = datafile_config(tmp_path, [{"wav": str(tmp_path / "a.wav"), "labels": "/m/dog"},
                                      {"wav": str(tmp_path / "b.wav"), "labels": ""}])
  with pytest.raises(DataError, match=r"b.wav: no labels: .*train.json entry 1 has an empty label list"):
    build_sources(config)


def test_esc50_source(tmp_path):
  rows = []
  for fold in (1, 2, 3):
    for target, category in ((0, "dog"), (1, "rooster")):
      filename = f"{fold}-{100 + target}-A-{target}.wav"
      write_tone(str(tmp_path / "audio" / filename), seconds=0.1, sample_rate=44100, channels=2)
      rows.append([filename, fold, target, category, "True", 100 + target, "A"])
  os.makedirs(tmp_path / "meta")
  with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
    csv.writer(f).writerows([["filename", "fold", "target", "category", "esc10", "src_file", "take"]] + rows)
  config = base_config()
  config.data.update(source="esc50", path=str(tmp_path), fold=2)
  sources = build_sources(config)
  assert sources.label_names == ("dog", "rooster")
  assert len(sources.train) == 4 and len(sources.eval) == 2
  assert all(os.path.basename(e.audio).startswith("2-") for e in sources.eval)
  assert sorted(e.labels for e in sources.eval) == [(0,), (1,)]


def make_speechcommands(root):
  words = ("yes", "no", "up")
  for word in words:
    for speaker in range(4):
      write_tone(str(root / word / f"{speaker:08x}_nohash_0.wav"), seconds=0.05)
  write_tone(str(root / "_background_noise_" / "white_noise.wav"), seconds=0.05)
  (root / "validation_list.txt").write_text("\n".join(f"{w}/00000001_nohash_0.wav" for w in words) + "\n")
  (root / "testing_list.txt").write_text("\n".join(f"{w}/00000002_nohash_0.wav" for w in words) + "\n")


@pytest.mark.parametrize("eval_split, speaker", [("validation", 1), ("test", 2)])
def test_speechcommands_source(tmp_path, eval_split, speaker):
  make_speechcommands(tmp_path)
  config = base_config()
  config.data.update(source="speechcommands", path=str(tmp_path), eval_split=eval_split)
  sources = build_sources(config)
  assert sources.label_names == ("no", "up", "yes")  # sorted folder names
  assert len(sources.train) == 6 and len(sources.eval) == 3  # 12 clips - 3 validation - 3 test
  assert all(f"{speaker:08x}_nohash" in e.audio for e in sources.eval)
  assert not any("_background_noise_" in e.audio for e in sources.train + sources.eval)


def test_speechcommands_label_csv_sets_indices(tmp_path):
  make_speechcommands(tmp_path)
  write_label_csv(tmp_path / "labels.csv", [("/m/spcmd00", "up"), ("/m/spcmd01", "yes"), ("/m/spcmd02", "no")])
  config = base_config()
  config.data.update(source="speechcommands", path=str(tmp_path), label_csv=str(tmp_path / "labels.csv"))
  sources = build_sources(config)
  assert sources.label_names == ("up", "yes", "no")
  assert all(e.labels == (("up", "yes", "no").index(e.audio.split(os.sep)[-2]),) for e in sources.train)


def fsdd_config(split, held_out="", path=FSDD):
  config = base_config()
  config.data.update(source="folder", path=path, split=split, held_out=held_out, scan="off")
  return config


@pytest.mark.skipif(not os.path.isdir(FSDD), reason="FSDD not available")
@pytest.mark.parametrize("split, held_out, sizes", [("takes", "", (2700, 300)), ("speaker", "theo", (2500, 500))])
def test_fsdd_splits(split, held_out, sizes):
  sources = build_sources(fsdd_config(split, held_out))
  assert (len(sources.train), len(sources.eval)) == sizes
  assert sources.label_names == tuple(str(d) for d in range(10))
  if split == "takes":
    assert all(int(e.audio[:-4].split("_")[-1]) < 5 for e in sources.eval)
  else:
    assert all("_theo_" in e.audio for e in sources.eval) and not any("_theo_" in e.audio for e in sources.train)
  for example in sources.train[:50]:
    assert sources.label_names[example.labels[0]] == os.path.basename(example.audio).split("_")[0]


def test_folder_source_accepts_dataset_root_and_sorts_naturally(tmp_path):
  for label in ("10", "2", "1"):
    for take in (0, 7):
      write_tone(str(tmp_path / "recordings" / f"{label}_anna_{take}.wav"), seconds=0.05)
  sources = build_sources(fsdd_config("takes", path=str(tmp_path)))
  assert sources.label_names == ("1", "2", "10")
  assert len(sources.train) == 3 and len(sources.eval) == 3
  assert sorted(["b10", "b2", "a"], key=natural_key) == ["a", "b2", "b10"]


# ----------------------------------------------------------------------------------------------- demo


def test_demo_set_is_deterministic_and_balanced():
  config = base_config()
  config.data.update(num_train_examples=40, num_eval_examples=16)
  sources = build_sources(config)
  assert len(sources.label_names) >= 6 and len(sources.train) == 40 and len(sources.eval) == 16
  counts = np.bincount([e.labels[0] for e in sources.train], minlength=len(sources.label_names))
  assert counts.max() - counts.min() <= 1
  key = sources.train[3].audio
  np.testing.assert_array_equal(demo.demo_waveform(key), demo.demo_waveform(key))
  assert not np.array_equal(demo.demo_waveform(key), demo.demo_waveform(demo.demo_key(1, "train", 3)))
  assert not np.array_equal(demo.demo_waveform(sources.eval[3].audio), demo.demo_waveform(key))
  lengths = [len(demo.demo_waveform(e.audio)) / 16000 for e in sources.train]
  assert 0.3 <= min(lengths) and max(lengths) <= 1.5 and max(lengths) - min(lengths) > 0.5
  assert all(np.abs(demo.demo_waveform(e.audio)).max() <= 1.0 for e in sources.train)


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y, num_classes):
  means = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
  scale = train_x.std(0) + 1e-9
  distances = (((test_x[:, None, :] - means[None]) / scale) ** 2).sum(-1)
  return float(np.mean(distances.argmin(1) == test_y))


def test_demo_classes_differ_in_spectrum_not_in_loudness():
  """A spectral template separates the classes; the level alone stays near chance (1/8)."""
  k = len(demo.DEMO_CLASSES)

  def features(split, count):
    spectra, levels, labels = [], [], []
    for i in range(count):
      waveform = demo.demo_waveform(demo.demo_key(0, split, i))
      frames = waveform[: len(waveform) // 256 * 256].reshape(-1, 256)
      power = np.abs(np.fft.rfft(frames * np.hanning(256), axis=1))[:, :128] ** 2
      bands = np.log(power.reshape(len(power), 16, 8).sum(-1) + 1e-10)  # 16 bands of 500 Hz per 16 ms frame
      half = len(bands) // 2  # first and second half tell an up chirp from a down chirp
      spectra.append(np.concatenate([bands[:half].mean(0), bands[half:].mean(0), bands.std(0)]))
      levels.append([10 * np.log10(np.mean(waveform**2)), 20 * np.log10(np.abs(waveform).max())])
      labels.append(i % k)
    return np.array(spectra), np.array(levels), np.array(labels)

  train_spectra, train_levels, train_y = features("train", 160)
  eval_spectra, eval_levels, eval_y = features("eval", 80)
  assert _nearest_mean_accuracy(train_spectra, train_y, eval_spectra, eval_y, k) > 0.5
  assert _nearest_mean_accuracy(train_levels, train_y, eval_levels, eval_y, k) < 0.35


# ----------------------------------------------------------------------------------------------- bad audio


def bad_datafile(tmp_path):
  """A datafile with three good clips and a missing, a corrupt and an empty file."""
  for name in ("good1", "good2", "good3"):
    write_tone(str(tmp_path / f"{name}.wav"))
  (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
  (tmp_path / "empty.wav").write_bytes(b"")
  names = ["good1", "missing", "corrupt", "good2"]
  return datafile_config(
      tmp_path,
      [{"wav": str(tmp_path / f"{n}.wav"), "labels": "/m/dog"} for n in names],
      [{"wav": str(tmp_path / "empty.wav"), "labels": "/m/cat"},
       {"wav": str(tmp_path / "good3.wav"), "labels": "/m/cat"}],
  )


@pytest.mark.parametrize("scan", ["header", "decode"])
def test_bad_files_raise_one_error_listing_all(tmp_path, scan):
  config = bad_datafile(tmp_path)
  config.data.scan = scan
  with pytest.raises(BadDataError) as raised:
    build_sources(config)
  assert isinstance(raised.value, AudioError)
  message = str(raised.value)
  assert "3 bad data set entries (1 file not found, 1 empty file, 1 not audio)" in message
  assert "missing.wav: file not found: no such file" in message
  assert "eval  " + str(tmp_path / "empty.wav") + ": empty file: 0 bytes" in message
  assert "corrupt.wav: not audio: cannot" in message
  assert "good" not in message
  assert sorted((os.path.basename(p.path), p.kind) for p in raised.value.problems) == [
      ("corrupt.wav", "not audio"), ("empty.wav", "empty file"), ("missing.wav", "file not found")]


def test_bad_files_skipped_and_counted(tmp_path, caplog):
  config = bad_datafile(tmp_path)
  config.data.on_bad_audio = "skip"
  sources = build_sources(config)
  assert sources.skipped_files == 3
  assert sources.skipped == {"file not found": 1, "empty file": 1, "not audio": 1}
  assert [os.path.basename(e.audio) for e in sources.train] == ["good1.wav", "good2.wav"]
  assert [os.path.basename(e.audio) for e in sources.eval] == ["good3.wav"]
  assert "Skipping 3 bad data set entries: 1 file not found, 1 empty file, 1 not audio" in caplog.text


def test_decode_scan_catches_silent_files(tmp_path):
  write_tone(str(tmp_path / "good.wav"))
  sf.write(str(tmp_path / "silent.wav"), np.zeros(800), 16000)
  entries = [{"wav": str(tmp_path / n), "labels": "/m/dog"} for n in ("good.wav", "silent.wav")]
  config = datafile_config(tmp_path, entries)
  assert build_sources(config).skipped_files == 0  # a header scan cannot see silence
  config.data.scan = "decode"
  with pytest.raises(BadDataError, match="silent.wav: silent: every sample is zero"):
    build_sources(config)
