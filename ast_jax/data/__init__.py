"""Input data: sources (datafile JSON, ESC-50, Speech Commands, folders, procedural demo), audio checks and
Grain pipelines that yield batches of waveforms."""

from ast_jax.data.pipeline import clip_samples, eval_iterator, steps_per_epoch, train_dataset, train_iterator
from ast_jax.data.scan import BadDataError, scan_sources
from ast_jax.data.sources import DataError, Example, Problem, Sources, build_sources, read_sources

__all__ = [
    "BadDataError",
    "DataError",
    "Example",
    "Problem",
    "Sources",
    "build_sources",
    "clip_samples",
    "read_sources",
    "eval_iterator",
    "scan_sources",
    "steps_per_epoch",
    "train_dataset",
    "train_iterator",
]
