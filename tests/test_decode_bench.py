"""The input decode benchmark (ast_jax/bench/decode.py) and the fast paths of decoding it measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio.io import read_audio
from ast_jax.bench import decode
from ast_jax.data.mixup import match_length
from ast_jax.data.reader import make_record


def test_report_counts_rates_and_json(tmp_path):
  report = decode.run(str(tmp_path), clips=6, seconds=0.5, formats=("flac", "wav"), workers=(0,), packed=True,
                      batch=2, warmup=1, batches=3, min_seconds=0.0)
  assert [(row["format"], row["path"], row["workers"]) for row in report["cases"]] == [
      ("flac", "whole_clip", 0), ("flac", "packed", 0), ("wav", "whole_clip", 0), ("wav", "packed", 0)]
  for row in report["cases"]:
    assert row["batches"] >= 3 and row["cores"] == 1
    if row["path"] == "whole_clip":
      assert row["clips"] == 2 * row["batches"]  # whole-clip training batches have no empty slots
    for key in ("clips_per_s", "clips_per_s_per_core", "clips_per_cpu_s", "seconds"):
      assert math.isfinite(row[key]) and row[key] > 0, key
  for fmt in ("flac", "wav"):
    floor = report["formats"][fmt]["floor"]
    assert [row["stage"] for row in floor] == ["sf.read", "load_audio", "record"]
    assert all(row["clips"] == 6 and math.isfinite(row["clips_per_s"]) and row["clips_per_s"] > 0 for row in floor)
    assert report["formats"][fmt]["bytes_per_clip"] > 0
  path = tmp_path / "report.json"
  path.write_text(json.dumps(report))
  loaded = json.loads(path.read_text())
  assert {"machine", "date", "command", "audio", "clips_per_format", "cases", "formats", "load_start",
          "load_end"} <= set(loaded)
  assert {"cpu", "cores", "grain", "libsndfile"} <= set(loaded["machine"])
  assert {"load_before", "load_after", "cpu_cores_used", "mixup"} <= set(loaded["cases"][0])
  table = decode.format_table(report)
  assert table.count("whole_clip") == 2 and table.count("sf.read") == 2


@pytest.mark.parametrize("container", ["WAV", "AIFF", "FLAC"])
def test_16_bit_pcm_reads_as_libsndfile_floats(tmp_path, container):
  # Every int16 value, in two channels: the int16 fast path must give libsndfile's float32 samples bit for bit.
  values = np.arange(-32768, 32768, dtype=np.int16)
  path = str(tmp_path / f"all.{container.lower()}")
  sf.write(path, np.stack([values, values[::-1]], axis=1), 16000, subtype="PCM_16", format=container)
  expected, rate = sf.read(path, dtype="float32", always_2d=True)
  samples, file_rate = read_audio(path)
  assert samples.dtype == np.float32 and file_rate == rate
  np.testing.assert_array_equal(samples.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("length", [0, 5, 16, 40])
def test_record_pads_or_cuts_as_before(length):
  waveform = np.random.default_rng(length).standard_normal(length)  # float64: cast as the old astype did
  record = make_record(waveform, np.ones(3), 7, clip_samples=16)
  np.testing.assert_array_equal(record["waveform"], match_length(waveform, 16).astype(np.float32)[None])
  assert record["waveform"].dtype == np.float32 and record["num_samples"].tolist() == [min(length, 16)]
