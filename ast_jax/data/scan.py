"""Checking every audio file before training, so a bad file fails the run at once and not hours in."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from ast_jax.audio.io import AudioError, load_audio
from ast_jax.data.demo import is_demo_key
from ast_jax.data.sources import Example, Sources

logger = logging.getLogger(__name__)

SCAN_MODES = ("header", "decode", "off")
BAD_AUDIO_MODES = ("error", "skip")


class BadAudioFilesError(AudioError):
  """Several bad audio files at once; `problems` lists (path, problem) for every one of them."""

  def __init__(self, problems: Sequence[tuple[str, str]]):
    lines = "\n".join(f"  {path}: {problem}" for path, problem in problems)
    ValueError.__init__(  # pylint: disable=non-parent-init-called - AudioError's message is per file
        self,
        f"{len(problems)} bad audio file(s):\n{lines}\n"
        "Fix or remove them, or set config.data.on_bad_audio='skip' to train without them.",
    )
    self.problems = list(problems)
    self.path = problems[0][0] if problems else ""
    self.problem = f"{len(problems)} bad audio files"


def check_file(path: str, mode: str = "header") -> str | None:
  """Returns what is wrong with the audio file `path` (None if nothing is) under scan `mode`.

  header: the file exists, is not empty, and soundfile reads a header with at least one frame (formats soundfile
  cannot read are decoded instead). decode: the file decodes to finite, not entirely silent samples.
  """
  if not os.path.exists(path):
    return "file not found"
  if os.path.getsize(path) == 0:
    return "file is empty (0 bytes)"
  if mode == "header":
    import soundfile as sf

    try:
      frames = sf.info(path).frames
    except Exception as error:  # noqa: BLE001 - soundfile raises several types for unreadable headers
      if _soundfile_format(path) in sf.available_formats():
        return f"cannot read audio header ({error})"
      return _decode_problem(path, reject_silent=False)  # a format only librosa/audioread can read
    return None if frames > 0 else "no audio frames"
  return _decode_problem(path, reject_silent=True)


def _soundfile_format(path: str) -> str:
  extension = os.path.splitext(path)[1][1:].upper()
  return {"AIF": "AIFF", "OPUS": "OGG", "OGA": "OGG"}.get(extension, extension)


def _decode_problem(path: str, reject_silent: bool) -> str | None:
  try:
    waveform = load_audio(path, reject_silent=reject_silent)
  except AudioError as error:
    return error.problem
  if not np.all(np.isfinite(waveform)):
    return "contains NaN or infinite samples"
  return None


def scan_files(paths: Iterable[str], mode: str = "header", max_threads: int = 0) -> dict[str, str]:
  """Checks `paths` in a thread pool; returns {path: problem} for the bad ones, in the order given."""
  if mode not in SCAN_MODES:
    raise ValueError(f"config.data.scan must be one of {SCAN_MODES}, got {mode!r}")
  unique = [p for p in dict.fromkeys(paths) if not is_demo_key(p)]
  if mode == "off" or not unique:
    return {}
  threads = max_threads or min(32, 4 * (os.cpu_count() or 1))  # header reads wait on I/O, not on the GIL
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    problems = pool.map(lambda path: check_file(path, mode), unique)
    return {path: problem for path, problem in zip(unique, problems) if problem is not None}


def scan_sources(sources: Sources, *, mode: str = "header", on_bad_audio: str = "error") -> Sources:
  """Checks every file of both splits; raises `BadAudioFilesError` listing all bad files, or drops them.

  In 'skip' mode the returned `Sources` lacks the bad files' examples and `skipped_files` counts the files.
  """
  if on_bad_audio not in BAD_AUDIO_MODES:
    raise ValueError(f"config.data.on_bad_audio must be one of {BAD_AUDIO_MODES}, got {on_bad_audio!r}")
  bad = scan_files([e.audio for e in sources.train + sources.eval], mode)
  if not bad:
    return sources
  if on_bad_audio == "error":
    raise BadAudioFilesError(list(bad.items()))
  logger.warning("Skipping %d bad audio file(s): %s", len(bad), summarize(bad))

  def keep(examples: tuple[Example, ...]) -> tuple[Example, ...]:
    return tuple(e for e in examples if e.audio not in bad)

  return dataclasses.replace(
      sources, train=keep(sources.train), eval=keep(sources.eval), skipped_files=sources.skipped_files + len(bad)
  )


def summarize(bad: dict[str, str], examples: int = 3) -> str:
  """A one-line summary: counts per kind of problem and the first few files."""
  kinds = collections.Counter(problem.split(" (")[0] for problem in bad.values())
  counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
  first = "; ".join(f"{path}: {problem}" for path, problem in list(bad.items())[:examples])
  more = f"; and {len(bad) - examples} more" if len(bad) > examples else ""
  return f"{counts} [{first}{more}]"
