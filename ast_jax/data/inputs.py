"""The trainer's view of its input: batches of the one contract (`data/batch.py`), planned one of two ways.

- `FixedInput`: whole-clip rows, every clip padded or cut to `audio.target_length` (AST, AuM);
- `PackedInput`: rows of `packing.row_tokens` tokens packed with whole clips of any length (families whose
  `trains_packed(config)`: ElasticAST, and AuM given a packing section).

Both give the steps per epoch, the endless training iterator and evaluation passes, optionally at another length
cap or frame-shift resolution q.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable

import ml_collections
import numpy as np

from ast_jax.audio.patches import patch_of
from ast_jax.data import packed_batches, pipeline
from ast_jax.data.reader import WaveformReader
from ast_jax.data.sampling import EpochSampler, balanced_weights
from ast_jax.data.sources import DataError, Sources

log = logging.getLogger(__name__)


def packing_spec(config: ml_collections.ConfigDict, *, train: bool = True, length: int | None = None,
                 resolution: float | None = None) -> packed_batches.PackingSpec:
  """The `PackingSpec` of `config.packing` (with the audio front end and patch size), for training or for
  evaluation (eval rows, one resolution: `resolution` or the first of `packing.resolutions`; `length` caps clips
  at that many frames instead of `packing.max_frames`)."""
  packing, audio = config.packing, config.audio
  rows = packing.rows if train else packing.eval_rows or packing.rows
  resolutions = tuple(float(q) for q in packing.resolutions)
  return packed_batches.PackingSpec(
      rows=rows, row_tokens=packing.row_tokens, max_clips=packing.max_clips, patch=patch_of(config.model)[0],
      patch_time=patch_of(config.model)[1],
      mel_bins=audio.num_mel_bins, max_frames=length or packing.max_frames, sample_rate=audio.sample_rate,
      frame_length=audio.frame_length, frame_shift=audio.frame_shift, method=packing.method,
      drop_rate=packing.drop_rate if train else 0.0,
      resolutions=resolutions if train else (float(resolution or resolutions[0]),),
      crop=packing.crop if train else "start", min_crop_frames=packing.min_crop_frames if train else 0)


def batch_shapes(config: ml_collections.ConfigDict, *, packed: bool, train: bool = True
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{key: (shape, dtype)} of the global batches the trainer's input yields (`data/batch.py`), without reading any
  data: what an ahead-of-time compile lowers the steps with. tests/test_compile.py checks it against real batches."""
  if packed:
    spec = packing_spec(config, train=train)
    rows, clips, samples = spec.rows, spec.max_clips, spec.max_samples
  else:
    rows = config.data.batch_size if train else config.data.eval_batch_size or config.data.batch_size
    clips, samples = 1, pipeline.clip_samples(config)
  shapes = {"waveform": ((rows, clips, samples), np.float32), "num_samples": ((rows, clips), np.int32),
            "label": ((rows, clips, config.num_classes), np.float32), "clip_mask": ((rows, clips), np.float32),
            "index": ((rows, clips), np.int32)}
  if packed:
    tokens = (rows, config.packing.row_tokens)
    shapes.update(segment_ids=(tokens, np.int32), freq_positions=(tokens, np.int32), time_positions=(tokens, np.int32),
                  time_patches=((rows, clips), np.int32), window_shift=((rows, clips), np.int32),
                  resolution=((rows, clips), np.float32))
  return {key: (shape, np.dtype(dtype)) for key, (shape, dtype) in shapes.items()}


def clips_per_packed_row(config: ml_collections.ConfigDict, clip_seconds: float = 10.0, clips: int = 4096,
                         seed: int = 0) -> float:
  """Clips a packed training row holds on average when every clip lasts `clip_seconds` (AudioSet: 10 s): the
  trainer's planner on epoch 0 of `clips` such clips (their resolutions, crops and token dropout drawn as in
  training). Throughput projections use it to turn rows per second into clips per second."""
  spec = dataclasses.replace(packing_spec(config), rows=min(config.packing.rows, 64))
  lengths = [round(clip_seconds * config.audio.sample_rate)] * clips
  plan = packed_batches.PackedPlans(lengths, EpochSampler(clips, seed), spec, seed).epoch(0)
  return clips / (len(plan.batches) * spec.rows)


