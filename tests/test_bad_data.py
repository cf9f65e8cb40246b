"""Bad data: a fuzzed data set (real FSDD recordings plus one bad entry or file of every kind) through the scan, the
validate command, error mode, skip mode, and a skip-mode training run that must equal a run over the clean subset.

Reading a mode-000 file must really be denied. Root reads it anyway, so as root the scanning parts run in a child
process without root's file-permission override (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH dropped before exec: the
interpreter under /root stays reachable, the mode-000 file does not); as another user they run here.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr

from ast_jax.data import build_sources
from ast_jax.data.scan import AudioChecks, BadDataError, check_file
from ast_jax.validate import CLEAN, PROBLEMS, BAD_CONFIG, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDINGS = os.path.join(ROOT, os.pardir, "shared", "data", "fsdd", "recordings")
pytestmark = pytest.mark.skipif(not os.path.isdir(RECORDINGS), reason=f"FSDD not found at {RECORDINGS}")

TRAIN = [f"{digit}_jackson_{take}.wav" for digit in range(10) for take in range(5, 10)][:48]
EVAL = [f"{digit}_theo_{take}.wav" for digit in range(8) for take in (0, 1)]
# What a decode scan of the fuzzed set finds, per kind; a header scan misses what only decoding shows.
DECODE_COUNTS = {"no audio path": 1, "no labels": 1, "unknown label": 1, "duplicate entry": 2, "file not found": 1,
                 "unreadable": 1, "empty file": 1, "not audio": 1, "truncated": 2, "too short": 1,
                 "too many channels": 1, "sample rate": 1, "non-finite samples": 2, "silent": 1}
DECODE_ONLY = ("truncated.flac", "nan.wav", "inf.wav", "silent.wav")
COMPARED_METRICS = ("loss", "accuracy", "mAP", "mAUC", "d_prime", "train_loss", "lr", "num_examples", "step", "epoch")


def entry(path: str, digit: int | str) -> dict:
  return {"wav": path, "labels": f"/m/digit{digit}"}


def digit_of(name: str) -> int:
  return int(name.split("_")[0])


def write_bad_files(audio: str) -> dict[str, str]:
  """One file of every kind of bad audio (and a valid 8-bit one) made from real recordings; {name: path}."""
  source = os.path.join(RECORDINGS, "4_nicolas_20.wav")
  samples, rate = sf.read(source, dtype="float32")
  paths = {name: os.path.join(audio, name) for name in (
      "truncated.wav", "truncated.flac", "empty.wav", "one_sample.wav", "nan.wav", "inf.wav", "not_audio.wav",
      "eight_channels.wav", "rate96k.wav", "missing.wav", "unreadable.wav", "silent.wav", "eight_bit.wav")}
  wav = pathlib.Path(source).read_bytes()
  pathlib.Path(paths["truncated.wav"]).write_bytes(wav[:len(wav) * 3 // 5])  # the header still declares it all
  flac = io.BytesIO()
  sf.write(flac, samples, rate, format="FLAC")
  pathlib.Path(paths["truncated.flac"]).write_bytes(flac.getvalue()[:len(flac.getvalue()) * 3 // 5])
  pathlib.Path(paths["empty.wav"]).write_bytes(b"")
  sf.write(paths["one_sample.wav"], samples[:1], rate)
  for name, value in (("nan.wav", np.nan), ("inf.wav", np.inf)):
    sf.write(paths[name], np.where(np.arange(len(samples)) == 300, value, samples), rate, subtype="FLOAT")
  pathlib.Path(paths["not_audio.wav"]).write_bytes(np.random.default_rng(0).bytes(4000))
  sf.write(paths["eight_channels.wav"], np.repeat(samples[:, None], 8, axis=1), rate)
  sf.write(paths["rate96k.wav"], soxr.resample(samples, rate, 96000), 96000)
  shutil.copy(source, paths["unreadable.wav"])
  os.chmod(paths["unreadable.wav"], 0)
  sf.write(paths["silent.wav"], np.zeros(4000, np.float32), rate)
  sf.write(paths["eight_bit.wav"], samples, rate, subtype="PCM_U8")
  return paths


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> dict:
  """The fuzzed data set and its clean subset as datafile sources (10-row label CSV, train and eval JSON)."""
  root = tmp_path_factory.mktemp("bad_data")
  audio = str(root / "audio")
  os.makedirs(audio)
  bad = write_bad_files(audio)
  with open(root / "labels.csv", "w") as f:
    f.write("index,mid,display_name\n" + "".join(f"{d},/m/digit{d},{d}\n" for d in range(10)))
  fsdd = {name: os.path.join(RECORDINGS, name) for name in TRAIN + EVAL}
  good_train = [entry(fsdd[name], digit_of(name)) for name in TRAIN]
  good_eval = [entry(fsdd[name], digit_of(name)) for name in EVAL]
  # (entry, expected kind or None); spread through the lists, so skip mode must keep the good entries' order.
  train_bad = [
      (entry(bad["truncated.wav"], 4), "truncated"), (entry(bad["truncated.flac"], 4), "truncated"),
      (entry(bad["empty.wav"], 4), "empty file"), (entry(bad["one_sample.wav"], 4), "too short"),
      (entry(bad["nan.wav"], 4), "non-finite samples"), (entry(bad["not_audio.wav"], 4), "not audio"),
      (entry(bad["eight_channels.wav"], 4), "too many channels"), (entry(bad["missing.wav"], 4), "file not found"),
      (entry(bad["unreadable.wav"], 4), "unreadable"), (entry(bad["silent.wav"], 4), "silent"),
      ({"wav": os.path.join(RECORDINGS, "3_yweweler_30.wav"), "labels": "/m/digit3,/m/unicorn"}, "unknown label"),
      ({"labels": "/m/digit1"}, "no audio path"),
      (good_train[5], "duplicate entry"),  # the first copy stays
      (good_eval[3], "duplicate entry"),  # leakage: the training copy goes
      (entry(bad["eight_bit.wav"], 4), None),  # valid: a note, not a problem
  ]
  eval_bad = [(entry(bad["inf.wav"], 4), "non-finite samples"), (entry(bad["rate96k.wav"], 4), "sample rate"),
              ({"wav": os.path.join(RECORDINGS, "2_yweweler_30.wav"), "labels": ""}, "no labels")]
  fuzzed_train = interleave([(e, None) for e in good_train], train_bad)
  fuzzed_eval = interleave([(e, None) for e in good_eval], eval_bad)
  files = {}
  for name, entries in (("fuzzed", (fuzzed_train, fuzzed_eval)),
                        ("clean", ([(e, k) for e, k in fuzzed_train if k is None],
                                   [(e, k) for e, k in fuzzed_eval if k is None]))):
    for split, pairs in zip(("train", "eval"), entries):
      files[f"{name}_{split}"] = str(root / f"{name}_{split}.json")
      with open(files[f"{name}_{split}"], "w") as f:
        json.dump({"data": [e for e, _ in pairs]}, f)
  return {"root": str(root), "bad": bad, "files": files, "label_csv": str(root / "labels.csv"),
          "train": fuzzed_train, "eval": fuzzed_eval}


def interleave(good: list, bad: list) -> list:
  """Every bad item after a good one, spread evenly."""
  step = max(1, len(good) // (len(bad) + 1))
  merged = list(good)
  for number, item in reversed(list(enumerate(bad))):
    merged.insert(min(len(merged), (number + 1) * step), item)
  return merged


def data_config(files: dict, label_csv: str, name: str = "fuzzed", **data):
  """configs/fsdd.py's recipe (8 kHz) on a datafile source, with a tiny AST for a short run."""
  from configs import fsdd

  config = fsdd.get_config()
  config.data.update(source="datafile", path="", split="", train_datafile=files[f"{name}_train"],
                     eval_datafile=files[f"{name}_eval"], label_csv=label_csv, batch_size=16, eval_batch_size=16,
                     num_workers=0, cache_audio=False, scan="decode", **data)
  config.model.update(width=32, depth=1, num_heads=2)
  config.optim.update(warmup_steps=2)
  config.train.update(epochs=2, progress_bar=False, tensorboard=False, log_every_steps=100)
  config.eval_sweep.update(lengths=(), resolutions=())
  return config


