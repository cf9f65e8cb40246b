"""Classify audio files: `python -m ast_jax.predict --checkpoint=DIR file1.wav file2.flac ...`.

DIR is an ast_jax model directory (`workdir/model/`, or `python -m ast_jax.convert --to=ast_jax` output) or a
training workdir. Files longer than the model's input are cut into sliding windows (`--window_seconds`,
`--hop_seconds`); each window is classified and the whole-file result averages the windows' logits. Prints the
top-k labels with scores per file (and per window); `--logits` saves the whole-file logits `[files, classes]`,
`--embeddings` the whole-file pooled embeddings `[files, width]`. Runs on the CPU unless `--accelerator`.

A file that cannot be read (missing, undecodable, empty, silent, NaN) is named with its problem on stderr, and the
command exits with status 1 without saving anything; `--skip_unreadable` accepts partial results instead: the
readable files are classified and saved, the unreadable ones' rows of `--logits`/`--embeddings` are NaN, and the
status is 0.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "ast_jax model directory or training workdir.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Labels printed per file and per window.")
_WINDOW = flags.DEFINE_float("window_seconds", 0.0, "Window length (default: the model's input length).")
_HOP = flags.DEFINE_float("hop_seconds", 0.0, "Window hop (default: half the window).")
_LOGITS = flags.DEFINE_string("logits", None, "Save whole-file logits [files, classes] to this .npy file.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "Save whole-file pooled embeddings [files, width] here (.npy).")
_LABEL_CSV = flags.DEFINE_string("label_csv", None, "Label names from an index,mid,display_name CSV instead of the "
                                 "checkpoint's.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_ACCELERATOR = flags.DEFINE_bool("accelerator", False, "Use the default JAX backend (GPU/TPU) instead of the CPU.")
_SKIP_UNREADABLE = flags.DEFINE_bool(
    "skip_unreadable", False, "Accept partial results: save and exit 0 when some files cannot be read (their rows in "
    "--logits/--embeddings are NaN). Without it, any unreadable file makes the command exit 1 and save nothing.")
flags.mark_flags_as_required(["checkpoint"])


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
  """Window starts covering the clip: 0, hop, 2 hop, ... until a window reaches the end (one window if short)."""
  starts = [0]
  while starts[-1] + window < num_samples:
    starts.append(starts[-1] + hop)
  return starts


class Predictor:
  """A model directory made callable on waveforms: windows -> (logits, embeddings) per window."""

  def __init__(self, bundle: Any, batch_size: int = 8):
    import jax
    import jax.numpy as jnp

    from ast_jax.audio import clip_samples, model_input
    from ast_jax.models import build_model

    self.bundle = bundle
    self.audio = bundle.config.audio
    self.input_samples = clip_samples(self.audio.target_length, self.audio.sample_rate, self.audio.frame_length,
                                      self.audio.frame_shift)
    self.batch_size = batch_size
    model = build_model(bundle.config)
    audio = self.audio.to_dict()
    params = jax.tree.map(jnp.asarray, bundle.params)

    @jax.jit
    def forward(waveforms, num_samples):
      logits, intermediates = model.apply({"params": params}, model_input(waveforms, num_samples, audio))
      return logits, intermediates["embedding"]

    self._forward = forward

  def windows(self, waveform, window: int, hop: int):
    starts = window_starts(len(waveform), window, hop)
    clips = np.zeros((len(starts), self.input_samples), np.float32)
    lengths = np.zeros(len(starts), np.int32)
    for row, start in enumerate(starts):
      piece = waveform[start:start + min(window, self.input_samples)]
      clips[row, :len(piece)] = piece
      lengths[row] = len(piece)
    return starts, clips, lengths

  def __call__(self, clips, lengths):
    """clips `[windows, input_samples]` -> (logits `[windows, classes]`, embeddings `[windows, width]`)."""
    logits, embeddings = [], []
    for first in range(0, len(clips), self.batch_size):
      batch = np.zeros((self.batch_size, clips.shape[1]), np.float32)
      count = min(self.batch_size, len(clips) - first)
      batch[:count] = clips[first:first + count]
      batch_lengths = np.zeros(self.batch_size, np.int32)
      batch_lengths[:count] = lengths[first:first + count]
      batch_logits, batch_embeddings = self._forward(batch, batch_lengths)
      logits.append(np.asarray(batch_logits)[:count])
      embeddings.append(np.asarray(batch_embeddings)[:count])
    return np.concatenate(logits), np.concatenate(embeddings)

  def scores(self, logits):
    if self.bundle.config.train.loss == "ce":
      shifted = np.exp(logits - logits.max(-1, keepdims=True))
      return shifted / shifted.sum(-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def top_labels(scores, names, k: int) -> str:
  order = np.argsort(-scores)[:k]
  return ", ".join(f"{names[i]} {scores[i]:.3f}" for i in order)


def main(argv: list[str]) -> None:
  files = argv[1:]
  if not files:
    raise app.UsageError("usage: python -m ast_jax.predict --checkpoint=DIR FILE [FILE ...]")
  if not _ACCELERATOR.value:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported below
  from ast_jax.audio import AudioError, load_audio, remove_mean
  from ast_jax.convert import model_dir

  try:
    bundle = model_dir.load_model_dir(_CHECKPOINT.value)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  from ast_jax.models import family_of

  family = family_of(bundle.config)
  if family.trains_packed(bundle.config):
    sys.exit(f"error: {_CHECKPOINT.value} holds a {family.name!r} model, trained on packed rows; predict runs "
             "whole-clip models (evaluate it with its config: python -m ast_jax.sweep --config=... --workdir=...)")
  names = model_dir.label_names_from_csv(_LABEL_CSV.value)[0] if _LABEL_CSV.value else bundle.label_names
  predictor = Predictor(bundle, _BATCH.value)
  rate = bundle.config.audio.sample_rate
  window = int(_WINDOW.value * rate) if _WINDOW.value else predictor.input_samples
  hop = int(_HOP.value * rate) if _HOP.value else max(1, window // 2)
  file_logits, file_embeddings, failed = [], [], 0
  for path in files:
    try:
      waveform = remove_mean(load_audio(path, rate))
    except AudioError as error:
      print(f"{path}: skipped: {error.problem}", file=sys.stderr)
      failed += 1
      file_logits.append(np.full(bundle.config.num_classes, np.nan, np.float32))
      file_embeddings.append(np.full(bundle.params["cls_token"].shape[-1], np.nan, np.float32))
      continue
    starts, clips, lengths = predictor.windows(waveform, window, hop)
    logits, embeddings = predictor(clips, lengths)
    file_logits.append(logits.mean(0))
    file_embeddings.append(embeddings.mean(0))
    print(f"{path} ({len(waveform) / rate:.2f} s): {top_labels(predictor.scores(logits.mean(0)), names, _TOP_K.value)}")
    if len(starts) > 1:
      for start, window_logits in zip(starts, logits):
        end = min(start + window, len(waveform))
        print(f"  {start / rate:7.2f}-{end / rate:7.2f} s: "
              f"{top_labels(predictor.scores(window_logits), names, _TOP_K.value)}")
  if failed and not _SKIP_UNREADABLE.value:
    sys.exit(f"error: {failed} of {len(files)} files could not be read (named above); nothing was saved. Fix or "
             "drop them, or pass --skip_unreadable to accept the others' results (NaN rows for the unreadable)")
  if _LOGITS.value:
    np.save(_LOGITS.value, np.stack(file_logits))
  if _EMBEDDINGS.value:
    np.save(_EMBEDDINGS.value, np.stack(file_embeddings))
  if failed:
    print(f"{failed} of {len(files)} files could not be read (their rows in --logits/--embeddings are NaN)",
          file=sys.stderr)


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # 15-30 % faster CPU steps (ast_jax/runtime.py)
  app.run(main)
