"""Kaldi-compatible log-mel filterbank in jax.numpy, per clip and batched.

Mirrors `torchaudio.compliance.kaldi.fbank` (option names, defaults and numerics), so code written against it
ports by changing the import. Per frame, in Kaldi's order: [dither] -> remove DC offset -> [raw energy] ->
pre-emphasis (x[n] - c * x[n-1], x[-1] = x[0]) -> window -> zero-pad to the FFT size -> |rfft|^2 -> mel matmul
-> log(max(., eps)). Everything shape-dependent is static, so both entry points are jit-able with the options
held static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax import target

WINDOW_TYPES = ("hanning", "hamming", "povey", "rectangular", "blackman")
# Most frame-gather slices worth unrolling; beyond it one index gather is cheaper to compile and run.
_MAX_FRAME_SLICES = 8


@dataclasses.dataclass(frozen=True)
class FbankOptions:
  """The options of `torchaudio.compliance.kaldi.fbank`, validated and hashable (a static jit argument)."""

  sample_rate: float = 16000.0
  frame_length: float = 25.0  # ms
  frame_shift: float = 10.0  # ms
  num_mel_bins: int = 23
  low_freq: float = 20.0
  high_freq: float = 0.0  # <= 0: offset from Nyquist
  window_type: str = "povey"
  blackman_coeff: float = 0.42
  preemphasis_coefficient: float = 0.97
  remove_dc_offset: bool = True
  snip_edges: bool = True
  dither: float = 0.0
  htk_compat: bool = False
  use_energy: bool = False
  raw_energy: bool = True
  energy_floor: float = 1.0
  use_log_fbank: bool = True
  use_power: bool = True
  round_to_power_of_two: bool = True
  subtract_mean: bool = False
  min_duration: float = 0.0  # s; shorter clips give no frames
  vtln_warp: float = 1.0
  vtln_low: float = 100.0
  vtln_high: float = -500.0

  @classmethod
  def create(cls, sample_rate: float = 16000.0, **options: Any) -> FbankOptions:
    """Builds options from torchaudio-style keywords (`sample_frequency` is accepted for `sample_rate`)."""
    if "sample_frequency" in options:
      sample_rate = options.pop("sample_frequency")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(types))
    if unknown:
      raise TypeError(f"unknown fbank option(s) {unknown}")
    # Canonical Python types keep equal option sets hashing equal (128 vs 128.0, np.float32 vs float).
    cast = {"int": int, "float": float, "str": str, "bool": bool}
    return cls(sample_rate=float(sample_rate), **{k: cast[types[k]](v) for k, v in options.items()})

  def __post_init__(self):
    if self.window_type not in WINDOW_TYPES:
      raise ValueError(f"window_type {self.window_type!r} is not one of {WINDOW_TYPES}")
    if self.vtln_warp != 1.0:
      raise ValueError(f"vtln_warp={self.vtln_warp}: only 1.0 (no VTLN) is supported")
    if self.window_size < 2 or self.window_shift < 1:
      raise ValueError(f"frame_length {self.frame_length} ms / frame_shift {self.frame_shift} ms give "
                       f"{self.window_size} / {self.window_shift} samples at {self.sample_rate} Hz")
    if self.padded_window_size % 2:
      raise ValueError(f"the FFT size {self.padded_window_size} must be even (round_to_power_of_two=False)")
    if not 0.0 <= self.preemphasis_coefficient <= 1.0:
      raise ValueError(f"preemphasis_coefficient {self.preemphasis_coefficient} is not in [0, 1]")
    if self.num_mel_bins <= 3:
      raise ValueError(f"num_mel_bins={self.num_mel_bins}: must be at least 4")
    if self.dither < 0.0 or self.energy_floor < 0.0:
      raise ValueError("dither and energy_floor must be >= 0")
    nyquist = 0.5 * self.sample_rate
    high = self.high_freq + nyquist if self.high_freq <= 0.0 else self.high_freq
    if not (0.0 <= self.low_freq < nyquist and 0.0 < high <= nyquist and self.low_freq < high):
      raise ValueError(f"bad mel range low_freq={self.low_freq}, high_freq={self.high_freq} "
                       f"(resolved to {high}) for Nyquist {nyquist} Hz")

  # Sample counts use torchaudio's exact float expression, so non-integer shifts (13.3 ms) round the same way.
  @property
  def window_size(self) -> int:
    return int(self.sample_rate * self.frame_length * 0.001)

  @property
  def window_shift(self) -> int:
    return int(self.sample_rate * self.frame_shift * 0.001)

  @property
  def padded_window_size(self) -> int:
    if not self.round_to_power_of_two:
      return self.window_size
    return 1 << (self.window_size - 1).bit_length()

  @property
  def num_features(self) -> int:
    return self.num_mel_bins + int(self.use_energy)


def num_frames(num_samples, options: FbankOptions):
  """Frames Kaldi makes from `num_samples` samples (a Python int or an integer array)."""
  size, shift = options.window_size, options.window_shift
  if options.snip_edges:
    if isinstance(num_samples, int):
      return 1 + (num_samples - size) // shift if num_samples >= size else 0
    return jnp.where(num_samples >= size, 1 + (num_samples - size) // shift, 0)
  return (num_samples + shift // 2) // shift


@functools.lru_cache(maxsize=64)
def feature_window(options: FbankOptions) -> np.ndarray:
  """The analysis window `[window_size]` (float64), as torchaudio's `_feature_window_function`."""
  size = options.window_size
  n = np.arange(size, dtype=np.float64)
  a = 2.0 * math.pi / (size - 1)
  hann = 0.5 - 0.5 * np.cos(a * n)  # symmetric (periodic=False)
  if options.window_type == "hanning":
    return hann
  if options.window_type == "hamming":
    return 0.54 - 0.46 * np.cos(a * n)
  if options.window_type == "povey":
    return hann**0.85
  if options.window_type == "rectangular":
    return np.ones(size)
  c = options.blackman_coeff
  return c - 0.5 * np.cos(a * n) + (0.5 - c) * np.cos(2.0 * a * n)


