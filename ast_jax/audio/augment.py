"""Spectrogram augmentations of the AST recipes, as pure functions on `[batch, frames, mel_bins]`.

Each example draws its own random numbers, as upstream draws them per clip in the data loader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _band(rng: jax.Array, batch: int, size: int, max_width: int | jax.Array) -> jax.Array:
  """torchaudio `mask_along_axis` bands as a `[batch, size]` bool mask, one band per example.

  width = floor(U * max_width), start = floor(U' * (size - U * max_width)): the start uses the unrounded width.
  """
  width_key, start_key = jax.random.split(rng)
  value = jax.random.uniform(width_key, (batch,)) * max_width
  start = jnp.floor(jax.random.uniform(start_key, (batch,)) * (size - value)).astype(jnp.int32)
  end = start + jnp.floor(value).astype(jnp.int32)
  position = jnp.arange(size, dtype=jnp.int32)[None, :]
  return (position >= start[:, None]) & (position < end[:, None])


def frequency_time_mask(rng: jax.Array, fbank: jax.Array, freq_mask: int, time_mask: int,
                        time_scale: jax.Array | None = None) -> jax.Array:
  """SpecAugment as upstream AST: one frequency band and one time range set to 0 per example.

  `fbank` is `[batch, frames, mel_bins]` before normalisation (so masked cells read as log-mel 0). Band widths
  are uniform in [0, max_width) as torchaudio's FrequencyMasking / TimeMasking (iid per example); a max width
  of 0 leaves that axis untouched. `time_scale` `[batch]` scales each example's time-mask width (ElasticAST: 1/q
  for a clip framed at q times the frame shift, so the mask covers the same stretch of audio).
  """
  batch, frames, mel_bins = fbank.shape
  freq_key, time_key = jax.random.split(rng)
  if freq_mask > 0:
    fbank = jnp.where(_band(freq_key, batch, mel_bins, freq_mask)[:, None, :], 0.0, fbank)
  if time_mask > 0:
    width = time_mask if time_scale is None else time_mask * jnp.asarray(time_scale, jnp.float32)
    fbank = jnp.where(_band(time_key, batch, frames, width)[:, :, None], 0.0, fbank)
  return fbank


def add_noise(rng: jax.Array, fbank: jax.Array) -> jax.Array:
  """Upstream Speech Commands noise on the normalised `[batch, frames, mel_bins]`: x + U(0,1)[frames, mel] * U(0,1) / 10."""
  noise_key, scale_key = jax.random.split(rng)
  noise = jax.random.uniform(noise_key, fbank.shape, fbank.dtype)
  scale = jax.random.uniform(scale_key, (fbank.shape[0], 1, 1), fbank.dtype)
  return fbank + noise * scale / 10.0


def roll_time(rng: jax.Array, fbank: jax.Array, max_shift: int) -> jax.Array:
  """Circular shift along time by an integer in [-max_shift, max_shift) per example (`np.random.randint(-10, 10)`
  upstream); `max_shift=0` returns `fbank` unchanged."""
  if max_shift <= 0:
    return fbank
  batch, frames, _ = fbank.shape
  shift = jax.random.randint(rng, (batch,), -max_shift, max_shift)
  # Output frame t reads input frame (t - shift) mod frames, as torch.roll.
  source = (jnp.arange(frames)[None, :] - shift[:, None]) % frames
  return jnp.take_along_axis(fbank, source[:, :, None], axis=1)


def add_noise_and_roll(rng: jax.Array, fbank: jax.Array, max_shift: int = 10) -> jax.Array:
  """Upstream Speech Commands augmentation: `add_noise`, then `roll_time`."""
  noise_key, shift_key = jax.random.split(rng)
  return roll_time(shift_key, add_noise(noise_key, fbank), max_shift)
