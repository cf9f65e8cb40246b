"""Data sources: lists of (audio key, label indices) per split, and the label names.

Every source reduces a data set on disk (or the procedural demo set) to the same small record, so the pipelines
never need to know where the audio came from. An audio key is a file path, or a `demo://` key that
`ast_jax.data.demo` turns into a waveform.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import NamedTuple

import ml_collections

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".m4a")


class DataError(ValueError):
  """A data set on disk that does not match its format (missing list, unknown label, bad file name, ...)."""


class Example(NamedTuple):
  """One clip: where its audio is and which classes it carries (multi-label)."""
  audio: str
  labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Sources:
  """The training and evaluation examples of a data set and its label names (index = class id).

  `skipped_files` counts the files dropped by the pre-training scan in `on_bad_audio='skip'` mode.
  """
  train: tuple[Example, ...]
  eval: tuple[Example, ...]
  label_names: tuple[str, ...]
  skipped_files: int = 0


def build_sources(config: ml_collections.ConfigDict, *, scan: bool = True) -> Sources:
  """Builds the examples of `config.data.source` and, unless `scan` is False, checks their audio files.

  The check follows `config.data.scan` and `config.data.on_bad_audio` (see `ast_jax.data.scan`).
  """
  builders = {
      "datafile": _datafile_sources,
      "esc50": _esc50_sources,
      "speechcommands": _speechcommands_sources,
      "folder": _folder_sources,
      "demo": _demo_sources,
  }
  name = config.data.source
  if name not in builders:
    raise DataError(f"unknown data source {name!r}; expected one of {sorted(builders)}")
  sources = builders[name](config)
  if scan:
    from ast_jax.data.scan import scan_sources  # scan imports this module

    sources = scan_sources(sources, mode=config.data.scan, on_bad_audio=config.data.on_bad_audio)
  return sources


def read_label_csv(path: str) -> tuple[list[str], list[str]]:
  """Reads an AST label CSV (`index,mid,display_name`) into (mids, display names) ordered by index."""
  if not path:
    raise DataError("this data source needs config.data.label_csv (index,mid,display_name)")
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
    raise DataError(f"{path}: expected a header 'index,mid,display_name'")
  rows.sort(key=lambda row: int(row["index"]))
  indices = [int(row["index"]) for row in rows]
  if indices != list(range(len(rows))):
    raise DataError(f"{path}: indices must be 0..{len(rows) - 1} without gaps or repeats")
  return [row["mid"].strip() for row in rows], [row["display_name"].strip() for row in rows]


def natural_key(name: str) -> tuple:
  """Sort key that orders digit runs by value ('2' < '10'), so digit labels sort as numbers."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


# ----------------------------------------------------------------------------------------------- datafile


def _datafile_sources(config: ml_collections.ConfigDict) -> Sources:
  mids, names = read_label_csv(config.data.label_csv)
  mid_to_index = {mid: i for i, mid in enumerate(mids)}
  train = _read_datafile(config.data.train_datafile, mid_to_index)
  evaluation = _read_datafile(config.data.eval_datafile, mid_to_index) if config.data.eval_datafile else ()
  return Sources(train, evaluation, tuple(names))


def _read_datafile(path: str, mid_to_index: dict[str, int]) -> tuple[Example, ...]:
  """Reads `{"data": [{"wav": path, "labels": "/m/a,/m/b"}, ...]}`; unknown mids name the entry."""
  if not path:
    raise DataError("the datafile source needs config.data.train_datafile")
  with open(path, encoding="utf-8") as f:
    entries = json.load(f)["data"]
  examples = []
  for number, entry in enumerate(entries):
    mids = [mid.strip() for mid in str(entry.get("labels", "")).split(",") if mid.strip()]
    unknown = [mid for mid in mids if mid not in mid_to_index]
    if unknown or not mids or "wav" not in entry:
      problem = f"unknown label(s) {unknown}" if unknown else "no 'wav' field" if "wav" not in entry else "no labels"
      raise DataError(f"{path}: entry {number} ({entry.get('wav', '?')}): {problem}")
    examples.append(Example(str(entry["wav"]), tuple(sorted({mid_to_index[mid] for mid in mids}))))
  return tuple(examples)


# ----------------------------------------------------------------------------------------------- ESC-50


