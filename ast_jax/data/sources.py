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

import ml_collections

from ast_jax.data.examples import ENTRY_KINDS, DataError, Example, Problem, Sources  # noqa: F401 (also read from here)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".m4a")
SOURCES = ("demo", "folder", "datafile", "esc50", "speechcommands")  # config.data.source


def build_sources(config: ml_collections.ConfigDict, *, scan: bool = True) -> Sources:
  """Builds the examples of `config.data.source`, checks them and, unless `scan` is False, their audio files.

  Every problem is collected first (entries, duplicates, files under `config.data.scan`); then
  `config.data.on_bad_audio='error'` raises one `BadDataError` listing all of them, and 'skip' drops them, so the
  examples equal those of a data set without the bad entries (see `ast_jax.data.scan`).
  """
  from ast_jax.data.scan import AudioChecks, apply_policy, scan_examples

  sources = read_sources(config)
  report = scan_examples(sources, mode=config.data.scan if scan else "off", checks=AudioChecks.from_config(config))
  return apply_policy(sources, report.problems, config.data.on_bad_audio)


def read_sources(config: ml_collections.ConfigDict) -> Sources:
  """The examples of `config.data.source` without bad entries or duplicates, which `problems` lists instead.

  Audio files are not opened. Raises `DataError` for a data set whose lists cannot be read at all.
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
    raise DataError(f"unknown data source {name!r}; expected one of {SOURCES}")
  return drop_duplicates(builders[name](config))


def drop_duplicates(sources: Sources) -> Sources:
  """Keeps the first entry of an audio file listed twice in a split, and drops the training entry of a file that
  the evaluation set lists too (leakage); each dropped entry becomes a 'duplicate entry' problem."""
  problems = []

  def unique(split: str, examples: tuple[Example, ...], held_out: dict[str, Example]) -> tuple[Example, ...]:
    seen: dict[str, Example] = {}
    for example in examples:
      key = os.path.normpath(os.path.abspath(example.audio))
      first = seen.get(key) or held_out.get(key)
      if first is None:
        seen[key] = example
        continue
      where = "the evaluation set too (leakage); this training copy is dropped" if key in held_out else (
          f"the {'training' if split == 'train' else 'evaluation'} set more than once; the first is kept")
      labels = "" if first.labels == example.labels else f" (labels {list(example.labels)}, kept {list(first.labels)})"
      problems.append(Problem(split, example.audio, "duplicate entry", f"listed in {where}{labels}"))
    return tuple(seen.values())

  evaluation = unique("eval", sources.eval, {})
  held_out = {os.path.normpath(os.path.abspath(e.audio)): e for e in evaluation}
  train = unique("train", sources.train, held_out)
  if not problems:
    return sources
  return dataclasses.replace(sources, train=train, eval=evaluation, problems=sources.problems + tuple(problems))


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
  if not config.data.train_datafile:
    raise DataError("the datafile source needs config.data.train_datafile")
  train, problems = _read_datafile(config.data.train_datafile, mid_to_index, "train", config.data.label_csv)
  evaluation: tuple[Example, ...] = ()
  if config.data.eval_datafile:
    evaluation, eval_problems = _read_datafile(config.data.eval_datafile, mid_to_index, "eval",
                                               config.data.label_csv)
    problems += eval_problems
  return Sources(train, evaluation, tuple(names), problems=tuple(problems))


def _read_datafile(path: str, mid_to_index: dict[str, int], split: str,
                   label_csv: str) -> tuple[tuple[Example, ...], list[Problem]]:
  """Reads `{"data": [{"wav": path, "labels": "/m/a,/m/b"}, ...]}`: the good entries' examples, and a problem for
  every entry without audio path, without labels or with a label the label CSV lacks."""
  with open(path, encoding="utf-8") as f:
    try:
      document = json.load(f)
    except json.JSONDecodeError as error:
      raise DataError(f"{path}: not a JSON datafile ({error})") from None
  if not isinstance(document, dict) or not isinstance(document.get("data"), list):
    raise DataError(f"{path}: expected {{\"data\": [{{\"wav\": ..., \"labels\": ...}}, ...]}}")
  examples, problems = [], []
  for number, entry in enumerate(document["data"]):
    entry = entry if isinstance(entry, dict) else {}
    audio = str(entry.get("wav") or "")
    if not audio:
      problems.append(Problem(split, f"{path} entry {number}", "no audio path", "the entry has no 'wav' field"))
      continue
    mids = [mid.strip() for mid in str(entry.get("labels") or "").split(",") if mid.strip()]
    unknown = [mid for mid in mids if mid not in mid_to_index]
    if unknown:
      problems.append(Problem(split, audio, "unknown label",
                              f"{path} entry {number}: {', '.join(unknown)} not in {label_csv}"))
    elif not mids:
      problems.append(Problem(split, audio, "no labels", f"{path} entry {number} has an empty label list"))
    else:
      examples.append(Example(audio, tuple(sorted({mid_to_index[mid] for mid in mids}))))
  return tuple(examples), problems


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