def _kaldi_mel(freq):
  return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=64)
def mel_banks(options: FbankOptions) -> np.ndarray:
  """Triangular Kaldi mel filters `[padded_window_size // 2 + 1, num_mel_bins]` (float64), triangles in mel space.

  The Nyquist bin gets zero weight, as torchaudio pads its `[num_mel_bins, n_fft / 2]` banks with one zero column.
  """
  nyquist = 0.5 * options.sample_rate
  high_freq = options.high_freq + nyquist if options.high_freq <= 0.0 else options.high_freq
  mel_low, mel_high = _kaldi_mel(options.low_freq), _kaldi_mel(high_freq)
  delta = (mel_high - mel_low) / (options.num_mel_bins + 1)
  bins = np.arange(options.num_mel_bins, dtype=np.float64)[:, None]
  left, center, right = (mel_low + (bins + k) * delta for k in (0.0, 1.0, 2.0))
  fft_bin_width = options.sample_rate / options.padded_window_size
  mel = _kaldi_mel(fft_bin_width * np.arange(options.padded_window_size // 2))[None, :]
  weights = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
  return np.concatenate([weights, np.zeros((options.num_mel_bins, 1))], axis=1).T


def _reflect_pad(waveforms: jax.Array, options: FbankOptions, frames: int) -> jax.Array:
  """Kaldi's snip_edges=False edges: mirrored (edge sample repeated), frame i centred on i * shift + shift / 2."""
  size, shift = options.window_size, options.window_shift
  pad = size // 2 - shift // 2
  needed_right = (frames - 1) * shift + size - pad - waveforms.shape[-1]
  right = jnp.flip(waveforms, -1)[..., :max(needed_right, 0)]
  if pad > 0:
    left = jnp.flip(waveforms[..., :pad], -1)
    return jnp.concatenate([left, waveforms, right], axis=-1)
  return jnp.concatenate([waveforms[..., -pad:], right], axis=-1)


def extract_frames(waveforms: jax.Array, options: FbankOptions) -> jax.Array:
  """Splits `[..., samples]` into overlapping frames `[..., frames, window_size]` with static slices.

  Samples are grouped in chunks of gcd(window, shift), so each frame is a concatenation of whole chunks and
  the frames are `window / gcd` strided slices of the chunk array (5 for 25 ms / 10 ms): no index gather.
  """
  size, shift = options.window_size, options.window_shift
  count = num_frames(waveforms.shape[-1], options)
  if not options.snip_edges:
    waveforms = _reflect_pad(waveforms, options, count)
  used = (count - 1) * shift + size
  chunk = math.gcd(size, shift)
  if size // chunk > _MAX_FRAME_SLICES:
    index = np.arange(count)[:, None] * shift + np.arange(size)[None, :]
    return waveforms[..., index]
  chunks = waveforms[..., :used].reshape(waveforms.shape[:-1] + (used // chunk, chunk))
  step = shift // chunk
  parts = [chunks[..., j:j + (count - 1) * step + 1:step, :] for j in range(size // chunk)]
  return jnp.concatenate(parts, axis=-1)


def _log_energy(frames: jax.Array, options: FbankOptions, eps: float) -> jax.Array:
  log_energy = jnp.log(jnp.maximum(jnp.sum(frames * frames, axis=-1), eps))
  if options.energy_floor == 0.0:
    return log_energy
  return jnp.maximum(log_energy, math.log(options.energy_floor))


def frames_to_fbank(frames: jax.Array, options: FbankOptions, rng: jax.Array | None = None) -> jax.Array:
  """Kaldi's per-frame pipeline: `[..., frames, window_size]` -> `[..., frames, num_features]`."""
  dtype = frames.dtype
  eps = float(jnp.finfo(dtype).eps)
  if options.dither > 0.0:
    frames = frames + options.dither * jax.random.normal(rng, frames.shape, dtype)
  if options.remove_dc_offset:
    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
  if options.use_energy and options.raw_energy:
    energy = _log_energy(frames, options, eps)
  if options.preemphasis_coefficient != 0.0:
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = frames - options.preemphasis_coefficient * previous
  frames = frames * jnp.asarray(feature_window(options), dtype)
  if options.use_energy and not options.raw_energy:
    energy = _log_energy(frames, options, eps)
  spectrum = jnp.fft.rfft(frames, n=options.padded_window_size, axis=-1)
  power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
  spectrum = power if options.use_power else jnp.sqrt(power)
  # HIGHEST: accelerators would otherwise run this float32 matmul in bf16/tf32 passes.
  mel = jnp.matmul(spectrum, jnp.asarray(mel_banks(options), dtype), precision=jax.lax.Precision.HIGHEST)
  if options.use_log_fbank:
    mel = jnp.log(jnp.maximum(mel, eps))
  if options.use_energy:
    columns = [mel, energy[..., None]] if options.htk_compat else [energy[..., None], mel]
    mel = jnp.concatenate(columns, axis=-1)
  return mel


def _float_dtype(waveform) -> jnp.dtype:
  dtype = jnp.result_type(waveform)
  return dtype if dtype in (jnp.float32, jnp.float64) else jnp.dtype(jnp.float32)


def _check_finite(waveforms) -> None:
  """Rejects NaN/inf in host (NumPy) input; device arrays and tracers are not synced for it."""
  if isinstance(waveforms, np.ndarray) and not np.all(np.isfinite(waveforms)):
    raise ValueError("waveform contains NaN or infinite samples")


def _check_dither(options: FbankOptions, rng) -> None:
  if options.dither > 0.0 and rng is None:
    raise ValueError(f"dither={options.dither} needs a PRNG key: pass rng=jax.random.key(...)")


@functools.partial(jax.jit, static_argnames=("options",))
def _fbank_clip(waveform: jax.Array, rng: jax.Array | None, options: FbankOptions) -> jax.Array:
  fbank = frames_to_fbank(extract_frames(waveform, options), options, rng)
  if options.subtract_mean:
    fbank = fbank - jnp.mean(fbank, axis=0, keepdims=True)
  return fbank


def kaldi_fbank(waveform, sample_rate: float = 16000, *, rng: jax.Array | None = None, **options: Any) -> jax.Array:
  """Kaldi log-mel filterbank of one clip: `[samples]` -> `[frames, num_mel_bins (+1 with use_energy)]`.

  Options are those of `torchaudio.compliance.kaldi.fbank` with its defaults (`num_mel_bins=23`,
  `window_type='povey'`, ...); `dither > 0` draws from `rng`. Computed in float32 (float64 for float64 input
  with x64 enabled); the log floor is that dtype's epsilon. Jit-able with the options static.
  """
  opts = FbankOptions.create(sample_rate, **options)
  _check_finite(waveform)
  waveform = jnp.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f"kaldi_fbank expects a 1-D waveform [samples], got shape {waveform.shape}; "
                     "pick one channel (waveform[0]) or use fbank_batch for [batch, samples]")
  if waveform.shape[0] < opts.window_size:
    raise ValueError(f"waveform has {waveform.shape[0]} samples, fewer than one {opts.frame_length} ms frame "
                     f"({opts.window_size} samples at {opts.sample_rate:g} Hz)")
  _check_dither(opts, rng)
  if waveform.shape[0] < opts.min_duration * opts.sample_rate:
    return jnp.zeros((0, opts.num_features), _float_dtype(waveform))
  return _fbank_clip(waveform.astype(_float_dtype(waveform)), rng, opts)


def batch_features(waveforms: jax.Array, num_samples: jax.Array, options: FbankOptions,
                   rng: jax.Array | None = None, *, per_clip: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """The traceable core of `fbank_batch` (no input checks): `[batch, samples]`, `[batch]` -> fbank, num_frames.

  `per_clip` loops over clips inside the program (`lax.map`) instead of vectorising over the batch; None
  picks it on CPU, where one clip's frames and spectra stay in cache (about 3x faster there).
  """
  if per_clip is None:
    per_clip = target.platform() == "cpu"
  if per_clip:
    keys = jax.random.split(rng, waveforms.shape[0]) if rng is not None else None
    fbank = jax.lax.map(lambda clip: frames_to_fbank(extract_frames(clip[0], options), options, clip[1]),
                        (waveforms, keys))
  else:
    fbank = frames_to_fbank(extract_frames(waveforms, options), options, rng)
  counts = num_frames(num_samples, options).astype(jnp.int32)
  if options.min_duration > 0.0:
    counts = jnp.where(num_samples < options.min_duration * options.sample_rate, 0, counts)
  if options.subtract_mean:  # mean over each clip's own frames only
    valid = (jnp.arange(fbank.shape[1])[None, :] < counts[:, None])[..., None]
    mean = jnp.sum(jnp.where(valid, fbank, 0.0), axis=1, keepdims=True) / jnp.maximum(counts, 1)[:, None, None]
    fbank = fbank - mean
  return fbank, counts


def batch_features_at(waveforms: jax.Array, num_samples: jax.Array, window_shifts: jax.Array,
                      options: FbankOptions, frames: int, rng: jax.Array | None = None, *,
                      per_clip: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """`batch_features` with each clip's own frame shift: `window_shifts[i]` samples (traced, so one compiled
  program serves every shift) -> fbank `[batch, frames, features]`, num_frames `[batch]` (at most `frames`).

  Clip i's frames equal `kaldi_fbank` of that clip with `frame_shift` = its shift (snip_edges only); frames are
  gathered by index, as a shift that is not a static number cannot be cut into strided slices.
  """
  if not options.snip_edges:
    raise ValueError("per-clip frame shifts need snip_edges=True")
  if per_clip is None:
    per_clip = target.platform() == "cpu"
  samples, size = waveforms.shape[-1], options.window_size
  window_shifts = jnp.asarray(window_shifts, jnp.int32)
  offsets = jnp.arange(size, dtype=jnp.int32)[None, :]

  def clip_frames(waveform: jax.Array, shift: jax.Array) -> jax.Array:
    index = jnp.arange(frames, dtype=jnp.int32)[:, None] * shift + offsets
    return jnp.take(waveform, jnp.minimum(index, samples - 1))  # frames past the clip are masked by the caller

  if per_clip:
    keys = jax.random.split(rng, waveforms.shape[0]) if rng is not None else None
    fbank = jax.lax.map(lambda clip: frames_to_fbank(clip_frames(clip[0], clip[1]), options, clip[2]),
                        (waveforms, window_shifts, keys))
  else:
    fbank = frames_to_fbank(jax.vmap(clip_frames)(waveforms, window_shifts), options, rng)
  num_samples = jnp.asarray(num_samples, jnp.int32)
  counts = jnp.where(num_samples >= size, 1 + (num_samples - size) // jnp.maximum(window_shifts, 1), 0)
  return fbank, jnp.minimum(counts, frames).astype(jnp.int32)


_fbank_batch = jax.jit(batch_features, static_argnames=("options", "per_clip"))


def fbank_batch(
    waveforms,
    num_samples=None,
    sample_rate: float = 16000,
    *,
    rng: jax.Array | None = None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
  """Filterbanks of a padded batch: `[batch, samples]`, `[batch]` -> `([batch, frames, features], [batch] int32)`.

  `frames` follows from the padded sample count; `num_frames[i]` from clip i's own `num_samples[i]` (None: all
  samples). Frames lying fully inside a clip equal `kaldi_fbank` of that clip; later frames (and, with
  snip_edges=False, the last frames whose mirror padding differs) are not meaningful and are left for the
  caller to mask. With `dither > 0`, noise comes from `rng` and is independent per frame, as Kaldi's.
  """
  opts = FbankOptions.create(sample_rate, **options)
  _check_finite(waveforms)
  waveforms = jnp.asarray(waveforms)
  if waveforms.ndim != 2:
    raise ValueError(f"fbank_batch expects waveforms [batch, samples], got shape {waveforms.shape}")
  if waveforms.shape[1] < opts.window_size:
    raise ValueError(f"padded waveforms have {waveforms.shape[1]} samples, fewer than one frame "
                     f"({opts.window_size} samples)")
  _check_dither(opts, rng)
  if num_samples is None:
    num_samples = jnp.full((waveforms.shape[0],), waveforms.shape[1], jnp.int32)
  num_samples = jnp.asarray(num_samples, jnp.int32)
  return _fbank_batch(waveforms.astype(_float_dtype(waveforms)), num_samples, opts, rng)
