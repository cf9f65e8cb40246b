"""Turning examples into the pipeline's per-clip records: decode, remove the mean, mix, pad or cut.

A record is one whole-clip row of the batch contract (`ast_jax/data/batch.py`), one clip slot: `waveform` float32
`[1, clip_samples]`, `num_samples` int32 `[1]`, `label` float32 `[1, num_classes]`, `clip_mask` float32 `[1]` (0 for
padding) and `index` int32 `[1]` (-1 for padding).
"""

from __future__ import annotations

import collections
import logging
from typing import Sequence

import numpy as np

from ast_jax.audio.io import AudioError, load_audio, remove_mean
from ast_jax.data import demo
from ast_jax.data.mixup import draw_mixup, mix_waveforms
from ast_jax.data.sources import Example

logger = logging.getLogger(__name__)

_MAX_REPLACEMENTS = 100  # a run whose next 100 files all fail has a bigger problem than one bad file


class WaveformReader:
  """Reads the mean-removed waveform `[samples]` of an example by index, at `sample_rate`.

  With `cache`, decoded waveforms stay in this process's memory. With `skip_bad`, an example whose file fails
  is replaced by the next readable example (index + 1, + 2, ...), and the failure is logged and counted in
  `replaced` and per problem kind in `replaced_by_kind`; otherwise the file's `AudioError` propagates.
  """

  def __init__(self, examples: Sequence[Example], sample_rate: int, *, cache: bool = False, skip_bad: bool = False):
    self.keys = [example.audio for example in examples]
    self.sample_rate = sample_rate
    self.skip_bad = skip_bad
    self.replaced = 0
    self.replaced_by_kind: collections.Counter[str] = collections.Counter()
    self._cache: dict[int, np.ndarray] | None = {} if cache else None

  def decode(self, index: int) -> np.ndarray:
    """The waveform of example `index`, mean removed over its own samples; raises `AudioError`."""
    if self._cache is not None and index in self._cache:
      return self._cache[index]
    key = self.keys[index]
    if demo.is_demo_key(key):
      waveform = demo.demo_waveform(key, self.sample_rate)
    else:
      waveform = load_audio(key, self.sample_rate)
    waveform = remove_mean(waveform)
    if self._cache is not None:
      self._cache[index] = waveform
    return waveform

  def read(self, index: int) -> tuple[np.ndarray, int]:
    """(waveform, index of the example actually read): `index`, or its replacement in skip mode."""
    for attempt in range(min(len(self.keys), _MAX_REPLACEMENTS)):
      candidate = (index + attempt) % len(self.keys)
      try:
        return self.decode(candidate), candidate
      except AudioError as error:
        if not self.skip_bad:
          raise
        self.count_failure(error)
        logger.warning("Unreadable audio %s; using the next example instead (%d replaced in this process)",
                       error, self.replaced)
    raise AudioError(self.keys[index], f"no readable example among the next {_MAX_REPLACEMENTS}")

  def count_failure(self, error: AudioError) -> None:
    """Counts a file left out in skip mode, in total and per kind of problem."""
    self.replaced += 1
    self.replaced_by_kind[error.kind] += 1

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    if state["_cache"] is not None:
      state["_cache"] = {}  # each process fills its own cache
    return state


def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
  """Targets `[num_classes]` with 1 at every label."""
  target = np.zeros(num_classes, np.float32)
  target[list(labels)] = 1.0
  return target


def make_record(waveform: np.ndarray, label: np.ndarray, index: int, clip_samples: int, mask: float = 1.0) -> dict:
  """Pads or cuts `waveform` to `clip_samples` and packs the record: one row holding one clip slot."""
  kept = min(len(waveform), clip_samples)
  row = np.empty((1, clip_samples), np.float32)  # one copy of the clip: cut or padded in place
  row[0, :kept] = waveform[:kept]
  row[0, kept:] = 0.0
  return {
      "waveform": row,
      "num_samples": np.asarray([kept], np.int32),
      "label": label.astype(np.float32)[None],
      "clip_mask": np.asarray([mask], np.float32),
      "index": np.asarray([index], np.int32),
  }


def padding_record(clip_samples: int, num_classes: int) -> dict:
  """An all-zero record with mask 0 and index -1 (fills eval's last batch)."""
  return make_record(np.zeros(0, np.float32), np.zeros(num_classes, np.float32), -1, clip_samples, mask=0.0)


class TrainRecords:
  """`random_map` transform: example index -> training record, with waveform mixup (upstream)."""

  def __init__(self, reader: WaveformReader, label_sets: Sequence[Sequence[int]], num_classes: int,
               clip_samples: int, mixup: float = 0.0, mixup_alpha: float = 10.0):
    self.reader = reader
    self.label_sets = [tuple(labels) for labels in label_sets]
    self.num_classes = num_classes
    self.clip_samples = clip_samples
    self.mixup = mixup
    self.mixup_alpha = mixup_alpha

  def __call__(self, example_index: int, rng: np.random.Generator) -> dict:
    waveform, index = self.reader.read(int(example_index))
    label = multi_hot(self.label_sets[index], self.num_classes)
    mix = draw_mixup(rng, self.mixup, self.mixup_alpha, len(self.label_sets))
    if mix is not None:
      partner_index, mix_lambda = mix
      partner, partner_index = self.reader.read(partner_index)
      partner_label = multi_hot(self.label_sets[partner_index], self.num_classes)
      waveform, label = mix_waveforms(waveform, partner, label, partner_label, mix_lambda)
    return make_record(waveform, label, index, self.clip_samples)


class EvalRecords:
  """`map` transform: position -> evaluation record; positions past the last example are padding.

  In skip mode an unreadable file becomes a padding record (mask 0), so it never counts twice.
  """

  def __init__(self, reader: WaveformReader, label_sets: Sequence[Sequence[int]], num_classes: int,
               clip_samples: int):
    self.reader = reader
    self.label_sets = [tuple(labels) for labels in label_sets]
    self.num_classes = num_classes
    self.clip_samples = clip_samples

  def __call__(self, position: int) -> dict:
    position = int(position)
    if position >= len(self.label_sets):
      return padding_record(self.clip_samples, self.num_classes)
    try:
      waveform = self.reader.decode(position)
    except AudioError as error:
      if not self.reader.skip_bad:
        raise
      self.reader.count_failure(error)
      logger.warning("Unreadable audio %s; left out of this evaluation", error)
      return padding_record(self.clip_samples, self.num_classes)
    return make_record(waveform, multi_hot(self.label_sets[position], self.num_classes), position,
                       self.clip_samples)
