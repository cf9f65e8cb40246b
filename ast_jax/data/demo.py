"""A procedural data set of eight synthetic sound classes that needs no files.

Each clip is generated from (seed, split, index) alone, so the set is identical on every machine and in every
worker process. Lengths (0.3-1.5 s), onsets, levels, background-noise levels and each class's parameters are
random; the level distribution is the same for every class, so loudness alone does not tell classes apart.
Classes are assigned round-robin (index % 8), so both splits are exactly balanced.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
  from ast_jax.data.examples import Sources

DEMO_CLASSES = (
    "low_tone", "high_tone", "up_chirp", "down_chirp", "noise_burst", "click_train", "am_tone", "harmonic_stack",
)
DEFAULT_TRAIN_EXAMPLES = 1600
DEFAULT_EVAL_EXAMPLES = 400
_SPLIT_IDS = {"train": 0, "eval": 1}
_KEY = re.compile(r"^demo://(-?\d+)/(train|eval)/(\d+)$")


def demo_key(seed: int, split: str, index: int) -> str:
  """The audio key of one demo clip; `demo_waveform` turns it back into audio."""
  return f"demo://{seed}/{split}/{index}"


def is_demo_key(key: str) -> bool:
  """Whether `key` names a generated clip rather than a file."""
  return key.startswith("demo://")


def demo_sources(seed: int, num_train: int, num_eval: int) -> Sources:
  """`Sources` with `num_train` / `num_eval` clips, labels round-robin over `DEMO_CLASSES`."""
  from ast_jax.data.examples import Example, Sources

  def split(name: str, size: int) -> tuple[Example, ...]:
    return tuple(Example(demo_key(seed, name, i), (i % len(DEMO_CLASSES),)) for i in range(size))

  return Sources(split("train", num_train), split("eval", num_eval), DEMO_CLASSES)


def demo_waveform(key: str, sample_rate: int = 16000) -> np.ndarray:
  """Generates the clip named by `key` as float32 `[samples]` in [-1, 1]."""
  match = _KEY.match(key)
  if match is None:
    raise ValueError(f"not a demo key: {key!r}")
  seed, split, index = int(match[1]), match[2], int(match[3])
  return synthesize(index % len(DEMO_CLASSES), np.random.default_rng([seed & 0xFFFFFFFF, _SPLIT_IDS[split], index]),
                    sample_rate)


def synthesize(label: int, rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
  """One clip of class `label`: the event (random onset and offset) at a random level over background noise."""
  num_samples = int(rng.uniform(0.3, 1.5) * sample_rate)
  onset = int(rng.uniform(0.0, 0.1) * num_samples)
  offset = num_samples - int(rng.uniform(0.0, 0.1) * num_samples)
  time = np.arange(offset - onset) / sample_rate
  event = _SYNTHS[label](rng, time, sample_rate)
  event = event * _fade(len(event), int(rng.uniform(0.005, 0.03) * sample_rate))
  level = 10.0 ** (rng.uniform(-32.0, -10.0) / 20.0)  # the same level range for every class
  event = event * level / (np.sqrt(np.mean(event**2)) + 1e-12)
  snr_db = rng.uniform(10.0, 30.0)
  background = _coloured_noise(rng, num_samples, tilt=rng.uniform(0.0, 1.0)) * level * 10.0 ** (-snr_db / 20.0)
  background[onset:offset] += event
  peak = np.max(np.abs(background))
  # Scale down rather than clip, so impulsive classes keep their shape at high levels.
  return (background * min(1.0, 0.99 / max(peak, 1e-12))).astype(np.float32)


def _fade(length: int, ramp: int) -> np.ndarray:
  """Raised-cosine fade-in and fade-out, so tones do not start with a click."""
  envelope = np.ones(length)
  ramp = max(1, min(ramp, length // 2))
  rise = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
  envelope[:ramp] = rise
  envelope[length - ramp:] = rise[::-1]
  return envelope


def _coloured_noise(rng: np.random.Generator, length: int, tilt: float) -> np.ndarray:
  """Unit-RMS noise whose spectrum falls as f**(-tilt/2) (0: white, 1: pink)."""
  spectrum = np.fft.rfft(rng.standard_normal(length))
  frequencies = np.maximum(np.arange(len(spectrum)), 1.0)
  noise = np.fft.irfft(spectrum / frequencies ** (tilt / 2.0), n=length)
  return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _tone(rng: np.random.Generator, time: np.ndarray, sample_rate: int, low: float, high: float) -> np.ndarray:
  frequency = rng.uniform(low, high) * (1.0 + rng.uniform(-0.01, 0.01) * time)  # slight drift, not a pure line
  return np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate + rng.uniform(0, 2 * np.pi))


def _low_tone(rng, time, sample_rate):
  overtone = rng.uniform(0.0, 0.2) * _tone(rng, time, sample_rate, 360.0, 900.0)
  return _tone(rng, time, sample_rate, 180.0, 450.0) + overtone


def _high_tone(rng, time, sample_rate):
  return _tone(rng, time, sample_rate, 1800.0, 4000.0)


def _sweep(rng, time, sample_rate, rising: bool):
  """Exponential sweep between a low (300-700 Hz) and a high (2.5-5 kHz) frequency over the event."""
  low, high = rng.uniform(300.0, 700.0), rng.uniform(2500.0, 5000.0)
  start, end = (low, high) if rising else (high, low)
  duration = max(time[-1], 1e-3)
  frequency = start * (end / start) ** (time / duration)
  return np.sin(2 * np.pi * np.cumsum(frequency) / sample_rate + rng.uniform(0, 2 * np.pi))


def _up_chirp(rng, time, sample_rate):
  return _sweep(rng, time, sample_rate, rising=True)


def _down_chirp(rng, time, sample_rate):
  return _sweep(rng, time, sample_rate, rising=False)


def _noise_burst(rng, time, sample_rate):
  """Band-pass noise: a band of 1-2 octaves starting at 0.5-2 kHz."""
  spectrum = np.fft.rfft(rng.standard_normal(len(time)))
  frequencies = np.fft.rfftfreq(len(time), 1.0 / sample_rate)
  low = rng.uniform(500.0, 2000.0)
  high = low * 2.0 ** rng.uniform(1.0, 2.0)
  spectrum[(frequencies < low) | (frequencies > high)] = 0.0
  return np.fft.irfft(spectrum, n=len(time))


def _click_train(rng, time, sample_rate):
  """Short decaying noise clicks at 6-25 per second with a little timing jitter."""
  rate = rng.uniform(6.0, 25.0)
  clicks = np.zeros(len(time))
  click_length = int(0.004 * sample_rate)
  click = rng.standard_normal(click_length) * np.exp(-np.arange(click_length) / (0.0008 * sample_rate))
  for start in np.arange(rng.uniform(0, 1.0 / rate), time[-1], 1.0 / rate):
    position = int((start + rng.uniform(-0.1, 0.1) / rate) * sample_rate)
    position = min(max(position, 0), len(time) - 1)
    end = min(position + click_length, len(time))
    clicks[position:end] += click[: end - position]
  return clicks if np.any(clicks) else np.sin(2 * np.pi * 50.0 * time)


def _am_tone(rng, time, sample_rate):
  """A 0.7-1.4 kHz carrier amplitude-modulated at 4-12 Hz."""
  depth = rng.uniform(0.7, 1.0)
  modulation = 1.0 - depth * (0.5 + 0.5 * np.cos(2 * np.pi * rng.uniform(4.0, 12.0) * time + rng.uniform(0, 6.28)))
  return modulation * _tone(rng, time, sample_rate, 700.0, 1400.0)


def _harmonic_stack(rng, time, sample_rate):
  """A 110-260 Hz fundamental with 6-12 harmonics of random roll-off."""
  fundamental = rng.uniform(110.0, 260.0)
  rolloff = rng.uniform(0.5, 1.5)
  phase = 2 * np.pi * fundamental * time
  harmonics = range(1, int(rng.integers(6, 13)) + 1)
  return sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**rolloff for k in harmonics)


_SYNTHS: tuple[Callable[[np.random.Generator, np.ndarray, int], np.ndarray], ...] = (
    _low_tone, _high_tone, _up_chirp, _down_chirp, _noise_burst, _click_train, _am_tone, _harmonic_stack,
)
