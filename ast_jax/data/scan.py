"""Checking every entry and audio file before training, so bad data fails the run at once and not hours in.

A problem has a stable short kind and a detail naming the file (`sources.Problem`). The scan reads every file's
header ('header': existence, permissions, size, format, WAV truncation, channels, sample rate, length) or also
decodes it ('decode': truncated streams, NaN/Inf samples, silence). `apply_policy` then raises one error listing
every problem ('error') or drops the bad entries and counts them per kind ('skip').
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
from typing import Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from ast_jax.audio.io import FILE_KINDS, AudioError, path_problem, read_audio, soundfile_format
from ast_jax.data.demo import is_demo_key
from ast_jax.data.examples import ENTRY_KINDS, DataError, Example, Problem, Sources

logger = logging.getLogger(__name__)

SCAN_MODES = ("header", "decode", "off")
BAD_AUDIO_MODES = ("error", "skip")
KINDS = ENTRY_KINDS + FILE_KINDS  # the order of every report


class BadDataError(AudioError, DataError):
  """Bad entries or audio files; `problems` lists every one of them (`sources.Problem`: split, path, kind, detail)."""

  def __init__(self, problems: Sequence[Problem]):
    lines = "\n".join(f"  {problem}" for problem in problems)
    ValueError.__init__(  # pylint: disable=non-parent-init-called - AudioError's message is per file
        self,
        f"{_entries(len(problems))} ({count_summary(problems)}):\n{lines}\n"
        "Fix or remove them (python -m ast_jax.validate --config=... lists them all), or set "
        "config.data.on_bad_audio='skip' to train without them.",
    )
    self.problems = list(problems)
    self.path = problems[0].path if problems else ""
    self.problem = _entries(len(problems))
    self.kind = problems[0].kind if problems else ""


@dataclasses.dataclass(frozen=True)
class AudioChecks:
  """What a usable audio file must be beyond decodable: at most `max_channels` channels, a rate among
  `sample_rates` (empty: any rate, resampled), and at least `min_duration_ms` long (one analysis window)."""
  max_channels: int = 2
  sample_rates: tuple[int, ...] = ()
  min_duration_ms: float = 25.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> AudioChecks:
    return cls(max_channels=config.data.get("max_channels", 2),
               sample_rates=tuple(config.data.get("sample_rates", ())),
               min_duration_ms=config.audio.frame_length)


@dataclasses.dataclass(frozen=True)
class FileReport:
  """What a scan learned about one audio file: its problem (`kind` None when it is usable) and its format."""
  kind: str | None = None
  detail: str = ""
  sample_rate: int = 0
  channels: int = 0
  subtype: str = ""  # libsndfile's sample format: PCM_16, PCM_U8, FLOAT, ... ('' when another decoder read it)


def check_file(path: str, mode: str = "header", checks: AudioChecks = AudioChecks()) -> FileReport:
  """Checks the audio file `path` under scan `mode` ('header' or 'decode'); see the module docstring."""
  import soundfile as sf

  error = path_problem(path)
  if error is not None:
    return FileReport(error.kind, error.problem)
  try:
    info = sf.info(path)
  except Exception as header_error:  # noqa: BLE001 - soundfile raises several types for unreadable headers
    if soundfile_format(path) in sf.available_formats():
      return FileReport("not audio", f"cannot read an audio header ({header_error})")
    return _decoded_report(path, checks)  # a format only librosa/audioread can read
  report = FileReport(None, "", int(info.samplerate), int(info.channels), str(info.subtype))
  try:
    problem = _wav_truncation(path) or _format_problem(int(info.frames), report, checks)
  except OSError as os_error:  # e.g. permissions changed during the scan
    return dataclasses.replace(report, kind="unreadable", detail=f"cannot read the file ({os_error})")
  if problem is None and mode == "decode":
    problem = _decode_problem(path, int(info.frames))
  return report if problem is None else dataclasses.replace(report, kind=problem[0], detail=problem[1])


def _format_problem(frames: int, report: FileReport, checks: AudioChecks) -> tuple[str, str] | None:
  """Channels, sample rate and length against `checks`, from the header alone."""
  if report.channels > checks.max_channels:
    return "too many channels", (f"{report.channels} channels, more than config.data.max_channels="
                                 f"{checks.max_channels}")
  if checks.sample_rates and report.sample_rate not in checks.sample_rates:
    return "sample rate", f"{report.sample_rate} Hz, not in config.data.sample_rates={tuple(checks.sample_rates)}"
  window = int(report.sample_rate * checks.min_duration_ms / 1000)  # Kaldi's window length in samples
  if frames < window:
    return "too short", (f"{frames} sample(s), fewer than one {checks.min_duration_ms:g} ms analysis window "
                         f"({window} samples at {report.sample_rate} Hz)")
  return None


def _wav_truncation(path: str) -> tuple[str, str] | None:
  """('truncated', detail) for a RIFF WAV whose data chunk declares more bytes than the file holds."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    header = f.read(12)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX") or header[8:12] != b"WAVE":
      return None
    order = "little" if header[:4] == b"RIFF" else "big"
    offset = 12
    while offset + 8 <= size:  # chunks before the data chunk: fmt, LIST, fact, ...
      f.seek(offset)
      chunk = f.read(8)
      declared = int.from_bytes(chunk[4:8], order)
      if chunk[:4] == b"data":
        held = size - offset - 8
        if declared in (0, 0xFFFFFFFF) or declared <= held:  # 0 / all ones: a streaming writer's placeholder
          return None
        return "truncated", f"the data chunk declares {declared} bytes, the file holds {held}"
      offset += 8 + declared + (declared & 1)
  return None


