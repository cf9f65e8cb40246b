"""The values every data module shares: an example, a data set's splits, a problem with one entry, and the error
for a data set that does not match its format. Readers (sources.py), the audio checks (scan.py) and the demo set
(demo.py) build on these and not on each other."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

# The stable short names of what can be wrong with a data set entry (the audio files' own: io.FILE_KINDS).
ENTRY_KINDS = ("no audio path", "no labels", "unknown label", "duplicate entry")


class DataError(ValueError):
  """A data set on disk that does not match its format (missing list, unknown source, bad file name, ...)."""


class Example(NamedTuple):
  """One clip: where its audio is and which classes it carries (multi-label)."""
  audio: str
  labels: tuple[int, ...]


class Problem(NamedTuple):
  """Something wrong with one entry or audio file of a split.

  `kind` is a stable short name (ENTRY_KINDS, `ast_jax.audio.io.FILE_KINDS`), `detail` says what exactly; `path`
  is the audio file, or '<datafile> entry <n>' for an entry without one.
  """
  split: str  # "train" | "eval"
  path: str
  kind: str
  detail: str

  def __str__(self) -> str:
    return f"{self.split}  {self.path}: {self.kind}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Sources:
  """The training and evaluation examples of a data set and its label names (index = class id).

  `problems` lists the entries that are not among the examples (bad entries, duplicates, and in
  `on_bad_audio='skip'` mode the bad audio files). `skipped_files` counts the entries dropped in skip mode and
  `skipped` counts them per problem kind.
  """
  train: tuple[Example, ...]
  eval: tuple[Example, ...]
  label_names: tuple[str, ...]
  skipped_files: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  problems: tuple[Problem, ...] = ()