# ----------------------------------------------------------------------------------------------- where denial is real


# Root keeps its uid but gives up the capabilities that bypass file modes, then runs the command (dropped from the
# bounding set in a fresh single-threaded interpreter, so they are gone after exec).
_WITHOUT_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
  if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
    sys.exit(f"prctl(PR_CAPBSET_DROP) failed (errno {ctypes.get_errno()}): cannot test permission denial as root")
os.execv(sys.argv[1], sys.argv[1:])
"""


def unprivileged(command: list[str]) -> subprocess.CompletedProcess:
  """Runs `command` where reading a mode-000 file is denied (as root: without the file-permission override)."""
  if os.geteuid() == 0:
    command = [sys.executable, "-c", _WITHOUT_OVERRIDE, *command]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))])}
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def denied(function_name: str, *args) -> dict:
  """`function_name(*args)` of this module, run where reading a mode-000 file is denied; its result via JSON."""
  if os.geteuid() != 0:
    return json.loads(json.dumps(globals()[function_name](*args)))
  code = ("import json, sys, test_bad_data as t; "
          f"json.dump(t.{function_name}(*json.loads(sys.argv[1])), open(sys.argv[2], 'w'))")
  output = os.path.join(args[0]["root"], f"{function_name}.json")
  child = unprivileged([sys.executable, "-c", code, json.dumps(args), output])
  assert child.returncode == 0, child.stderr[-3000:]
  with open(output) as f:
    return json.load(f)


def scan_outcomes(fuzzed: dict) -> dict:
  """Header-scan report (validate.check), the error-mode error, and skip mode's sources, as JSON."""
  from ast_jax.validate import check

  config = data_config(fuzzed["files"], fuzzed["label_csv"])
  outcome = {"readable": os.access(fuzzed["bad"]["unreadable.wav"], os.R_OK),
             "header": check(data_config(fuzzed["files"], fuzzed["label_csv"]), "header")}
  try:
    build_sources(config)
  except BadDataError as error:
    outcome["error"] = {"message": str(error), "problems": [p._asdict() for p in error.problems]}
  config.data.on_bad_audio = "skip"
  sources = build_sources(config)
  outcome["skip"] = {"train": sources.train, "eval": sources.eval, "skipped": sources.skipped,
                     "skipped_files": sources.skipped_files}
  clean = build_sources(data_config(fuzzed["files"], fuzzed["label_csv"], "clean"))
  outcome["clean"] = {"train": clean.train, "eval": clean.eval, "skipped_files": clean.skipped_files}
  return outcome


