"""Classify audio files: `python -m ast_jax.predict --checkpoint=DIR file1.wav file2.flac ...`.

DIR is an ast_jax model directory (`workdir/model/`, or `python -m ast_jax.convert --to=ast_jax` output) or a
training workdir (its latest checkpoint, a coarse training phase's included). Every model family runs
(`ast_jax/inference.py`):
- whole-clip models (AST, AuM, a coarse phase's model): files longer than the model's input are cut into sliding
  windows (`--window_seconds`, `--hop_seconds`); the whole-file result averages the windows' logits.
  `--patch_size=P` runs a FlexiAST model at patch size P.
- models trained on packed rows (ElasticAST, packed AuM): each file at its own length, whole up to the longest
  clip the model takes (longer files in windows), at resolution `--resolution=q`, packed into the model's rows.
Prints the top-k labels with scores per file (and per window); `--logits` saves the whole-file logits `[files,
classes]`, `--embeddings` the whole-file pooled embeddings `[files, width]`, `--token_embeddings` every patch
token's output with its (frequency, time) position (`inference.token_table`). Runs on the CPU unless
`--accelerator`.

A file that cannot be read (missing, undecodable, empty, silent, NaN) is named with its problem on stderr, and the
command exits with status 1 without saving anything; `--skip_unreadable` accepts partial results instead: the
readable files are classified and saved, the unreadable ones' rows of `--logits`/`--embeddings` are NaN, and the
status is 0.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from ast_jax.inference import Predictor, window_starts  # noqa: F401  (what predict runs, for callers)

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "ast_jax model directory or training workdir.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Labels printed per file and per window.")
_WINDOW = flags.DEFINE_float("window_seconds", 0.0, "Window length (default: the model's input length; models "
                             "trained on packed rows: the longest clip they take whole).")
_HOP = flags.DEFINE_float("hop_seconds", 0.0, "Window hop (default: half the window).")
_PATCH = flags.DEFINE_integer("patch_size", 0, "FlexiAST: run the model at this patch size (default: its own).")
_RESOLUTION = flags.DEFINE_float("resolution", 0.0, "Models trained on packed rows: frame-shift multiplier q >= 1 "
                                 "(default: the first training resolution).")
_LOGITS = flags.DEFINE_string("logits", None, "Save whole-file logits [files, classes] to this .npy file.")
_EMBEDDINGS = flags.DEFINE_string("embeddings", None, "Save whole-file pooled embeddings [files, width] here (.npy).")
_TOKENS = flags.DEFINE_string(
    "token_embeddings", None, "Save every patch token's output here (.npz): features [tokens, width] and per token "
    "file_index, window, freq_index, time_index, mel_bin (first mel bin), seconds (first frame's time in the file); "
    "paths [files].")
_LABEL_CSV = flags.DEFINE_string("label_csv", None, "Label names from an index,mid,display_name CSV instead of the "
                                 "checkpoint's.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass (whole-clip models).")
_ACCELERATOR = flags.DEFINE_bool("accelerator", False, "Use the default JAX backend (GPU/TPU) instead of the CPU.")
_SKIP_UNREADABLE = flags.DEFINE_bool(
    "skip_unreadable", False, "Accept partial results: save and exit 0 when some files cannot be read (their rows in "
    "--logits/--embeddings are NaN). Without it, any unreadable file makes the command exit 1 and save nothing.")
flags.mark_flags_as_required(["checkpoint"])


def top_labels(scores, names, k: int) -> str:
  order = np.argsort(-scores)[:k]
  return ", ".join(f"{names[i]} {scores[i]:.3f}" for i in order)


def main(argv: list[str]) -> None:
  files = argv[1:]
  if not files:
    raise app.UsageError("usage: python -m ast_jax.predict --checkpoint=DIR FILE [FILE ...]")
  if not _ACCELERATOR.value:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX is imported below
  from ast_jax import inference
  from ast_jax.audio import AudioError, load_audio, remove_mean
  from ast_jax.convert import model_dir

  try:
    bundle = model_dir.load_model_dir(_CHECKPOINT.value)
    predictor = inference.make_predictor(bundle, batch_size=_BATCH.value, patch_size=_PATCH.value,
                                         resolution=_RESOLUTION.value, tokens=bool(_TOKENS.value))
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  names = model_dir.label_names_from_csv(_LABEL_CSV.value)[0] if _LABEL_CSV.value else bundle.label_names
  rate = predictor.sample_rate
  window = int(_WINDOW.value * rate) if _WINDOW.value else predictor.default_window()
  if window > predictor.default_window():
    sys.exit(f"error: --window_seconds={_WINDOW.value} is longer than this model takes "
             f"({predictor.default_window() / rate:.2f} s)")
  hop = int(_HOP.value * rate) if _HOP.value else max(1, window // 2)
  waveforms, failed = [], 0
  for path in files:
    try:
      waveforms.append(remove_mean(load_audio(path, rate)))
    except AudioError as error:
      print(f"{path}: skipped: {error.problem}", file=sys.stderr)
      waveforms.append(None)
      failed += 1
  if failed and not _SKIP_UNREADABLE.value:
    sys.exit(f"error: {failed} of {len(files)} files could not be read (named above); nothing was saved. Fix or "
             "drop them, or pass --skip_unreadable to accept the others' results (NaN rows for the unreadable)")
  readable = [waveform for waveform in waveforms if waveform is not None]
  try:
    results = iter(predictor.predict(readable, window, hop))
  except ValueError as error:
    sys.exit(f"error: {error}")
  predictions = [None if waveform is None else next(results) for waveform in waveforms]
  width = next((p.embeddings.shape[-1] for p in predictions if p is not None), 0)
  file_logits, file_embeddings = [], []
  for path, waveform, prediction in zip(files, waveforms, predictions):
    if prediction is None:
      file_logits.append(np.full(bundle.config.num_classes, np.nan, np.float32))
      file_embeddings.append(np.full(width, np.nan, np.float32))
      continue
    logits = prediction.logits.mean(0)
    file_logits.append(logits)
    file_embeddings.append(prediction.embeddings.mean(0))
    print(f"{path} ({len(waveform) / rate:.2f} s): "
          f"{top_labels(inference.scores(bundle, logits), names, _TOP_K.value)}")
    if len(prediction.starts) > 1:
      for start, window_logits in zip(prediction.starts, prediction.logits):
        end = min(start + window, len(waveform))
        print(f"  {start / rate:7.2f}-{end / rate:7.2f} s: "
              f"{top_labels(inference.scores(bundle, window_logits), names, _TOP_K.value)}")
  if _LOGITS.value:
    np.save(_LOGITS.value, np.stack(file_logits))
  if _EMBEDDINGS.value:
    np.save(_EMBEDDINGS.value, np.stack(file_embeddings))
  if _TOKENS.value:
    np.savez(_TOKENS.value, **inference.token_table(files, predictions))
  if failed:
    print(f"{failed} of {len(files)} files could not be read (their rows in --logits/--embeddings are NaN)",
          file=sys.stderr)


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()  # 15-30 % faster CPU steps (ast_jax/runtime.py)
  app.run(main)