class FixedInput:
  """Batches of `config.data.batch_size` clips padded or cut to `config.audio.target_length` frames."""

  packed = False

  def __init__(self, config: ml_collections.ConfigDict, sources: Sources):
    self.config, self.sources = config, sources
    self.steps_per_epoch = pipeline.steps_per_epoch(config, sources)
    self.examples_per_step = float(config.data.batch_size)

  def train_iterator(self, seed: int, shard_index: int = 0, shard_count: int = 1):
    return pipeline.train_iterator(self.config, self.sources, seed=seed, shard_index=shard_index,
                                   shard_count=shard_count)

  def eval_batches(self, shard_index: int = 0, shard_count: int = 1, *, config: ml_collections.ConfigDict | None = None
                   ) -> Iterable[dict[str, np.ndarray]]:
    """One pass over the evaluation set; `config` overrides the front end (another length or frame shift)."""
    return pipeline.eval_iterator(config or self.config, self.sources, shard_index=shard_index,
                                  shard_count=shard_count)


class PackedInput:
  """Global batches of `config.packing.rows` rows of `row_tokens` tokens, each holding whole clips. An epoch is
  every clip once; its batch count depends on the epoch's order and crops, so `steps_per_epoch` is epoch 0's
  (later epochs differ by a batch or so; batches run on across epoch boundaries by position)."""

  packed = True

  def __init__(self, config: ml_collections.ConfigDict, sources: Sources):
    self.config, self.sources = config, sources
    if len(sources.label_names) != config.num_classes:
      raise DataError(f"config.num_classes is {config.num_classes} but the data set has "
                      f"{len(sources.label_names)} labels")
    self.spec = packing_spec(config)
    self.train_lengths = packed_batches.clip_lengths(sources.train, self.spec.sample_rate)
    self.eval_lengths = packed_batches.clip_lengths(sources.eval, self.spec.sample_rate)
    label_sets = [example.labels for example in sources.train]
    weights = balanced_weights(label_sets, config.num_classes) if config.data.balanced_sampling else None
    sampler = EpochSampler(len(sources.train), config.seed, weights)
    self.plans = packed_batches.PackedPlans(self.train_lengths, sampler, self.spec, seed=config.seed)
    self.steps_per_epoch = len(self.plans.epoch(0).batches)
    self.examples_per_step = len(sources.train) / self.steps_per_epoch
    self.train_reader, self.eval_reader = self._reader(sources.train), self._reader(sources.eval)
    # Evaluation plans by spec (length cap, q): each is planned once.
    self.eval_plans: dict[packed_batches.PackingSpec, packed_batches.PackedPlans] = {}
    packing_efficiency, padded_efficiency = self.plans.efficiency(0)
    self.efficiency = {"packing_efficiency": packing_efficiency, "padded_efficiency": padded_efficiency}
    log.info("packing: %d clips in %d batches of %d x %d tokens; %.1f %% of tokens are real (padding every clip "
             "to the longest: %.1f %%)", len(sources.train), self.steps_per_epoch, self.spec.rows,
             self.spec.row_tokens, 100 * packing_efficiency, 100 * padded_efficiency)

  def _reader(self, examples) -> WaveformReader:
    return WaveformReader(examples, self.spec.sample_rate, cache=self.config.data.cache_audio,
                          skip_bad=self.config.data.on_bad_audio == "skip")

  def train_iterator(self, seed: int, shard_index: int = 0, shard_count: int = 1):
    return packed_batches.packed_train_iterator(
        self.plans, self.train_reader, [e.labels for e in self.sources.train],
        self.config.num_classes, seed=seed, shard_index=shard_index, shard_count=shard_count,
        read_threads=_threads(), prefetch=max(2, self.config.data.prefetch_buffer_size))

  def eval_batches(self, shard_index: int = 0, shard_count: int = 1, *, length: int | None = None,
                   resolution: float | None = None) -> Iterable[dict[str, np.ndarray]]:
    """Every evaluation clip once, capped at `length` frames (default `packing.max_frames`) and framed at
    resolution q (default the first of `packing.resolutions`)."""
    spec = packing_spec(self.config, train=False, length=length, resolution=resolution)
    if spec not in self.eval_plans:  # planned once per length cap and resolution, reused by every pass
      self.eval_plans[spec] = packed_batches.PackedPlans(self.eval_lengths, None, spec)
    plans = self.eval_plans[spec]
    return packed_batches.packed_eval_batches(
        plans, self.eval_reader, [e.labels for e in self.sources.eval], self.config.num_classes,
        shard_index=shard_index, shard_count=shard_count, read_threads=_threads(),
        prefetch=max(2, self.config.data.prefetch_buffer_size))


def build_input(config: ml_collections.ConfigDict, sources: Sources, *, packed: bool) -> FixedInput | PackedInput:
  """Packed rows when the model family trains on them (`Family.trains_packed`), else whole-clip rows."""
  return PackedInput(config, sources) if packed else FixedInput(config, sources)


def _threads() -> int:
  return max(1, min(os.cpu_count() or 1, 16))