def training_records(fuzzed: dict) -> dict:
  """Final evaluation records of a skip-mode run over the fuzzed set and of a run over the clean subset."""
  from ast_jax.train.trainer import train_and_evaluate

  records = {}
  for name in ("fuzzed", "clean"):
    config = data_config(fuzzed["files"], fuzzed["label_csv"], name, on_bad_audio="skip")
    records[name] = train_and_evaluate(config, os.path.join(fuzzed["root"], f"work_{name}"))
  return records


@pytest.fixture(scope="module")
def outcomes(fuzzed) -> dict:
  return denied("scan_outcomes", fuzzed)


# ----------------------------------------------------------------------------------------------- tests


def expected_problems(fuzzed: dict, header: bool = False) -> list[tuple[str, str, str]]:
  """(split, path, kind) of every bad entry, entry problems first, as a scan reports them."""
  rows = []
  for split in ("train", "eval"):
    for item, kind in fuzzed[split]:
      name = os.path.basename(item.get("wav", ""))
      if kind is not None and not (header and name in DECODE_ONLY):
        rows.append((split, item.get("wav", "entry"), kind))
  return sorted(rows)


def problem_rows(problems: list[dict]) -> list[tuple[str, str, str]]:
  return sorted((p["split"], p["path"] if p["kind"] != "no audio path" else "entry", p["kind"]) for p in problems)


def test_every_kind_in_header_and_decode_scans(fuzzed):
  """Each bad file's kind from check_file in both modes (the mode-000 file: see the tests that drop privileges)."""
  checks = AudioChecks(max_channels=2, sample_rates=(8000,), min_duration_ms=25.0)
  kinds = {os.path.basename(item["wav"]): kind for item, kind in fuzzed["train"] + fuzzed["eval"] if "wav" in item}
  for name, path in fuzzed["bad"].items():
    if name == "unreadable.wav" and os.geteuid() == 0:
      continue
    decode, header = check_file(path, "decode", checks), check_file(path, "header", checks)
    assert decode.kind == kinds[name], (name, decode)
    assert header.kind == (None if name in DECODE_ONLY else kinds[name]), (name, header)
  report = check_file(fuzzed["bad"]["eight_bit.wav"], "decode", checks)
  assert (report.kind, report.subtype, report.sample_rate) == (None, "PCM_U8", 8000)
  assert "declares" in check_file(fuzzed["bad"]["truncated.wav"], "header", checks).detail
  assert "200 samples at 8000 Hz" in check_file(fuzzed["bad"]["one_sample.wav"], "header", checks).detail


