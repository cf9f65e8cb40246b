"""Inference on waveforms for every model family: what `python -m ast_jax.predict` and `ast_jax.export` run.

`make_predictor(bundle)` picks the predictor a model directory needs:
- `Predictor` (whole-clip models: AST, FlexiAST at any patch size the model can take, AuM, models from a coarse
  training phase): each file cut into windows of the model's input (a shorter file is one zero-padded window),
  windows batched through the front end and the model in one jitted function.
- `PackedPredictor` (models trained on packed rows: ElasticAST, AuM with a packing section): each file at its own
  length and at resolution q, whole up to the longest clip the model can take (its row size and positional table);
  longer files in windows of that length. Windows are packed into rows by the evaluation planner and run through
  the evaluation step's front end and model, so a file's logits are the evaluation path's.

Both return, per file, the windows' starts, logits, pooled embeddings and (when asked) every patch token's output
with its (frequency, time) position: `FilePrediction`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
  """Window starts covering the clip: 0, hop, 2 hop, ... until a window reaches the end (one window if short)."""
  starts = [0]
  while starts[-1] + window < num_samples:
    starts.append(starts[-1] + hop)
  return starts


@dataclasses.dataclass
class FilePrediction:
  """One file's windows. `tokens[w]` `[patches, width]` with `freq_index[w]` / `time_index[w]` `[patches]` (the
  patch's place in the window's grid), `mel_bin[w]` (its first mel bin) and `seconds[w]` (its first frame's time in
  the file); the token lists are empty unless tokens were asked for."""

  starts: list[int]  # window starts in samples
  logits: np.ndarray  # [windows, classes]
  embeddings: np.ndarray  # [windows, width]
  tokens: list[np.ndarray] = dataclasses.field(default_factory=list)
  freq_index: list[np.ndarray] = dataclasses.field(default_factory=list)
  time_index: list[np.ndarray] = dataclasses.field(default_factory=list)
  mel_bin: list[np.ndarray] = dataclasses.field(default_factory=list)
  seconds: list[np.ndarray] = dataclasses.field(default_factory=list)


def scores(bundle: Any, logits: np.ndarray) -> np.ndarray:
  """Logits -> probabilities: softmax for a model trained with cross-entropy, else sigmoid."""
  if bundle.config.train.loss == "ce":
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-logits))


def patch_tokens(intermediates: dict[str, Any], bundle: Any) -> Any:
  """The model's per-patch outputs (`intermediates["patch_tokens"]`); a family without them cannot give tokens."""
  if "patch_tokens" not in intermediates:
    raise ValueError(f"--token_embeddings: {bundle.config.model.name!r} models return no 'patch_tokens' "
                     "intermediate (the per-patch outputs of models/family.py's contract)")
  return intermediates["patch_tokens"]


def make_predictor(bundle: Any, *, batch_size: int = 8, patch_size: int = 0, resolution: float = 0.0,
                   tokens: bool = False) -> Predictor | PackedPredictor:
  """The predictor of `bundle`'s family. `patch_size` > 0: run a FlexiAST model at that patch size; `resolution`
  > 0: the frame-shift multiplier q of a model trained on packed rows (default: its first training resolution).
  Raises ValueError naming the option a model cannot take."""
  from ast_jax.models import family_of
  from ast_jax.models.family import FLEXI_PATCH, families_with

  family = family_of(bundle.config)
  packed = family.trains_packed(bundle.config)
  if patch_size:
    if FLEXI_PATCH not in family.options:
      raise ValueError(f"--patch_size: this {family.name!r} model runs at its own patch size only; models of the "
                       f"families {', '.join(families_with(FLEXI_PATCH))} run at any")
  if resolution and not packed:
    raise ValueError(f"--resolution: this {family.name!r} model was trained on whole-clip rows at one frame shift; "
                     "only models trained on packed rows (ElasticAST, packed AuM) take a resolution")
  if packed:
    return PackedPredictor(bundle, resolution=resolution, tokens=tokens)
  return Predictor(bundle, batch_size=batch_size, patch_size=patch_size, tokens=tokens)


