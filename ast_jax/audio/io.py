"""Decoding audio files into mono float32 waveforms at the model's sample rate."""

from __future__ import annotations

import os

import numpy as np

# The stable short names of what can be wrong with an audio file (`AudioError.kind`, scan reports, skip counts).
FILE_KINDS = ("file not found", "unreadable", "empty file", "not audio", "truncated", "too short",
              "too many channels", "sample rate", "non-finite samples", "silent")


class AudioError(ValueError):
  """A file that cannot serve as training or evaluation audio; the message is 'path: kind: problem'.

  `kind` is one of FILE_KINDS (or "channel count" for `load_audio`'s `expected_channels`, "" for none); `problem`
  is the detail ("no such file", "cannot decode audio (...)", ...).
  """

  def __init__(self, path: str, problem: str, kind: str = ""):
    super().__init__(f"{path}: {kind}: {problem}" if kind else f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem
    self.kind = kind


def path_problem(path: str) -> AudioError | None:
  """The error of a file that cannot even be opened: missing, not readable by this process, or 0 bytes."""
  try:
    size = os.stat(path).st_size
  except FileNotFoundError:
    return AudioError(path, "no such file", "file not found")
  except PermissionError:
    return AudioError(path, "permission denied (cannot reach the file)", "unreadable")
  if not os.access(path, os.R_OK):
    return AudioError(path, "permission denied", "unreadable")
  if size == 0:
    return AudioError(path, "0 bytes", "empty file")
  return None


def read_audio(path: str) -> tuple[np.ndarray, int]:
  """Decodes `path` at its own rate: (samples `[frames, channels]` float32, sample rate).

  Integer PCM is scaled to [-1, 1) (8-bit WAV is unsigned: libsndfile removes its offset of 128). Formats that
  libsndfile lacks (m4a, ...) go through librosa/audioread. Raises `AudioError` (missing, unreadable, empty, not
  audio).
  """
  import soundfile as sf

  error = path_problem(path)
  if error is not None:
    raise error
  try:
    data, file_rate = _read_float32(path)
  except PermissionError:
    raise AudioError(path, "permission denied", "unreadable") from None
  except Exception as sf_error:  # noqa: BLE001 - soundfile raises several types for undecodable files
    if soundfile_format(path) in sf.available_formats():
      raise AudioError(path, f"cannot decode audio ({sf_error})", "not audio") from None
    try:
      import librosa

      samples, file_rate = librosa.load(path, sr=None, mono=False)
      data = np.atleast_2d(samples).T.astype(np.float32)
    except Exception:  # noqa: BLE001
      raise AudioError(path, f"cannot decode audio ({sf_error})", "not audio") from None
  return data, int(file_rate)


def _read_float32(path: str) -> tuple[np.ndarray, int]:
  """libsndfile's float32 samples `[frames, channels]` and the file's rate.

  Uncompressed 16-bit PCM (WAV, AIFF) is read as int16 and scaled here: libsndfile's own conversion computes the
  same `sample * 2**-15` (exact in float32, so the samples are bit-identical) at half the speed for a 10-s WAV clip.
  FLAC converts inside its decoder, as fast as this.
  """
  import soundfile as sf

  with sf.SoundFile(path) as audio_file:
    if audio_file.subtype == "PCM_16" and audio_file.format != "FLAC":
      pcm = audio_file.read(dtype="int16", always_2d=True)
      return np.multiply(pcm, np.float32(2.0 ** -15), dtype=np.float32), audio_file.samplerate
    return audio_file.read(dtype="float32", always_2d=True), audio_file.samplerate


def soundfile_format(path: str) -> str:
  """libsndfile's name of the format a file's extension implies ('WAV', 'FLAC', ...)."""
  extension = os.path.splitext(path)[1][1:].upper()
  return {"AIF": "AIFF", "OPUS": "OGG", "OGA": "OGG"}.get(extension, extension)


def load_audio(
    path: str,
    sample_rate: int = 16000,
    *,
    expected_sample_rate: int | None = None,
    expected_channels: int | None = None,
    reject_silent: bool = False,
) -> np.ndarray:
  """Decodes `path` to a mono float32 waveform `[samples]` in [-1, 1] at `sample_rate`.

  Integer PCM is scaled to [-1, 1]; several channels are averaged (upstream down-mix); any input rate is
  resampled (soxr, high quality). Raises `AudioError` naming the file for a missing, unreadable, empty or
  non-finite file, and for a rate or channel count other than the expected one when those are given.
  The mean is NOT removed here: `remove_mean` does it where the recipe wants it.
  """
  data, file_rate = read_audio(path)
  if expected_sample_rate is not None and file_rate != expected_sample_rate:
    raise AudioError(path, f"{file_rate} Hz, expected {expected_sample_rate} Hz", "sample rate")
  if expected_channels is not None and data.shape[1] != expected_channels:
    kind = "too many channels" if data.shape[1] > expected_channels else "channel count"
    raise AudioError(path, f"{data.shape[1]} channels, expected {expected_channels}", kind)
  if data.shape[0] == 0:
    raise AudioError(path, "no audio samples", "too short")
  waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
  if not np.all(np.isfinite(waveform)):
    raise AudioError(path, "NaN or infinite samples", "non-finite samples")
  if reject_silent and not np.any(waveform):
    raise AudioError(path, "every sample is zero", "silent")
  if file_rate != sample_rate:
    waveform = resample(waveform, file_rate, sample_rate)
  return np.ascontiguousarray(waveform, dtype=np.float32)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
  """Band-limited resampling of a mono waveform `[samples]` (soxr 'HQ', as librosa's default)."""
  import soxr

  return soxr.resample(waveform.astype(np.float32), from_rate, to_rate, quality="HQ").astype(np.float32)


def remove_mean(waveform: np.ndarray) -> np.ndarray:
  """Subtracts the waveform's mean, as upstream does before the filterbank."""
  return (waveform - waveform.mean()).astype(np.float32, copy=False)