def _esc50_sources(config: ml_collections.ConfigDict) -> Sources:
  """ESC-50: `meta/esc50.csv` and `audio/`; the fold `config.data.fold` is the evaluation set."""
  root = config.data.path
  with open(os.path.join(root, "meta", "esc50.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise DataError(f"{root}/meta/esc50.csv lists no clips")
  names_by_target = {int(row["target"]): row["category"] for row in rows}
  # A subset of the 50 classes keeps class ids aligned with the full set's targets.
  names = tuple(names_by_target.get(t, f"target_{t}") for t in range(max(names_by_target) + 1))
  fold = int(config.data.fold)
  train, evaluation = [], []
  for row in rows:
    example = Example(os.path.join(root, "audio", row["filename"]), (int(row["target"]),))
    (evaluation if int(row["fold"]) == fold else train).append(example)
  if not evaluation:
    raise DataError(f"{root}/meta/esc50.csv has no clip in fold {fold}")
  return Sources(tuple(train), tuple(evaluation), names)


# ----------------------------------------------------------------------------------------------- Speech Commands


def _speechcommands_sources(config: ml_collections.ConfigDict) -> Sources:
  """Speech Commands V2: one folder per word; `validation_list.txt` / `testing_list.txt` pick the held-out clips."""
  root = config.data.path
  split_lists = {"validation": "validation_list.txt", "test": "testing_list.txt"}
  if config.data.eval_split not in split_lists:
    raise DataError(f"speechcommands eval_split must be 'validation' or 'test', got {config.data.eval_split!r}")
  words = sorted(
      entry for entry in os.listdir(root)
      if os.path.isdir(os.path.join(root, entry)) and not entry.startswith("_") and not entry.startswith(".")
  )
  if config.data.label_csv:
    names = read_label_csv(config.data.label_csv)[1]
  else:
    names = words
  word_to_index = {word: i for i, word in enumerate(names)}
  held_out = {name: _read_list(os.path.join(root, file)) for name, file in split_lists.items()}
  train, evaluation = [], []
  for word in words:
    if word not in word_to_index:
      raise DataError(f"{root}/{word}: folder is not a label in {config.data.label_csv}")
    for file in sorted(os.listdir(os.path.join(root, word))):
      if not file.lower().endswith(AUDIO_EXTENSIONS):
        continue
      relative = f"{word}/{file}"
      example = Example(os.path.join(root, word, file), (word_to_index[word],))
      if relative in held_out[config.data.eval_split]:
        evaluation.append(example)
      elif not any(relative in listed for listed in held_out.values()):
        train.append(example)
  return Sources(tuple(train), tuple(evaluation), tuple(names))


def _read_list(path: str) -> set[str]:
  if not os.path.exists(path):
    raise DataError(f"{path}: missing (Speech Commands V2 ships validation_list.txt and testing_list.txt)")
  with open(path, encoding="utf-8") as f:
    return {line.strip().replace("\\", "/") for line in f if line.strip()}


# ----------------------------------------------------------------------------------------------- folder (FSDD)


def _folder_sources(config: ml_collections.ConfigDict) -> Sources:
  """Files named `{label}_{speaker}_{take}.ext` (FSDD); split 'takes' (0-4 test) or 'speaker' (held_out test)."""
  folder = _audio_folder(config.data.path)
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXTENSIONS))
  fields = [os.path.splitext(f)[0].split("_") for f in files]
  names = tuple(sorted({parts[0] for parts in fields}, key=natural_key))
  label_index = {name: i for i, name in enumerate(names)}
  split = config.data.split or "takes"
  if split == "speaker" and not config.data.held_out:
    raise DataError("folder source with split='speaker' needs config.data.held_out (the test speaker)")
  train, evaluation = [], []
  for file, parts in zip(files, fields):
    if len(parts) < 3:
      raise DataError(f"{folder}/{file}: expected a name like '{{label}}_{{speaker}}_{{take}}'")
    if split == "takes":
      is_eval = int(parts[-1]) < 5  # upstream FSDD convention: takes 0-4 are the test set
    elif split == "speaker":
      is_eval = parts[1] == config.data.held_out
    else:
      raise DataError(f"folder source split must be 'takes' or 'speaker', got {split!r}")
    example = Example(os.path.join(folder, file), (label_index[parts[0]],))
    (evaluation if is_eval else train).append(example)
  if split == "speaker" and not evaluation:
    raise DataError(f"{folder}: no file of speaker {config.data.held_out!r}")
  return Sources(tuple(train), tuple(evaluation), names)


def _audio_folder(path: str) -> str:
  """The folder itself if it holds audio files, else its `recordings/` subfolder (FSDD's layout)."""
  if not os.path.isdir(path):
    raise DataError(f"folder source: {path!r} is not a folder")
  if any(f.lower().endswith(AUDIO_EXTENSIONS) for f in os.listdir(path)):
    return path
  recordings = os.path.join(path, "recordings")
  if os.path.isdir(recordings):
    return recordings
  raise DataError(f"folder source: no audio files in {path!r} or {recordings!r}")


# ----------------------------------------------------------------------------------------------- demo


def _demo_sources(config: ml_collections.ConfigDict) -> Sources:
  from ast_jax.data import demo

  return demo.demo_sources(
      seed=config.seed,
      num_train=config.data.num_train_examples or demo.DEFAULT_TRAIN_EXAMPLES,
      num_eval=config.data.num_eval_examples or demo.DEFAULT_EVAL_EXAMPLES,
  )