def _decode_problem(path: str, declared_frames: int) -> tuple[str, str] | None:
  """Decodes the file: a stream that fails or ends early after a good header, NaN/Inf samples, silence."""
  try:
    data, _ = read_audio(path)
  except AudioError as error:
    if error.kind == "not audio":  # the header read: the stream itself is cut short or damaged
      return "truncated", f"the header reads but decoding fails: {error.problem}"
    return error.kind, error.problem
  return _samples_problem(data, declared_frames)


def _samples_problem(data: np.ndarray, declared_frames: int) -> tuple[str, str] | None:
  if 0 < declared_frames and len(data) < declared_frames:
    return "truncated", f"decodes to {len(data)} of the {declared_frames} frames its header declares"
  finite = np.isfinite(data)
  if not finite.all():
    return "non-finite samples", f"{int(np.size(finite) - np.count_nonzero(finite))} NaN or infinite sample(s)"
  if not np.any(data):
    return "silent", "every sample is zero"
  return None


def _decoded_report(path: str, checks: AudioChecks) -> FileReport:
  """The report of a file only a full decode can read (no libsndfile header)."""
  try:
    data, rate = read_audio(path)
  except AudioError as error:
    return FileReport(error.kind, error.problem)
  report = FileReport(None, "", rate, data.shape[1], "")
  problem = _format_problem(len(data), report, checks) or _samples_problem(data, 0)
  return report if problem is None else dataclasses.replace(report, kind=problem[0], detail=problem[1])


def scan_files(paths: Iterable[str], mode: str = "header", checks: AudioChecks = AudioChecks(),
               max_threads: int = 0) -> dict[str, FileReport]:
  """Checks every distinct path (demo keys aside) in a thread pool; returns {path: report} in the order given."""
  if mode not in SCAN_MODES:
    raise ValueError(f"config.data.scan must be one of {SCAN_MODES}, got {mode!r}")
  unique = [p for p in dict.fromkeys(paths) if not is_demo_key(p)]
  if mode == "off" or not unique:
    return {}
  threads = max_threads or min(32, 4 * (os.cpu_count() or 1))  # header reads wait on I/O; decoders drop the GIL
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    return dict(zip(unique, pool.map(lambda path: check_file(path, mode, checks), unique)))


