"""Packed batches for ElasticAST: each global batch is a fixed number of rows of whole clips.

Every training epoch's shuffled clip order, with each clip's view for that epoch (its crop and resolution q), is
cut into batches by `packer.plan_batches` from the clips' token counts (known from their lengths before any audio
is decoded), so a batch is a function of its global position alone: the Grain iterator's checkpoint is that
position, as for fixed-length batches. Every host plans the whole global batch and decodes only the clips of its
own block of rows. Evaluation plans the clips once, in order. A batch holds, per row, up to `max_clips` waveform
slots (`waveform [rows, max_clips, max_samples]`, `num_samples`, `label [rows, max_clips, classes]`, `clip_mask`,
the slot's frame shift `window_shift` in samples, its `resolution` q and its `time_patches`) and the token layout
(`segment_ids`, `freq_positions`, `time_positions` `[rows, row_tokens]`); the step computes each slot's fbank on
the device and the model gathers the tokens (`models/tokens.py:gather_packed`).
"""

from __future__ import annotations

import bisect
import logging
import dataclasses
import sys
import threading
from typing import Sequence

import grain
import numpy as np
import soundfile as sf

from ast_jax.audio.fbank import FbankOptions, num_frames
from ast_jax.audio.io import AudioError
from ast_jax.data import demo
from ast_jax.audio.patches import patch_grid, stored_patch
from ast_jax.data.packer import keep_tokens, kept_tokens, lay_out, plan_batches
from ast_jax.data.reader import WaveformReader, multi_hot
from ast_jax.data.sampling import EpochSampler
from ast_jax.data.sources import Example

logger = logging.getLogger(__name__)


CROPS = ("start", "random")


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  """How clips become packed rows. Data modes: native length up to `max_frames` (a duration: frames at the base
  frame shift); variable resolution (each clip framed at `frame_shift * q` ms, q drawn from `resolutions`);
  random crops (`crop='random'` cuts long clips at a random offset, `min_crop_frames > 0` crops every clip to a
  random length of at least that many frames). Evaluation uses one resolution, the cap, and no crops or dropout."""

  rows: int = 4  # rows per global batch
  row_tokens: int = 2048
  max_clips: int = 64  # clips per row at most
  patch: int = 16  # frequency (and time) size of a patch
  patch_time: int = 0  # > 0: the time size, for rectangular patches
  mel_bins: int = 128
  max_frames: int = 1024  # longer clips are cut to this duration (frames at the base frame shift)
  sample_rate: int = 16000
  frame_length: float = 25.0  # ms
  frame_shift: float = 10.0  # ms, at q = 1
  method: str = "best_fit"
  drop_rate: float = 0.0  # token dropout in training
  resolutions: tuple[float, ...] = (1.0,)  # q: frame shift multipliers, one drawn per clip and epoch
  crop: str = "start"  # where a clip longer than max_frames is cut: start | random
  min_crop_frames: int = 0  # > 0: random-length crops of at least this many frames

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"crop {self.crop!r} is not one of {CROPS}")
    if not self.resolutions or min(self.resolutions) < 1.0:
      raise ValueError(f"resolutions {self.resolutions} must be frame-shift multipliers q >= 1")
    freq, time = self.patch_shape
    if self.max_frames < time:
      raise ValueError(f"max_frames {self.max_frames} is shorter than one {time}-frame patch")
    if self.mel_bins < freq:
      raise ValueError(f"{self.mel_bins} mel bins are fewer than one {freq}-bin patch")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"drop_rate {self.drop_rate} is not in [0, 1)")
    if self.mel_bins // freq > self.row_tokens:
      raise ValueError(f"row_tokens {self.row_tokens} cannot hold one clip's {self.mel_bins // freq} "
                       "frequency patches")

  @property
  def patch_shape(self) -> tuple[int, int]:
    """(frequency, time) size of a patch."""
    return stored_patch(self.patch, self.patch_time)

  def fbank_options(self, resolution: float = 1.0) -> FbankOptions:
    return FbankOptions(sample_rate=float(self.sample_rate), frame_length=self.frame_length,
                        frame_shift=self.frame_shift * resolution)

  def window_shift(self, resolution: float) -> int:
    """The frame shift in samples at `resolution` (torchaudio's rounding)."""
    return self.fbank_options(resolution).window_shift

  @property
  def max_samples(self) -> int:
    """Samples of the longest clip (`max_frames` at the base frame shift): the waveform slots' size."""
    options = self.fbank_options()
    return options.window_size + options.window_shift * (self.max_frames - 1)

  @property
  def max_time_patches(self) -> int:
    """Time patches of the longest clip (at q = 1): the least time-table size for integer positions."""
    return self.max_frames // self.patch_shape[1]

  def grid(self, num_samples: int, resolution: float = 1.0) -> tuple[int, int]:
    """The (frequency, time) patch grid of a clip of `num_samples` samples (cut to `max_samples`) at q."""
    frames = num_frames(int(min(num_samples, self.max_samples)), self.fbank_options(resolution))
    return patch_grid(self.mel_bins, frames, self.patch_shape, at_least_one=True)

  def frame_samples(self, frames: int) -> int:
    """Samples spanning `frames` frames at the base frame shift."""
    options = self.fbank_options()
    return options.window_size + options.window_shift * (max(frames, 1) - 1)


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


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """One epoch: its batches (rows of example indices) and, per example, the view of it this epoch uses."""

  batches: list[list[list[int]]]
  start: np.ndarray  # first sample read
  num_samples: np.ndarray  # samples read
  resolution: np.ndarray  # q
  grids: list[tuple[int, int]]


