"""Waveform mixup as upstream codes it (`AudiosetDataset._wav2fbank` with a second file)."""

from __future__ import annotations

import numpy as np


def match_length(waveform: np.ndarray, length: int) -> np.ndarray:
  """Zero-pads after the end or cuts `waveform` `[samples]` to `length` samples."""
  if len(waveform) >= length:
    return waveform[:length]
  return np.pad(waveform, (0, length - len(waveform)))


def mix_waveforms(
    waveform: np.ndarray, partner: np.ndarray, label: np.ndarray, partner_label: np.ndarray, mix_lambda: float
) -> tuple[np.ndarray, np.ndarray]:
  """Mixes two mean-removed clips `[samples]` and their targets `[num_classes]`.

  The partner is padded or cut to this clip's length; the mix has its mean removed again (upstream).
  Returns (waveform `[len(waveform)]`, label `[num_classes]`).
  """
  mixed = mix_lambda * waveform + (1.0 - mix_lambda) * match_length(partner, len(waveform))
  mixed_label = mix_lambda * label + (1.0 - mix_lambda) * partner_label
  return (mixed - mixed.mean()).astype(np.float32, copy=False), mixed_label.astype(np.float32)


def draw_mixup(
    rng: np.random.Generator, probability: float, alpha: float, num_examples: int
) -> tuple[int, float] | None:
  """Decides whether this clip is mixed; if so returns (uniform partner index, lambda ~ Beta(alpha, alpha))."""
  if probability <= 0.0 or rng.random() >= probability:
    return None
  return int(rng.integers(num_examples)), float(rng.beta(alpha, alpha))
