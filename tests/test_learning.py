"""Learning on real audio: FSDD recordings through the whole path (files -> Grain -> front end -> AST -> metrics).

The default suite trains on a two-digit subset for a minute; the slow test is the full recipe of configs/fsdd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio import clip_samples
from ast_jax.predict import window_starts
from ast_jax.train.trainer import train_and_evaluate
from configs import fsdd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDINGS = os.path.join(ROOT, os.pardir, "shared", "data", "fsdd", "recordings")
needs_fsdd = pytest.mark.skipif(not os.path.isdir(RECORDINGS), reason=f"FSDD not found at {RECORDINGS}")


@pytest.fixture(scope="module")
def two_digit_run(tmp_path_factory):
  """'zero' vs 'one' from every speaker (540 training clips, 60 test clips), 12 short epochs."""
  root = tmp_path_factory.mktemp("two_digits")
  subset = root / "recordings"
  subset.mkdir()
  for name in os.listdir(RECORDINGS):
    if name.split("_")[0] in ("0", "1"):
      os.symlink(os.path.join(RECORDINGS, name), subset / name)
  config = fsdd.get_config()
  config.num_classes = 2
  config.data.update(path=str(subset), scan="header", batch_size=16)
  config.model.update(width=96, depth=3, num_heads=3)
  config.optim.update(lr=1e-3, warmup_steps=20)
  config.train.update(epochs=12, progress_bar=False, tensorboard=False)
  record = train_and_evaluate(config, str(root / "work"))
  return record, root / "work"


@pytest.mark.slow  # the default suite's ElasticAST training runs on demo clips (test_elastic_train.py)
@needs_fsdd
def test_elastic_ast_learns_two_digits_at_native_lengths(tmp_path):
  """ElasticAST (configs/fsdd.py:elastic: clips at their own lengths and resolutions, packed) on 'zero' vs 'one'."""
  subset = tmp_path / "recordings"
  subset.mkdir()
  for name in os.listdir(RECORDINGS):
    if name.split("_")[0] in ("0", "1"):
      os.symlink(os.path.join(RECORDINGS, name), subset / name)
  config = fsdd.get_config("elastic")
  config.num_classes = 2
  config.data.update(path=str(subset), scan="header")
  config.model.update(width=96, depth=3, num_heads=3)
  config.packing.update(rows=1, eval_rows=2)  # about 17 clips per step, as the AST run's batch of 16
  config.optim.update(warmup_steps=20)
  config.train.update(epochs=16, progress_bar=False, tensorboard=False)
  config.eval_sweep.update(lengths=(), resolutions=(1.0, 2.5))
  record = train_and_evaluate(config, str(tmp_path / "work"))
  assert record["num_examples"] == 60 and record["accuracy"] >= 0.8, record  # chance: 0.5
  assert record["packing_efficiency"] > 0.9
  sweep = (tmp_path / "work" / "sweep.csv").read_text().splitlines()
  assert len(sweep) == 3


@needs_fsdd
def test_two_digits_learned_from_real_recordings(two_digit_run):
  record, workdir = two_digit_run
  assert record["num_examples"] == 60
  assert record["accuracy"] >= 0.85, record  # chance: 0.5
  assert (workdir / "model" / "model.safetensors").exists()


def predict(checkpoint, files, *extra):
  result = subprocess.run([sys.executable, "-m", "ast_jax.predict", f"--checkpoint={checkpoint}", "--top_k=1",
                           *extra, *map(str, files)], cwd=ROOT, check=True, capture_output=True, text=True)
  return result.stdout.splitlines()


def predicted_digits(lines):
  return {line.split(" (")[0]: line.split(": ")[1].split(" ")[0] for line in lines if not line.startswith(" ")}


def concatenated_digits(path, digits, takes=range(5), seconds=30.0):
  """FSDD test clips of `digits`, 0.3 s of silence between them, repeated to `seconds` (8 kHz, as FSDD)."""
  pieces, silence = [], np.zeros(2400, np.float32)
  while sum(len(p) for p in pieces) < seconds * 8000:
    for take in takes:
      for digit in digits:
        clip, rate = sf.read(os.path.join(RECORDINGS, f"{digit}_jackson_{take}.wav"), dtype="float32")
        pieces += [clip, silence]
  sf.write(path, np.concatenate(pieces), 8000)


@needs_fsdd
def test_predict_prints_the_right_digits_and_windows_long_files(two_digit_run, tmp_path):
  _, workdir = two_digit_run
  files = sorted(os.path.join(RECORDINGS, name) for name in os.listdir(RECORDINGS)
                 if name.split("_")[0] in ("0", "1") and int(name[:-4].split("_")[2]) < 5)
  long_file = tmp_path / "thirty_seconds.wav"
  concatenated_digits(long_file, ("0", "1"))
  lines = predict(workdir / "model", files + [long_file], f"--logits={tmp_path / 'logits.npy'}",
                  f"--embeddings={tmp_path / 'embeddings.npy'}")
  digits = predicted_digits(lines)
  right = sum(digits[path] == os.path.basename(path)[0] for path in files)
  assert right >= 0.85 * len(files), lines
  window_lines = [line for line in lines if line.startswith("  ")]
  # A 30 s file in windows of the model's input (1.015 s) with half of that as hop: one result per window.
  samples_16k = round(sf.info(str(long_file)).frames * 2)
  window = clip_samples(100, 16000)
  assert sf.info(str(long_file)).duration >= 30.0
  assert len(window_lines) == len(window_starts(samples_16k, window, window // 2)) > 55
  assert all(" s: " in line for line in window_lines)
  assert np.load(tmp_path / "logits.npy").shape == (len(files) + 1, 2)
  assert np.load(tmp_path / "embeddings.npy").shape == (len(files) + 1, 96)

  # An unreadable file: exit 1 and nothing saved, unless --skip_unreadable accepts partial results (a NaN row).
  broken = tmp_path / "broken.wav"
  broken.write_bytes(b"RIFF not audio")
  command = [sys.executable, "-m", "ast_jax.predict", f"--checkpoint={workdir / 'model'}", "--top_k=1",
             f"--logits={tmp_path / 'partial.npy'}", files[0], str(broken)]
  refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert refused.returncode == 1 and "1 of 2 files could not be read" in refused.stderr, refused.stderr[-2000:]
  assert "broken.wav" in refused.stderr and "--skip_unreadable" in refused.stderr
  assert not (tmp_path / "partial.npy").exists()
  subprocess.run(command + ["--skip_unreadable"], cwd=ROOT, check=True, capture_output=True)
  partial = np.load(tmp_path / "partial.npy")
  assert np.isfinite(partial[0]).all() and np.isnan(partial[1]).all()


@pytest.mark.slow
@needs_fsdd
def test_fsdd_recipe_reaches_95_percent(tmp_path):
  """The acceptance run: `python -m ast_jax.main --config=configs/fsdd.py` from scratch, upstream split."""
  workdir = tmp_path / "fsdd"
  subprocess.run([sys.executable, "-m", "ast_jax.main", "--config=configs/fsdd.py", f"--workdir={workdir}",
                  "--config.train.progress_bar=False"], cwd=ROOT, check=True, timeout=45 * 60)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["epoch"] == 30 and records[-1]["num_examples"] == 300
  assert records[-1]["accuracy"] >= 0.95, records[-1]
  # The trained model, through ast_jax.predict: one test take of every speaker and digit.
  files = [os.path.join(RECORDINGS, f"{digit}_{speaker}_0.wav") for digit in range(10)
           for speaker in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")]
  digits = predicted_digits(predict(workdir / "model", files))
  assert sum(digits[path] == os.path.basename(path)[0] for path in files) >= 0.9 * len(files)


@pytest.mark.slow
@needs_fsdd
def test_fsdd_elastic_recipe_stays_flat_across_lengths_and_resolutions(tmp_path):
  """The ElasticAST acceptance run: `python -m ast_jax.main --config=configs/fsdd.py:elastic`, then its sweep over
  length caps 64-240 frames and q = 1, 1.5, 2, 2.5 (docs/RESULTS.md: 97.0-97.3 %)."""
  import csv

  workdir = tmp_path / "fsdd_elastic"
  subprocess.run([sys.executable, "-m", "ast_jax.main", "--config=configs/fsdd.py:elastic", f"--workdir={workdir}",
                  "--config.train.progress_bar=False"], cwd=ROOT, check=True, timeout=45 * 60)
  with open(workdir / "sweep.csv") as handle:
    accuracies = [float(row["accuracy"]) for row in csv.DictReader(handle)]
  assert len(accuracies) == 9 and min(accuracies) >= 0.95 and max(accuracies) - min(accuracies) <= 0.03, accuracies
