"""Check a data set before training: `python -m ast_jax.validate --config=configs/X.py[:arg] [--config.k=v]`.

Reads both splits' lists as training would, scans every audio file (`--scan=decode`: each file decoded once;
`--scan=header`: headers only) and reports every problem, by kind, with its file: the same problems that
`config.data.on_bad_audio='error'` stops a run for and 'skip' trains without. Exits 0 when the data set is clean,
1 when it has problems, 2 when the config or the lists cannot be read.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from typing import Any, TextIO

import ml_collections
from absl import app, flags
from ml_collections import config_flags

CLEAN, PROBLEMS, BAD_CONFIG = 0, 1, 2  # exit statuses


def check(config: ml_collections.ConfigDict, mode: str = "decode") -> dict[str, Any]:
  """The report of `config`'s data: counts per kind, every problem, and notes (formats, rates, channels seen).

  Raises `ConfigError`, `DataError` or `OSError` when the config or the data set's lists cannot be read.
  """
  from ast_jax.data.scan import AudioChecks, count_by_kind, scan_examples
  from ast_jax.data.sources import read_sources
  from ast_jax.train.config_checks import validate_config

  validate_config(config)
  start = time.perf_counter()
  sources = read_sources(config)  # nothing dropped for a bad file; bad entries and duplicates become problems
  scan = scan_examples(sources, mode=mode, checks=AudioChecks.from_config(config))
  problems = list(sources.problems) + list(scan.problems)
  return {
      "scan": mode,
      "entries": {"train": len(sources.train) + sum(p.split == "train" for p in sources.problems),
                  "eval": len(sources.eval) + sum(p.split == "eval" for p in sources.problems)},
      "files": len(scan.files),
      "counts": count_by_kind(collections.Counter(p.kind for p in problems)),
      "problems": [p._asdict() for p in problems],
      "notes": {**scan.notes(), "8-bit PCM files": scan.eight_bit()},
      "seconds": round(time.perf_counter() - start, 3),
  }


def print_report(report: dict[str, Any], out: TextIO | None = None) -> None:
  """Counts per kind, then every problem as 'split  path: kind: detail', then the notes (to stdout by default)."""
  out = out or sys.stdout
  entries = report["entries"]
  print(f"{entries['train']} training and {entries['eval']} evaluation entries, {report['files']} audio files, "
        f"{report['scan']} scan in {report['seconds']:.1f} s", file=out)
  if report["problems"]:
    print(f"{len(report['problems'])} problem(s):", file=out)
    for kind, count in report["counts"].items():
      print(f"  {count:6d}  {kind}", file=out)
    for problem in report["problems"]:
      print(f"{problem['split']}  {problem['path']}: {problem['kind']}: {problem['detail']}", file=out)
    print("In training, config.data.on_bad_audio='error' stops for these; 'skip' trains without them.", file=out)
  else:
    print("no problems", file=out)
  notes, lines = report["notes"], []
  for name in ("sample rates", "channels", "formats"):
    if notes[name]:
      lines.append(f"  {name}: " + ", ".join(f"{value} x {count}" for value, count in notes[name].items()))
  if notes["8-bit PCM files"]:
    shown, count = notes["8-bit PCM files"][:10], len(notes["8-bit PCM files"])
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    lines.append(f"  8-bit PCM (valid, decoded with its unsigned offset; coarse): {', '.join(shown)}{more}")
  if lines:
    print("notes:\n" + "\n".join(lines), file=out)


def run(config: ml_collections.ConfigDict, mode: str = "decode", json_path: str | None = None) -> int:
  """Checks, prints the report (and writes it as JSON); returns the exit status."""
  from ast_jax.data.sources import DataError
  from ast_jax.train.config_checks import ConfigError

  try:
    report = check(config, mode)
  except (ConfigError, DataError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return BAD_CONFIG
  print_report(report)
  if json_path:
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return PROBLEMS if report["problems"] else CLEAN


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with exit status 2 (not 1, which means problems) for a config that does not load."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001 - flag errors, and whatever the config file's get_config raises
    print(f"error: {error}\nusage: python -m ast_jax.validate --config=configs/X.py[:arg] "
          "[--config.data.field=value] [--scan=decode|header] [--json=PATH]", file=sys.stderr)
    sys.exit(BAD_CONFIG)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (defined when run, so importing `check` or `run` defines none): main.py's --config and
  its overrides, --scan, --json."""
  config = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file, optionally ':arg'.",
                                           lock_config=True)
  scan = flags.DEFINE_enum("scan", "decode", ["decode", "header"], "decode: decode every file once (sees "
                           "truncated streams, NaN/Inf samples, silence); header: read headers only (faster).")
  json_path = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
  flags.mark_flags_as_required(["config"])
  return {"config": config, "scan": scan, "json": json_path}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(BAD_CONFIG)
  sys.exit(run(_FLAGS["config"].value, _FLAGS["scan"].value, _FLAGS["json"].value))


if __name__ == "__main__":
  from ast_jax import overrides

  overrides.exit_on_unknown(sys.argv)  # a misspelt --config.key: one line naming it and the nearest keys (status 2)
  _FLAGS = define_flags()
  app.run(main, flags_parser=_parse_flags)
