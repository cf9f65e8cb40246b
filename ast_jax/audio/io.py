"""Decoding audio files into mono float32 waveforms at the model's sample rate."""

from __future__ import annotations

import os

import numpy as np


class AudioError(ValueError):
  """A file that cannot serve as training or evaluation audio; the message names file and problem."""

  def __init__(self, path: str, problem: str):
    super().__init__(f"{path}: {problem}")
    self.path = str(path)
    self.problem = problem


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
  import soundfile as sf

  if not os.path.exists(path):
    raise AudioError(path, "file not found")
  if os.path.getsize(path) == 0:
    raise AudioError(path, "file is empty (0 bytes)")
  try:
    data, file_rate = sf.read(path, dtype="float32", always_2d=True)
  except Exception as sf_error:  # noqa: BLE001
    if os.path.splitext(path)[1].lstrip(".").upper() in sf.available_formats():
      raise AudioError(path, f"cannot decode audio ({sf_error})") from None
    try:  # formats libsndfile lacks (m4a, ...) go through librosa/audioread
      import librosa

      mono, file_rate = librosa.load(path, sr=None, mono=False)
      data = np.atleast_2d(mono).T.astype(np.float32)
    except Exception:  # noqa: BLE001
      raise AudioError(path, f"cannot decode audio ({sf_error})") from None
  if expected_sample_rate is not None and file_rate != expected_sample_rate:
    raise AudioError(path, f"sample rate {file_rate} Hz, expected {expected_sample_rate} Hz")
  if expected_channels is not None and data.shape[1] != expected_channels:
    raise AudioError(path, f"{data.shape[1]} channels, expected {expected_channels}")
  if data.shape[0] == 0:
    raise AudioError(path, "no audio samples")
  waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
  if not np.all(np.isfinite(waveform)):
    raise AudioError(path, "contains NaN or infinite samples")
  if reject_silent and not np.any(waveform):
    raise AudioError(path, "silent (every sample is zero)")
  if file_rate != sample_rate:
    waveform = resample(waveform, file_rate, sample_rate)
  return np.ascontiguousarray(waveform, dtype=np.float32)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
  """Band-limited resampling of a mono waveform `[samples]` (soxr 'HQ', as librosa's default)."""
  import soxr

  return soxr.resample(waveform.astype(np.float32), from_rate, to_rate, quality="HQ").astype(np.float32)


def remove_mean(waveform: np.ndarray) -> np.ndarray:
  """Subtracts the waveform's mean, as upstream does before the filterbank."""
  return (waveform - waveform.mean()).astype(np.float32)