class Predictor:
  """A whole-clip model made callable on waveforms: windows of the model's input -> logits, embeddings, tokens.
  `patch_size` > 0: a FlexiAST model at that size (`models/flexi.py:flexi_shape`); a model from a 'patch' training
  phase runs at its phase's patch (`model.run_patch`)."""

  packed = False

  def __init__(self, bundle: Any, batch_size: int = 8, *, patch_size: int = 0, tokens: bool = False):
    import jax
    import jax.numpy as jnp

    from ast_jax.audio import FrontEnd, clip_samples, model_input
    from ast_jax.audio.patches import patch_grid, patch_of, scaled_strides, strides_of
    from ast_jax.models import build_model
    from ast_jax.models.flexi import flexi_shape

    self.bundle, self.audio, self.batch_size = bundle, bundle.config.audio, batch_size
    self.sample_rate = int(self.audio.sample_rate)
    self.input_samples = clip_samples(self.audio.target_length, self.audio.sample_rate, self.audio.frame_length,
                                      self.audio.frame_shift)
    model_config = bundle.config.model
    own, strides = patch_of(model_config), strides_of(model_config)
    run_patch = tuple(model_config.get("run_patch", ())) or None
    self.patch = flexi_shape(bundle.config, patch_size) if patch_size else run_patch
    front = FrontEnd.from_config(self.audio)
    try:
      run_strides = scaled_strides(own, strides, self.patch) if self.patch else strides
      self.grid = patch_grid(self.audio.num_mel_bins, front.frames, self.patch or own, run_strides)
    except ValueError as error:
      raise ValueError(f"--patch_size={patch_size}: this model cannot run at {self.patch} patches ({error})") from None
    pool = front.time_pool_factor if front.time_pool != "none" else 1
    self.mel_stride = run_strides[0]
    self.seconds_per_time_index = run_strides[1] * pool * self.audio.frame_shift / 1000.0
    model = build_model(bundle.config)
    audio = self.audio.to_dict()
    params = jax.tree.map(jnp.asarray, bundle.params)
    patch_kwargs = {"patch": self.patch} if self.patch and self.patch != own else {}

    @jax.jit
    def forward(waveforms, num_samples):
      logits, intermediates = model.apply({"params": params}, model_input(waveforms, num_samples, audio),
                                          **patch_kwargs)
      return logits, intermediates["embedding"], patch_tokens(intermediates, bundle) if tokens else None

    self._forward, self.with_tokens = forward, tokens

  def windows(self, waveform: np.ndarray, window: int, hop: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(starts, clips `[windows, input_samples]` zero-padded, lengths `[windows]`)."""
    starts = window_starts(len(waveform), window, hop)
    clips = np.zeros((len(starts), self.input_samples), np.float32)
    lengths = np.zeros(len(starts), np.int32)
    for row, start in enumerate(starts):
      piece = waveform[start:start + min(window, self.input_samples)]
      clips[row, :len(piece)] = piece
      lengths[row] = len(piece)
    return starts, clips, lengths

  def __call__(self, clips: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """clips `[windows, input_samples]` -> (logits `[windows, classes]`, embeddings `[windows, width]`)."""
    return self.run(clips, lengths)[:2]

  def run(self, clips: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """clips `[windows, input_samples]` -> (logits `[windows, classes]`, embeddings `[windows, width]`, patch
    tokens `[windows, patches, width]` frequency-major over `self.grid`, or None)."""
    outputs = []
    for first in range(0, len(clips), self.batch_size):
      batch = np.zeros((self.batch_size, clips.shape[1]), np.float32)
      count = min(self.batch_size, len(clips) - first)
      batch[:count] = clips[first:first + count]
      batch_lengths = np.zeros(self.batch_size, np.int32)
      batch_lengths[:count] = lengths[first:first + count]
      outputs.append([None if out is None else np.asarray(out)[:count]
                      for out in self._forward(batch, batch_lengths)])
    return tuple(None if parts[0] is None else np.concatenate(parts) for parts in zip(*outputs))

  def default_window(self) -> int:
    return self.input_samples

  def predict(self, waveforms: Sequence[np.ndarray], window: int, hop: int) -> list[FilePrediction]:
    """Each waveform in windows of `window` samples (at most the model's input) every `hop` samples."""
    pieces = [self.windows(waveform, window, hop) for waveform in waveforms]
    if not pieces:
      return []
    logits, embeddings, tokens = self.run(np.concatenate([p[1] for p in pieces]),
                                          np.concatenate([p[2] for p in pieces]))
    freq, time = self.grid
    index = np.arange(freq * time)
    results, first = [], 0
    for starts, _, _ in pieces:
      count = len(starts)
      result = FilePrediction(starts, logits[first:first + count], embeddings[first:first + count])
      if tokens is not None:
        for window_index, start in enumerate(starts):
          result.tokens.append(tokens[first + window_index])
          result.freq_index.append(index // time)
          result.time_index.append(index % time)
          result.mel_bin.append(index // time * self.mel_stride)
          result.seconds.append(start / self.sample_rate + index % time * self.seconds_per_time_index)
      results.append(result)
      first += count
    return results


class _Windows:
  """The reader the evaluation batcher (`data/packed_batches.py:PackedBatches`) asks for clips: windows in memory."""

  skip_bad = False

  def __init__(self, waveforms: Sequence[np.ndarray]):
    self.waveforms = waveforms

  def decode(self, index: int) -> np.ndarray:
    return self.waveforms[index]


def longest_packed_clip(config: Any, model: Any, resolution: float) -> tuple[int, int]:
  """The longest clip a model trained on packed rows takes whole at resolution q: (time patches, the frames at the
  base frame shift its samples span). Its row bounds it, and its time table unless positions are fractional."""
  from ast_jax.audio.fbank import FbankOptions, num_frames
  from ast_jax.audio.patches import patch_of

  patch_freq, patch_time = patch_of(config.model)
  time_patches = config.packing.row_tokens // (config.audio.num_mel_bins // patch_freq)
  if getattr(model, "positions", "integer") == "integer":
    time_patches = min(time_patches, model.max_time_patches)
  base = FbankOptions(sample_rate=float(config.audio.sample_rate), frame_length=config.audio.frame_length,
                      frame_shift=config.audio.frame_shift)
  at_q = FbankOptions(sample_rate=base.sample_rate, frame_length=base.frame_length,
                      frame_shift=base.frame_shift * resolution)
  samples = at_q.window_size + at_q.window_shift * (time_patches * patch_time - 1)
  return time_patches, max(patch_time, num_frames(samples, base))


class PackedPredictor:
  """A model trained on packed rows made callable on waveforms: each window at its own length and at resolution
  q, packed with the others into the model's rows (the evaluation planner), through the evaluation step's front
  end and model."""

  packed = True

  def __init__(self, bundle: Any, *, resolution: float = 0.0, tokens: bool = False):
    import jax
    import jax.numpy as jnp

    from ast_jax.audio.patches import patch_of
    from ast_jax.data.inputs import packing_spec
    from ast_jax.models import build_model
    from ast_jax.train.steps import batch_input

    config = bundle.config
    self.bundle, self.sample_rate = bundle, int(config.audio.sample_rate)
    self.resolution = float(resolution or config.packing.resolutions[0])
    if self.resolution < 1.0:
      raise ValueError(f"--resolution={resolution}: a resolution is a frame-shift multiplier q >= 1")
    model = build_model(config)
    patch = patch_of(config.model)
    _, base_frames = longest_packed_clip(config, model, self.resolution)
    self.spec = packing_spec(config, train=False, length=base_frames, resolution=self.resolution)
    self.input_samples = self.spec.max_samples
    self.mel_stride, self.patch_time = patch[0], patch[1]
    self.seconds_per_time_index = patch[1] * self.spec.window_shift(self.resolution) / self.sample_rate
    audio, params = config.audio.to_dict(), jax.tree.map(jnp.asarray, bundle.params)

    @jax.jit
    def forward(batch):
      spectrogram, layout = batch_input(batch, audio, patch)
      logits, intermediates = model.apply({"params": params}, spectrogram, layout)
      return logits, intermediates["embedding"], patch_tokens(intermediates, bundle) if tokens else None

    self._forward, self.with_tokens = forward, tokens

  def default_window(self) -> int:
    return self.input_samples

  def run(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Windows (each at most `input_samples`) -> (logits `[windows, classes]`, embeddings `[windows, width]`,
    per window (tokens `[patches, width]`, frequency index, time index) when tokens were asked for)."""
    from ast_jax.data.packed_batches import PackedBatches, PackedPlans

    lengths = [len(window) for window in windows]
    plans = PackedPlans(lengths, None, self.spec)
    batches = PackedBatches(plans, _Windows(windows), [()] * len(windows), self.bundle.config.num_classes, seed=0)
    logits = np.zeros((len(windows), self.bundle.config.num_classes), np.float32)
    embeddings: list[Any] = [None] * len(windows)
    tokens: list[Any] = [None] * len(windows)
    for position in range(len(plans.epoch(0).batches)):
      batch = batches(position)
      batch_logits, batch_embeddings, batch_tokens = (None if out is None else np.asarray(out)
                                                      for out in self._forward(batch))
      for row, slot in zip(*np.nonzero(batch["clip_mask"])):
        window = int(batch["index"][row, slot])
        logits[window], embeddings[window] = batch_logits[row, slot], batch_embeddings[row, slot]
        if batch_tokens is not None:
          own = batch["segment_ids"][row] == slot + 1
          tokens[window] = (batch_tokens[row][own], batch["freq_positions"][row][own],
                            batch["time_positions"][row][own])
    return logits, np.stack(embeddings), tokens

  def predict(self, waveforms: Sequence[np.ndarray], window: int, hop: int) -> list[FilePrediction]:
    """Each waveform whole when it fits `window` samples (at most `input_samples`), else in windows every `hop`."""
    window = min(window, self.input_samples)
    starts = [window_starts(len(waveform), window, hop) for waveform in waveforms]
    pieces = [waveform[start:start + window] for waveform, file_starts in zip(waveforms, starts)
              for start in file_starts]
    if not pieces:
      return []
    logits, embeddings, tokens = self.run(pieces)
    results, first = [], 0
    for file_starts in starts:
      count = len(file_starts)
      result = FilePrediction(file_starts, logits[first:first + count], embeddings[first:first + count])
      if self.with_tokens:
        for index, start in enumerate(file_starts):
          features, freq, time = tokens[first + index]
          result.tokens.append(features)
          result.freq_index.append(freq)
          result.time_index.append(time)
          result.mel_bin.append(freq * self.mel_stride)
          result.seconds.append(start / self.sample_rate + time * self.seconds_per_time_index)
      results.append(result)
      first += count
    return results


def token_table(paths: Sequence[str], predictions: Sequence[FilePrediction | None]) -> dict[str, np.ndarray]:
  """Every file's patch tokens as flat arrays for one .npz: `features [tokens, width]` and, per token, `file_index`
  (index into `paths`), `window`, `freq_index`, `time_index`, `mel_bin` (first mel bin) and `seconds` (first
  frame's time in the file). Files that could not be read have no tokens."""
  columns: dict[str, list[np.ndarray]] = {name: [] for name in ("features", "file_index", "window", "freq_index",
                                                                  "time_index", "mel_bin", "seconds")}
  for file_index, prediction in enumerate(predictions):
    if prediction is None:
      continue
    for window, features in enumerate(prediction.tokens):
      count = len(features)
      columns["features"].append(np.asarray(features, np.float32))
      columns["file_index"].append(np.full(count, file_index, np.int32))
      columns["window"].append(np.full(count, window, np.int32))
      for name in ("freq_index", "time_index", "mel_bin"):
        columns[name].append(np.asarray(getattr(prediction, name)[window], np.int32))
      columns["seconds"].append(np.asarray(prediction.seconds[window], np.float32))
  table = {name: np.concatenate(parts) if parts else np.zeros((0,), np.float32) for name, parts in columns.items()}
  table["paths"] = np.asarray(list(paths))
  return table
