"""The model input: waveforms -> normalised, fixed-length log-mel spectrograms, inside the jitted step.

Upstream order (AST data loader): Kaldi fbank -> pad with zeros at the end / cut to `target_length` frames ->
[training: one frequency mask, one time mask] -> (x - mean) / (2 * std) -> [training, Speech Commands:
noise, then a time roll]. Padding comes before normalisation, so padded frames read (0 - mean) / (2 * std).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ast_jax.audio import augment as augment_lib
from ast_jax.audio.fbank import FbankOptions, batch_features, batch_features_at


def _field(config: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
  """Reads `name` from a dict or an ml_collections ConfigDict (which is not a `Mapping`)."""
  try:
    return config[name]
  except (KeyError, AttributeError):
    if default is dataclasses.MISSING:
      raise KeyError(f"audio front-end config lacks the field {name!r}") from None
    return default


TIME_POOLS = ("none", "avg", "max")


def pool_time(fbank: jax.Array, kind: str, factor: int) -> jax.Array:
  """`[batch, frames, mel_bins]` -> `[batch, frames // factor, mel_bins]`: average or max over non-overlapping
  windows of `factor` frames (kernel = stride = factor); frames past the last whole window are dropped."""
  if kind == "none" or factor == 1:
    return fbank
  batch, frames, mel_bins = fbank.shape
  if frames < factor:
    raise ValueError(f"{frames} frames are fewer than one pooling window of {factor}")
  windows = fbank[:, :frames // factor * factor].reshape(batch, frames // factor, factor, mel_bins)
  return jnp.mean(windows, axis=2) if kind == "avg" else jnp.max(windows, axis=2)


@dataclasses.dataclass(frozen=True)
class FrontEnd:
  """The `config.audio` fields that shape the model input, hashable so jit can hold them static."""

  sample_rate: int
  num_mel_bins: int
  frame_length: float  # ms
  frame_shift: float  # ms
  window_type: str
  low_freq: float
  high_freq: float
  preemphasis_coefficient: float
  remove_dc_offset: bool
  dither: float
  target_length: int  # frames
  mean: float
  std: float
  # Temporal compression (multi-phase training, docs/BACKGROUND.md section 4): 'avg' or 'max' pooling along time with
  # kernel = stride = time_pool_factor after normalisation; the model sees target_length // factor frames.
  time_pool: str = "none"
  time_pool_factor: int = 1

  @classmethod
  def from_config(cls, audio: Mapping[str, Any] | FrontEnd) -> FrontEnd:
    if isinstance(audio, FrontEnd):
      return audio
    cast = {"int": int, "float": float, "str": str, "bool": bool}
    values = {}
    for field in dataclasses.fields(cls):
      has_default = field.default is not dataclasses.MISSING  # fields added later: optional in older configs
      values[field.name] = cast[field.type](_field(audio, field.name, field.default if has_default
                                                   else dataclasses.MISSING))
    front = cls(**values)
    if front.time_pool not in TIME_POOLS or front.time_pool_factor < 1:
      raise ValueError(f"audio.time_pool={front.time_pool!r} / time_pool_factor={front.time_pool_factor!r}: the pool "
                       f"is one of {TIME_POOLS} and the factor a positive int")
    return front

  @property
  def frames(self) -> int:
    """The frames the model sees: `target_length`, divided by the pooling factor when pooling along time."""
    return self.target_length // self.time_pool_factor if self.time_pool != "none" else self.target_length

  def fbank_options(self) -> FbankOptions:
    """The upstream AST call: torchaudio kaldi.fbank with htk_compat=True, use_energy=False."""
    return FbankOptions.create(
        self.sample_rate, frame_length=self.frame_length, frame_shift=self.frame_shift,
        num_mel_bins=self.num_mel_bins, window_type=self.window_type, low_freq=self.low_freq,
        high_freq=self.high_freq, preemphasis_coefficient=self.preemphasis_coefficient,
        remove_dc_offset=self.remove_dc_offset, dither=self.dither, htk_compat=True, use_energy=False)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """The spectrogram part of `config.augment` (mixup acts on waveforms, elsewhere)."""

  freq_mask: int = 0  # max width, mel bins
  time_mask: int = 0  # max width, frames
  noise: bool = False
  roll: int = 0  # max |time shift|, frames (upstream Speech Commands: 10, after the noise)

  @classmethod
  def from_config(cls, augment: Mapping[str, Any] | AugmentSpec) -> AugmentSpec:
    if isinstance(augment, AugmentSpec):
      return augment
    return cls(freq_mask=int(_field(augment, "freq_mask", 0)), time_mask=int(_field(augment, "time_mask", 0)),
               noise=bool(_field(augment, "noise", False)), roll=int(_field(augment, "roll", 0)))

  @property
  def active(self) -> bool:
    return self.freq_mask > 0 or self.time_mask > 0 or self.noise or self.roll > 0


def clip_samples(target_length: int, sample_rate: int = 16000, frame_length: float = 25.0,
                 frame_shift: float = 10.0) -> int:
  """Samples that give exactly `target_length` frames with snip_edges: frame_len + shift * (target_length - 1)."""
  options = FbankOptions(sample_rate=float(sample_rate), frame_length=frame_length, frame_shift=frame_shift)
  return options.window_size + options.window_shift * (target_length - 1)


def pad_or_cut(fbank: jax.Array, num_frames: jax.Array, target_length: int) -> jax.Array:
  """Zeroes frames at or beyond each clip's `num_frames`, then pads with zeros / cuts to `target_length`.

  `[batch, frames, mel_bins]` -> `[batch, target_length, mel_bins]`; matches per-clip fbank + ZeroPad2d upstream.
  """
  frames = fbank.shape[1]
  valid = jnp.arange(frames)[None, :] < num_frames[:, None]
  fbank = jnp.where(valid[:, :, None], fbank, 0.0)
  if frames >= target_length:
    return fbank[:, :target_length]
  return jnp.pad(fbank, ((0, 0), (0, target_length - frames), (0, 0)))


@functools.partial(jax.jit, static_argnames=("front", "spec", "frames"))
def _model_input(waveforms, num_samples, window_shifts, time_scale, rng, front: FrontEnd, spec: AugmentSpec | None,
                 frames: int):
  keys = jax.random.split(rng, 3) if rng is not None else (None, None, None)
  if window_shifts is None:
    fbank, num_frames = batch_features(waveforms, num_samples, front.fbank_options(), keys[0])
  else:
    fbank, num_frames = batch_features_at(waveforms, num_samples, window_shifts, front.fbank_options(), frames, keys[0])
  fbank = pad_or_cut(fbank, num_frames, frames)
  if spec is not None and (spec.freq_mask > 0 or spec.time_mask > 0):
    fbank = augment_lib.frequency_time_mask(keys[1], fbank, spec.freq_mask, spec.time_mask, time_scale)
  fbank = (fbank - front.mean) / (2.0 * front.std)
  if spec is not None and (spec.noise or spec.roll > 0):
    # Clips framed at their own shift take no roll, and their noise key is the third key itself.
    noise_key, roll_key = jax.random.split(keys[2]) if window_shifts is None else (keys[2], None)
    fbank = augment_lib.add_noise(noise_key, fbank) if spec.noise else fbank
    fbank = augment_lib.roll_time(roll_key, fbank, spec.roll) if spec.roll > 0 else fbank
  return pool_time(fbank, front.time_pool, front.time_pool_factor)


def model_input(
    waveforms,
    num_samples,
    audio: Mapping[str, Any] | FrontEnd,
    *,
    window_shifts=None,
    frames: int | None = None,
    time_scale=None,
    augment: Mapping[str, Any] | AugmentSpec | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
  """The front end, the one entry for every input: waveforms `[n, samples]` -> float32 `[n, frames, mel_bins]`;
  clip i ends at `num_samples[i]`, and frames past its end are zero before normalisation (upstream's pad).

  - Fixed-length clips (`window_shifts` None): `frames` is `audio.target_length` (clips padded or cut to it), or
    `target_length // time_pool_factor` with `audio.time_pool` ('avg' or 'max': pooled along time after
    everything else, the coarse input of multi-phase training).
  - Clips of any length and resolution (packed rows): clip i is framed at its own `window_shifts[i]` samples into
    `frames` frames; `time_scale[i]` scales its time-mask width (1/q). No time roll: it would move a clip across
    the end of its own frames.

  `audio` is `config.audio` and `augment` is `config.augment` (both read once into hashable form; callable
  inside jit). Augmentation runs only when both `augment` and `rng` are given (training); `rng` also feeds
  dither when `audio.dither > 0`. Waveforms are expected mean-removed per clip by the data pipeline
  (`remove_mean`), as upstream; with `remove_dc_offset` the per-frame DC removal makes that immaterial anyway.
  """
  front = FrontEnd.from_config(audio)
  spec = AugmentSpec.from_config(augment) if augment is not None and rng is not None else None
  spec = spec if spec is not None and spec.active else None
  options = front.fbank_options()
  if options.dither > 0.0 and rng is None:
    raise ValueError(f"audio.dither={options.dither} needs a PRNG key: pass rng")
  waveforms = jnp.asarray(waveforms, jnp.float32)
  if waveforms.ndim != 2:
    raise ValueError(f"model_input expects waveforms [n, samples], got shape {waveforms.shape}")
  batch, samples = waveforms.shape
  num_samples = (jnp.full((batch,), samples, jnp.int32) if num_samples is None
                 else jnp.asarray(num_samples, jnp.int32))
  if window_shifts is None:
    frames = front.target_length
    # Frame t reads samples [t * shift, t * shift + frame_len) only, so later samples cannot reach the output.
    needed = clip_samples(front.target_length, front.sample_rate, front.frame_length, front.frame_shift)
    if samples > needed:
      waveforms, num_samples = waveforms[:, :needed], jnp.minimum(num_samples, needed)
  else:
    if spec is not None and spec.roll > 0:
      raise ValueError("augment.roll is not supported for clips of native length (packed input); set it to 0")
    if front.time_pool != "none":
      raise ValueError("audio.time_pool applies to fixed-length clips, not clips framed at their own shift")
    if frames is None:
      raise ValueError("clips framed at their own shift need the number of frames to produce: pass frames")
    window_shifts = jnp.asarray(window_shifts, jnp.int32)
    time_scale = jnp.ones((batch,), jnp.float32) if time_scale is None else jnp.asarray(time_scale, jnp.float32)
  if waveforms.shape[1] < options.window_size:  # too short for one frame: every clip gets 0 frames, all padding
    waveforms = jnp.pad(waveforms, ((0, 0), (0, options.window_size - waveforms.shape[1])))
  return _model_input(waveforms, num_samples, window_shifts, time_scale, rng, front, spec, int(frames))