class PackedPlans:
  """Global batch position -> rows of example indices, epoch after epoch (each epoch planned once, on demand).

  With a `sampler` (training) every epoch has its own shuffled order and per-clip resolutions and crops, drawn
  from (seed, epoch); without one (evaluation) there is a single epoch: the clips in order, from their start,
  at `resolutions[0]`, no dropout.
  """

  def __init__(self, lengths: Sequence[int], sampler: EpochSampler | None, spec: PackingSpec, seed: int = 0):
    self.lengths, self.sampler, self.spec = np.asarray(lengths, np.int64), sampler, spec
    self.seed = seed & 0xFFFFFFFF
    self._plans: dict[int, EpochPlan] = {}
    self._starts = [0]  # first global batch position of each planned epoch
    self._lock = threading.RLock()

  def _views(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec, lengths = self.spec, self.lengths
    capped = np.minimum(lengths, spec.max_samples)
    if self.sampler is None:
      return np.zeros_like(lengths), capped, np.full(len(lengths), spec.resolutions[0])
    rng = np.random.default_rng([self.seed, epoch, 3])
    resolution = rng.choice(np.asarray(spec.resolutions, np.float64), size=len(lengths))
    num_samples = capped
    if spec.min_crop_frames > 0:
      shortest = np.minimum(spec.frame_samples(spec.min_crop_frames), capped)
      num_samples = shortest + np.floor(rng.random(len(lengths)) * (capped - shortest + 1)).astype(np.int64)
    start = np.zeros_like(lengths)
    if spec.crop == "random" or spec.min_crop_frames > 0:
      start = np.floor(rng.random(len(lengths)) * (lengths - num_samples + 1)).astype(np.int64)
    return start, num_samples, resolution

  def epoch(self, epoch: int) -> EpochPlan:
    """The batches and clip views of `epoch`."""
    with self._lock:
      if epoch not in self._plans:
        if self.sampler is None and epoch > 0:
          raise IndexError("an evaluation plan has a single epoch")
        order = self.sampler.epoch_order(epoch) if self.sampler is not None else np.arange(len(self.lengths))
        start, num_samples, resolution = self._views(epoch)
        grids = [self.spec.grid(int(n), float(q)) for n, q in zip(num_samples, resolution)]
        drop = self.spec.drop_rate if self.sampler is not None else 0.0
        counts = [kept_tokens(f * t, drop) if drop else f * t for f, t in grids]
        plan = plan_batches([counts[i] for i in order], self.spec.rows, self.spec.row_tokens,
                            self.spec.max_clips, method=self.spec.method)
        batches = [[[int(order[i]) for i in row] for row in batch] for batch in plan]
        # Two epochs at most: prefetching straddles an epoch boundary, never more.
        self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
        self._plans[epoch] = EpochPlan(batches, start, num_samples, resolution, grids)
      return self._plans[epoch]

  def locate(self, position: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of a global batch position."""
    with self._lock:
      while self._starts[-1] <= position:
        self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1).batches))
      epoch = bisect.bisect_right(self._starts, position) - 1
    return epoch, position - self._starts[epoch]

  def efficiency(self, epoch: int = 0) -> tuple[float, float]:
    """(packing efficiency, pad-to-longest efficiency) of an epoch's token counts: real tokens over the rows'
    capacity, and over every clip padded to the longest clip."""
    plan = self.epoch(epoch)
    drop = self.spec.drop_rate if self.sampler is not None else 0.0
    counts = np.asarray([kept_tokens(f * t, drop) if drop else f * t for f, t in plan.grids])
    capacity = len(plan.batches) * self.spec.rows * self.spec.row_tokens
    return float(counts.sum() / capacity), float(counts.sum() / (len(counts) * counts.max()))

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state["_plans"], state["_starts"], state["_lock"] = {}, [0], None  # worker processes replan; locks do not pickle
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.RLock()


class PackedBatches:
  """`map` transform: global batch position -> this host's block of the packed batch (numpy arrays, see the
  module docstring). Every host plans the whole global batch (token dropout included, so the plan is the same
  everywhere) but decodes only the clips of its own contiguous block of rows: rows [i R / N, (i + 1) R / N) of
  R for host i of N."""

  def __init__(self, plans: PackedPlans, reader: WaveformReader, label_sets: Sequence[Sequence[int]],
               num_classes: int, seed: int, *, shard_index: int = 0, shard_count: int = 1):
    if plans.spec.rows % shard_count:
      raise ValueError(f"{plans.spec.rows} packed rows do not split over {shard_count} hosts")
    self.plans, self.reader, self.num_classes, self.seed = plans, reader, num_classes, seed
    self.label_sets = [tuple(labels) for labels in label_sets]
    per_host = plans.spec.rows // shard_count
    self.block = slice(shard_index * per_host, (shard_index + 1) * per_host)

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    spec = self.plans.spec
    epoch, index = self.plans.locate(int(position))
    plan = self.plans.epoch(epoch)
    rows = plan.batches[index]
    members = [clip for row in rows for clip in row]
    grids = [plan.grids[clip] for clip in members]
    drop = spec.drop_rate if self.plans.sampler is not None else 0.0
    # Dropout is drawn over the global batch's clips in order, so every host draws the same tokens.
    kept = keep_tokens(grids, drop, seed=int(np.random.SeedSequence([self.seed, int(position)]).generate_state(1)[0]))
    slots, start = [], 0
    for row in rows:
      slots.append(list(range(start, start + len(row))))
      start += len(row)
    own_rows = rows[self.block]
    layout = lay_out(grids, kept, slots[self.block], spec.row_tokens, spec.max_clips)
    shape = (len(own_rows), spec.max_clips)
    batch = {"waveform": np.zeros(shape + (spec.max_samples,), np.float32),
             "num_samples": np.zeros(shape, np.int32), "label": np.zeros(shape + (self.num_classes,), np.float32),
             "clip_mask": np.zeros(shape, np.float32), "index": np.full(shape, -1, np.int32),
             "window_shift": np.full(shape, spec.window_shift(1.0), np.int32),
             "resolution": np.ones(shape, np.float32), "time_patches": np.ones(shape, np.int32)}
    for row, clips in enumerate(own_rows):
      for slot, clip in enumerate(clips):
        self._fill(batch, row, slot, clip, plan)
    batch.update(segment_ids=layout.segment_ids, freq_positions=layout.freq_positions,
                 time_positions=layout.time_positions)
    return batch

  def _fill(self, batch: dict[str, np.ndarray], row: int, slot: int, clip: int, plan: EpochPlan) -> None:
    """Decodes `clip` into slot `slot` of row `row` (left empty for an unreadable evaluation clip in skip mode)."""
    spec = self.plans.spec
    if self.plans.sampler is None:  # evaluation: an unreadable clip is left out (skip mode), never doubled
      try:
        waveform, read_index = self.reader.decode(clip), clip
      except AudioError as error:
        if not self.reader.skip_bad:
          raise
        self.reader.count_failure(error)
        logger.warning("Unreadable audio %s; left out of this evaluation", error)
        return
    else:
      waveform, read_index = self.reader.read(clip)
    # The planned view; in skip mode a replacement clip is cut to fit the tokens planned for the original.
    first = int(plan.start[clip]) if read_index == clip else 0
    waveform = waveform[first:first + int(plan.num_samples[clip])]
    batch["waveform"][row, slot, :len(waveform)] = waveform
    batch["num_samples"][row, slot] = len(waveform)
    batch["label"][row, slot] = multi_hot(self.label_sets[read_index], self.num_classes)
    batch["clip_mask"][row, slot] = 1.0
    batch["index"][row, slot] = read_index
    batch["window_shift"][row, slot] = spec.window_shift(float(plan.resolution[clip]))
    batch["resolution"][row, slot] = plan.resolution[clip]
    batch["time_patches"][row, slot] = plan.grids[clip][1]


def packed_train_iterator(plans: PackedPlans, reader: WaveformReader, label_sets: Sequence[Sequence[int]],
                          num_classes: int, *, seed: int, shard_index: int = 0, shard_count: int = 1,
                          read_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
  """The endless stream of this host's packed batches; checkpoint it as any Grain iterator (its state is the
  position)."""
  dataset = (grain.MapDataset.range(sys.maxsize)
             .map(PackedBatches(plans, reader, label_sets, num_classes, seed, shard_index=shard_index,
                                 shard_count=shard_count)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)))


def packed_eval_batches(plans: PackedPlans, reader: WaveformReader, label_sets: Sequence[Sequence[int]],
                        num_classes: int, *, shard_index: int = 0, shard_count: int = 1, read_threads: int = 2,
                        prefetch: int = 2) -> grain.IterDataset:
  """Every evaluation clip once (`plans` without a sampler), in fixed rows; empty slots have clip_mask 0."""
  dataset = (grain.MapDataset.range(len(plans.epoch(0).batches))
             .map(PackedBatches(plans, reader, label_sets, num_classes, seed=0, shard_index=shard_index,
                                 shard_count=shard_count)))
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
