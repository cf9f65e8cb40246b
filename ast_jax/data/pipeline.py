"""Grain input pipelines: an endless, checkpointable training stream and a finite, ordered evaluation pass.

Batches are whole-clip rows of the batch contract (`ast_jax/data/batch.py`): `waveform` float32 `[rows, 1,
clip_samples]`, `num_samples` int32 `[rows, 1]`, `label` float32 `[rows, 1, num_classes]`, `clip_mask` float32
`[rows, 1]`, `index` int32 `[rows, 1]`. The log-mel front end and spectrogram augmentation run later, inside the
jitted step.

The training stream is a sequence of global positions 0, 1, 2, ...: position p belongs to epoch
p // len(train) and holds the example `EpochSampler` puts there. Global batch k is positions
[k * batch_size, (k + 1) * batch_size) whatever the host count, and host h of N reads its h-th contiguous block of
batch_size / N positions, so the assembled global array is the same examples in the same order as on one host. Every random
choice of a record is seeded by (seed, position), so an iterator restored from `get_state()` replays exactly,
and batches do not depend on `num_workers`.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import grain
import ml_collections
import numpy as np

from ast_jax.audio import clip_samples as audio_clip_samples
from ast_jax.data.reader import EvalRecords, TrainRecords, WaveformReader
from ast_jax.data.sampling import EpochSampler, balanced_weights
from ast_jax.data.sources import DataError, Example, Sources


def clip_samples(config: ml_collections.ConfigDict) -> int:
  """Samples S that fill `config.audio.target_length` frames: frame length + shift * (target_length - 1)."""
  audio = config.audio
  return audio_clip_samples(audio.target_length, audio.sample_rate, audio.frame_length, audio.frame_shift)


def steps_per_epoch(config: ml_collections.ConfigDict, source: Sources) -> int:
  """Global batches per epoch: len(train examples) // config.data.batch_size."""
  steps = len(source.train) // config.data.batch_size
  if steps == 0:
    raise DataError(f"{len(source.train)} training examples do not fill one batch of {config.data.batch_size}")
  return steps


def train_dataset(
    config: ml_collections.ConfigDict, source: Sources, *, seed: int, shard_index: int = 0, shard_count: int = 1
) -> grain.IterDataset:
  """The endless training stream of this host, batched (`config.data.batch_size // shard_count` per host).

  Each epoch is a fresh shuffle (or `balanced_sampling` draws) of the training examples; batches run across
  epoch boundaries, so the trainer stops after `config.train.epochs * steps_per_epoch(...)` steps.
  """
  _check_labels(config, source)
  per_host = _per_host(config.data.batch_size, shard_count, shard_index)
  label_sets = [example.labels for example in source.train]
  weights = balanced_weights(label_sets, config.num_classes) if config.data.balanced_sampling else None
  records = TrainRecords(
      _reader(config, source.train), label_sets, config.num_classes, clip_samples(config),
      mixup=config.augment.mixup, mixup_alpha=config.augment.mixup_alpha,
  )
  augment_seed = int(np.random.SeedSequence([seed & 0xFFFFFFFF, 1]).generate_state(1)[0])
  dataset = (
      grain.MapDataset.range(sys.maxsize)  # endless: positions, not examples
      .map(EpochSampler(len(source.train), seed, weights))
      .random_map(records, seed=augment_seed)  # seeded by the global position, before sharding
  )
  return _to_iter(config, _host_blocks(dataset, per_host, shard_index, shard_count))


def train_iterator(
    config: ml_collections.ConfigDict, source: Sources, *, seed: int, shard_index: int = 0, shard_count: int = 1
) -> grain.DatasetIterator:
  """An iterator over `train_dataset(...)`; checkpoint it with `get_state()` / `set_state()` or
  `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` under Orbax."""
  return iter(train_dataset(config, source, seed=seed, shard_index=shard_index, shard_count=shard_count))


def eval_iterator(
    config: ml_collections.ConfigDict, source: Sources, *, shard_index: int = 0, shard_count: int = 1
) -> grain.IterDataset:
  """Every evaluation example once, in order, without augmentation; iterate it again for every evaluation.

  Global batch size `config.data.eval_batch_size` (or `batch_size`), `// shard_count` per host; host h reads the
  h-th block of each global batch. The last batch is padded (clip_mask 0, index -1) so every host yields the same count.
  """
  _check_labels(config, source)
  global_batch = config.data.eval_batch_size or config.data.batch_size
  per_host = _per_host(global_batch, shard_count, shard_index)
  total = math.ceil(len(source.eval) / global_batch) * global_batch
  records = EvalRecords(
      _reader(config, source.eval), [e.labels for e in source.eval], config.num_classes, clip_samples(config)
  )
  dataset = grain.MapDataset.range(total).map(records)
  return _to_iter(config, _host_blocks(dataset, per_host, shard_index, shard_count))


def _host_blocks(dataset: grain.MapDataset, per_host: int, shard_index: int, shard_count: int) -> grain.MapDataset:
  """Host `shard_index`'s batches: block `shard_index` of every run of `shard_count` consecutive blocks."""
  return dataset.batch(per_host, drop_remainder=True)[shard_index::shard_count]


def _reader(config: ml_collections.ConfigDict, examples: Sequence[Example]) -> WaveformReader:
  return WaveformReader(
      examples, config.audio.sample_rate, cache=config.data.cache_audio, skip_bad=config.data.on_bad_audio == "skip"
  )


def _to_iter(config: ml_collections.ConfigDict, dataset: grain.MapDataset) -> grain.IterDataset:
  """Reads batches in threads (and in worker processes when `num_workers > 0`); whole batches per thread."""
  threads = max(1, min(os.cpu_count() or 1, 16))
  read_options = grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(threads, config.data.prefetch_buffer_size)
  )
  iterable = dataset.to_iter_dataset(read_options)
  if config.data.num_workers > 0:
    _allow_unparsed_absl_flags()
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.num_workers, per_worker_buffer_size=max(1, config.data.prefetch_buffer_size)
    ))
  return iterable


def _allow_unparsed_absl_flags() -> None:
  """Grain <= 0.2.18 reads an absl flag when starting workers and fails outside `absl.app` (google/grain#1355)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # flags keep their defaults, as an absl.app program without arguments would


def _per_host(global_batch: int, shard_count: int, shard_index: int) -> int:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  if global_batch <= 0 or global_batch % shard_count:
    raise ValueError(f"batch size {global_batch} must be a positive multiple of the host count {shard_count}")
  return global_batch // shard_count


def _check_labels(config: ml_collections.ConfigDict, source: Sources) -> None:
  """The model's head width must match the data set's label set."""
  if len(source.label_names) != config.num_classes:
    raise DataError(
        f"config.num_classes is {config.num_classes} but the data set has {len(source.label_names)} labels"
    )