@dataclasses.dataclass(frozen=True)
class ScanReport:
  """The scan of both splits: one problem per bad file (split-tagged, in example order) and every file's report."""
  problems: tuple[Problem, ...]
  files: dict[str, FileReport]

  def notes(self) -> dict[str, dict[str, int]]:
    """What the files hold, worth knowing but not a problem: sample rates, channel counts and sample formats seen
    (every file whose header reads, bad ones too)."""
    read = [report for report in self.files.values() if report.sample_rate]
    return {
        "sample rates": _counts(f"{r.sample_rate} Hz" for r in read),
        "channels": _counts(str(r.channels) for r in read),
        "formats": _counts(r.subtype for r in read if r.subtype),
    }

  def eight_bit(self) -> list[str]:
    """The usable 8-bit PCM files: valid (libsndfile removes WAV's unsigned offset), but of a coarse resolution."""
    return [path for path, r in self.files.items() if r.kind is None and r.subtype in ("PCM_U8", "PCM_S8")]


def _counts(values: Iterable[str]) -> dict[str, int]:
  return dict(collections.Counter(values).most_common())


def scan_examples(sources: Sources, *, mode: str = "header", checks: AudioChecks = AudioChecks(),
                  max_threads: int = 0) -> ScanReport:
  """Checks the audio file of every example of both splits under `mode`."""
  splits = (("train", sources.train), ("eval", sources.eval))
  files = scan_files([e.audio for _, examples in splits for e in examples], mode, checks, max_threads)
  problems = tuple(Problem(split, e.audio, files[e.audio].kind, files[e.audio].detail)
                   for split, examples in splits for e in examples
                   if e.audio in files and files[e.audio].kind is not None)
  return ScanReport(problems, files)


def apply_policy(sources: Sources, file_problems: Sequence[Problem], on_bad_audio: str) -> Sources:
  """Raises `BadDataError` listing `sources.problems` and `file_problems` ('error'), or drops the examples of the
  bad files and counts every dropped entry per kind ('skip'; the entries' own problems were dropped when read)."""
  if on_bad_audio not in BAD_AUDIO_MODES:
    raise ValueError(f"config.data.on_bad_audio must be one of {BAD_AUDIO_MODES}, got {on_bad_audio!r}")
  problems = tuple(sources.problems) + tuple(file_problems)
  if not problems:
    return sources
  if on_bad_audio == "error":
    raise BadDataError(problems)
  logger.warning("Skipping %s: %s (python -m ast_jax.validate lists them)", _entries(len(problems)),
                 count_summary(problems))
  bad = {problem.path for problem in file_problems}

  def keep(examples: tuple[Example, ...]) -> tuple[Example, ...]:
    return tuple(e for e in examples if e.audio not in bad)

  skipped = count_by_kind(collections.Counter(problem.kind for problem in problems))
  return dataclasses.replace(sources, train=keep(sources.train), eval=keep(sources.eval), problems=problems,
                             skipped_files=len(problems), skipped=skipped)


def scan_sources(sources: Sources, *, mode: str = "header", on_bad_audio: str = "error",
                 checks: AudioChecks = AudioChecks()) -> Sources:
  """Scans the audio files of `sources` and applies `on_bad_audio` to them and to `sources.problems`."""
  return apply_policy(sources, scan_examples(sources, mode=mode, checks=checks).problems, on_bad_audio)


def _entries(count: int) -> str:
  return f"{count} bad data set {'entry' if count == 1 else 'entries'}"


def count_by_kind(counts: Mapping[str, int]) -> dict[str, int]:
  """{kind: count} in report order (KINDS, then any other kind), without zeros."""
  order = {kind: i for i, kind in enumerate(KINDS)}
  return {kind: counts[kind] for kind in sorted(counts, key=lambda k: (order.get(k, len(order)), k)) if counts[kind]}


def count_summary(problems: Sequence[Problem]) -> str:
  """'2 truncated, 1 file not found, ...': counts per kind in one line."""
  counts = count_by_kind(collections.Counter(problem.kind for problem in problems))
  return ", ".join(f"{count} {kind}" for kind, count in counts.items())
