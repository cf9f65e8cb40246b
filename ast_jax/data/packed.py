"""Packed training batches for ElasticAST: each global batch is a fixed number of rows of whole clips.

Every epoch's shuffled clip order is cut into batches by `packing.plan_batches` from the clips' token counts (known
from their lengths before any audio is decoded), so a batch is a function of its global position alone: the Grain
iterator's checkpoint is that position, as for fixed-length batches. A batch holds, per row, up to `max_clips`
waveform slots (`waveform [rows, max_clips, max_samples]`, `num_samples`, `label [rows, max_clips, classes]`,
`clip_mask`) and the token layout (`segment_ids`, `freq_positions`, `time_positions` `[rows, row_tokens]`); the
step computes each slot's fbank on the device and gathers the tokens (`models/elastic.py:gather_packed`).
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
import threading
from typing import Sequence

import grain
import numpy as np
import soundfile as sf

from ast_jax.audio.fbank import FbankOptions, num_frames
from ast_jax.data import demo
from ast_jax.data.packing import keep_tokens, kept_tokens, lay_out, patch_grid_of, plan_batches
from ast_jax.data.reader import WaveformReader, multi_hot
from ast_jax.data.sampling import EpochSampler
from ast_jax.data.sources import Example


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  rows: int = 4  # rows per global batch
  row_tokens: int = 2048
  max_clips: int = 64  # clips per row at most
  patch: int = 16
  mel_bins: int = 128
  max_frames: int = 1024  # longer clips are cut to this many frames
  sample_rate: int = 16000
  frame_length: float = 25.0  # ms
  frame_shift: float = 10.0  # ms
  method: str = "best_fit"
  drop_rate: float = 0.0  # token dropout in training

  @property
  def max_samples(self) -> int:
    options = self.fbank_options
    return options.window_size + options.window_shift * (self.max_frames - 1)

  @property
  def fbank_options(self) -> FbankOptions:
    return FbankOptions(sample_rate=float(self.sample_rate), frame_length=self.frame_length,
                        frame_shift=self.frame_shift)

  def grid(self, num_samples: int) -> tuple[int, int]:
    """The (frequency, time) patch grid of a clip of `num_samples` samples (cut to `max_frames`)."""
    frames = num_frames(int(min(num_samples, self.max_samples)), self.fbank_options)
    return patch_grid_of(frames, self.mel_bins, self.patch)


def clip_lengths(examples: Sequence[Example], sample_rate: int) -> np.ndarray:
  """Samples of each clip at `sample_rate`, from file headers (demo clips are generated to measure them)."""
  lengths = []
  for example in examples:
    if demo.is_demo_key(example.audio):
      lengths.append(len(demo.demo_waveform(example.audio, sample_rate)))
    else:
      info = sf.info(example.audio)
      lengths.append(int(round(info.frames * sample_rate / info.samplerate)))
  return np.asarray(lengths, np.int64)


class PackedPlans:
  """Global batch position -> rows of example indices, epoch after epoch (each epoch planned once, on demand)."""

  def __init__(self, lengths: Sequence[int], sampler: EpochSampler, spec: PackingSpec):
    self.lengths, self.sampler, self.spec = [int(n) for n in lengths], sampler, spec
    self.grids = [spec.grid(n) for n in self.lengths]
    self.counts = [kept_tokens(f * t, spec.drop_rate) if spec.drop_rate else f * t for f, t in self.grids]
    self._plans: dict[int, list[list[list[int]]]] = {}
    self._starts = [0]  # first global batch position of each planned epoch
    self._lock = threading.RLock()

  def epoch(self, epoch: int) -> list[list[list[int]]]:
    """The batches of `epoch` as rows of example indices."""
    with self._lock:
      if epoch not in self._plans:
        order = self.sampler.epoch_order(epoch)
        plan = plan_batches([self.counts[i] for i in order], self.spec.rows, self.spec.row_tokens,
                            self.spec.max_clips, method=self.spec.method)
        self._plans[epoch] = [[[int(order[i]) for i in row] for row in batch] for batch in plan]
      return self._plans[epoch]

  def locate(self, position: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of a global batch position."""
    with self._lock:
      while self._starts[-1] <= position:
        self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1)))
      epoch = bisect.bisect_right(self._starts, position) - 1
    return epoch, position - self._starts[epoch]


