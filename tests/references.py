"""Reference implementations the tests compare the models against (plain functions, no Linen)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ast_jax.audio.patches import as_patch, patch_grid
from ast_jax.models.flexi import resize_patch_kernel


def flexi_patch_embed(spectrogram: jax.Array, kernel: jax.Array, bias: jax.Array,
                      patch: int | tuple[int, int]) -> jax.Array:
  """spectrogram `[batch, frames, mel_bins]` -> tokens `[batch, freq * time, width]`, frequency-major.

  `kernel` `[kh, kw, 1, width]` is PI-resized to `patch` (frequency, time; static under jit) and applied as a VALID
  conv with stride = patch; frames and mel bins beyond whole patches are dropped. Computed in the promoted dtype of
  the spectrogram and kernel.
  """
  patch_h, patch_w = as_patch(patch)
  batch, frames, mel_bins = spectrogram.shape
  freq, time = patch_grid(mel_bins, frames, (patch_h, patch_w))
  dtype = jnp.promote_types(spectrogram.dtype, kernel.dtype)
  image = jnp.swapaxes(spectrogram, 1, 2)[..., None].astype(dtype)
  weights = jnp.asarray(resize_patch_kernel(kernel, (patch_h, patch_w))).astype(dtype)
  patches = jax.lax.conv_general_dilated(image, weights, window_strides=(patch_h, patch_w), padding="VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = patches + jnp.asarray(bias).astype(dtype)
  return patches.reshape(batch, freq * time, weights.shape[-1])