def test_validate_command_reports_every_problem(fuzzed):
  report_path = os.path.join(fuzzed["root"], "report.json")
  args = [f"--config.data.{k}={v}" for k, v in (("source", "datafile"), ("train_datafile", fuzzed["files"]
          ["fuzzed_train"]), ("eval_datafile", fuzzed["files"]["fuzzed_eval"]), ("label_csv", fuzzed["label_csv"]))]
  child = unprivileged([sys.executable, "-m", "ast_jax.validate", "--config=configs/fsdd.py", *args,
                        f"--json={report_path}"])
  assert child.returncode == PROBLEMS, child.stderr[-3000:]
  with open(report_path) as f:
    report = json.load(f)
  assert report["counts"] == DECODE_COUNTS and report["scan"] == "decode"
  assert problem_rows(report["problems"]) == expected_problems(fuzzed)
  # Every file whose header reads: 64 recordings, the 8-bit copy and 7 bad files at 8 kHz; the 96 kHz file.
  assert report["notes"]["sample rates"] == {"8000 Hz": 72, "96000 Hz": 1}
  assert report["notes"]["channels"] == {"1": 72, "8": 1}
  assert report["notes"]["8-bit PCM files"] == [fuzzed["bad"]["eight_bit.wav"]]
  lines = child.stdout.splitlines()
  assert f"train  {fuzzed['bad']['unreadable.wav']}: unreadable: permission denied" in lines
  assert any(line.startswith(f"eval  {fuzzed['bad']['rate96k.wav']}: sample rate: 96000 Hz") for line in lines)
  assert "17 problem(s):" in lines and "  sample rates: 8000 Hz x 72, 96000 Hz x 1" in lines


def test_validate_clean_subset_and_bad_config(fuzzed, capsys):
  assert run(data_config(fuzzed["files"], fuzzed["label_csv"], "clean"), "decode") == CLEAN
  assert "no problems" in capsys.readouterr().out
  bad = data_config(fuzzed["files"], fuzzed["label_csv"], "clean", max_channels=0)
  assert run(bad, "header") == BAD_CONFIG
  missing = data_config(fuzzed["files"], fuzzed["label_csv"], "clean")
  missing.data.label_csv = os.path.join(fuzzed["root"], "no_such.csv")
  assert run(missing, "header") == BAD_CONFIG
  assert "data.max_channels=0" in capsys.readouterr().err


def test_header_scan_sees_all_but_what_only_decoding_shows(fuzzed, outcomes):
  assert not outcomes["readable"]  # the denial is real where the scans ran
  header = outcomes["header"]
  expected = {kind: count for kind, count in DECODE_COUNTS.items() if kind not in ("non-finite samples", "silent")}
  assert header["counts"] == {**expected, "truncated": 1}
  assert problem_rows(header["problems"]) == expected_problems(fuzzed, header=True)


def test_error_mode_raises_once_naming_every_problem(fuzzed, outcomes):
  error = outcomes["error"]
  assert problem_rows(error["problems"]) == expected_problems(fuzzed)
  message = error["message"]
  assert message.startswith("17 bad data set entries (1 no audio path, 1 no labels, 1 unknown label, "
                            "2 duplicate entry, 1 file not found, 1 unreadable,")
  for problem in error["problems"]:
    assert f"{problem['split']}  {problem['path']}: {problem['kind']}: {problem['detail']}" in message
  assert "on_bad_audio='skip'" in message and "python -m ast_jax.validate" in message


def test_skip_mode_keeps_exactly_the_clean_subset(outcomes):
  skip, clean = outcomes["skip"], outcomes["clean"]
  assert skip["skipped"] == DECODE_COUNTS and skip["skipped_files"] == 17 and clean["skipped_files"] == 0
  assert skip["train"] == clean["train"] and skip["eval"] == clean["eval"]
  assert len(clean["train"]) == 49 and len(clean["eval"]) == 16


def test_skip_mode_training_equals_clean_training(fuzzed):
  """The acceptance run: skip mode over the fuzzed set completes and its metrics equal a clean-subset run's."""
  records = denied("training_records", fuzzed)
  fuzzed_record, clean_record = records["fuzzed"], records["clean"]
  assert fuzzed_record["skipped_files"] == 17 and clean_record["skipped_files"] == 0
  assert fuzzed_record["skipped"] == DECODE_COUNTS and clean_record["skipped"] == {}
  assert fuzzed_record["step"] == 6 and fuzzed_record["num_examples"] == 16
  for metric in COMPARED_METRICS:
    assert fuzzed_record[metric] == clean_record[metric], metric
  assert np.isfinite(fuzzed_record["loss"])