class PackedBatches:
  """`map` transform: global batch position -> the packed batch (numpy arrays, see the module docstring)."""

  def __init__(self, plans: PackedPlans, reader: WaveformReader, label_sets: Sequence[Sequence[int]],
               num_classes: int, seed: int):
    self.plans, self.reader, self.num_classes, self.seed = plans, reader, num_classes, seed
    self.label_sets = [tuple(labels) for labels in label_sets]

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    spec = self.plans.spec
    epoch, index = self.plans.locate(int(position))
    rows = self.plans.epoch(epoch)[index]
    members = [clip for row in rows for clip in row]
    grids = [self.plans.grids[clip] for clip in members]
    kept = keep_tokens(grids, spec.drop_rate, seed=int(np.random.SeedSequence([self.seed, int(position)])
                                                           .generate_state(1)[0]))
    plan, start = [], 0
    for row in rows:
      plan.append(list(range(start, start + len(row))))
      start += len(row)
    layout = lay_out(grids, kept, plan, spec.row_tokens, spec.max_clips)
    shape = (spec.rows, spec.max_clips)
    batch = {"waveform": np.zeros(shape + (spec.max_samples,), np.float32),
             "num_samples": np.zeros(shape, np.int32), "label": np.zeros(shape + (self.num_classes,), np.float32),
             "clip_mask": np.zeros(shape, np.float32), "index": np.full(shape, -1, np.int32)}
    for row, clips in enumerate(rows):
      for slot, clip in enumerate(clips):
        waveform, read_index = self.reader.read(clip)
        # Cut to the planned length: in skip mode a replacement clip must fit the tokens planned for the original.
        waveform = waveform[:min(spec.max_samples, self.plans.lengths[clip])]
        batch["waveform"][row, slot, :len(waveform)] = waveform
        batch["num_samples"][row, slot] = len(waveform)
        batch["label"][row, slot] = multi_hot(self.label_sets[read_index], self.num_classes)
        batch["clip_mask"][row, slot] = 1.0
        batch["index"][row, slot] = read_index
    batch.update(segment_ids=layout.segment_ids, freq_positions=layout.freq_positions,
                 time_positions=layout.time_positions)
    return batch


class HostRows:
  """`map` transform: a packed batch -> this host's contiguous block of rows (rows split evenly over hosts)."""

  def __init__(self, shard_index: int, shard_count: int):
    self.shard_index, self.shard_count = shard_index, shard_count

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = batch["segment_ids"].shape[0]
    if rows % self.shard_count:
      raise ValueError(f"{rows} packed rows do not split over {self.shard_count} hosts")
    per_host = rows // self.shard_count
    block = slice(self.shard_index * per_host, (self.shard_index + 1) * per_host)
    return {name: value[block] for name, value in batch.items()}


def packed_train_iterator(examples: Sequence[Example], label_sets: Sequence[Sequence[int]], num_classes: int,
                          spec: PackingSpec, *, seed: int, reader: WaveformReader | None = None,
                          shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """The endless stream of this host's packed batches; checkpoint it as any Grain iterator (its state is the
  position). Planning needs every clip's length, read from the file headers once here."""
  reader = reader or WaveformReader(examples, spec.sample_rate)
  plans = PackedPlans(clip_lengths(examples, spec.sample_rate), EpochSampler(len(examples), seed), spec)
  dataset = (grain.MapDataset.range(sys.maxsize)
             .map(PackedBatches(plans, reader, label_sets, num_classes, seed))
             .map(HostRows(shard_index, shard_count)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
