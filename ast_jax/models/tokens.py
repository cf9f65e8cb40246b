"""The tokeniser every backbone shares: spectrograms -> patches -> tokens with their clip and grid positions.

Two layouts of one contract (`ast_jax/data/batch.py`):
- **whole-clip rows** (the fast path: AST, AuM, any fixed-length batch): `spectrogram [rows, frames, mel_bins]`,
  one clip per row, no layout. Patches come from a conv over the image (overlapping when the strides are smaller
  than the patch); no mask is built.
- **packed rows** (ElasticAST): `spectrogram [rows, clips, frames, mel_bins]`, one slot per clip, plus a
  `TokenLayout` from the packer: which clip each token belongs to (`segment_ids`, 0 = padding) and where in that
  clip's patch grid it sits (`freq_positions`, `time_positions`). Non-overlapping patches of every slot are
  gathered into the rows on the device. A whole-clip batch has a layout too (`TokenLayout.whole_clips`): one
  segment per row, the grid in frequency-major order.

Tokens are frequency-major everywhere: token index = freq_index * time_patches + time_index.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ast_jax.audio.patches import Patch, as_patch, patch_grid, scaled_strides
from ast_jax.models.flexi import resize_patch_kernel
from ast_jax.models.vit import Dtype, with_names

LAYOUT_KEYS = ("segment_ids", "freq_positions", "time_positions", "time_patches")


@flax.struct.dataclass
class TokenLayout:
  """Where each token of a packed row comes from. `segment_ids`, `freq_positions`, `time_positions`
  `[rows, row_tokens]` int32 (segment k = the row's clip slot k - 1; 0 = padding); `time_patches` `[rows, clips]`:
  each clip's time extent in patches (fractional positions span it)."""

  segment_ids: jax.Array
  freq_positions: jax.Array
  time_positions: jax.Array
  time_patches: jax.Array

  @classmethod
  def from_batch(cls, batch: Mapping[str, Any]) -> TokenLayout | None:
    """The layout of a packed batch; None for whole-clip rows (the batch has no `segment_ids`)."""
    if "segment_ids" not in batch:
      return None
    return cls(*(batch[key] for key in LAYOUT_KEYS))

  @classmethod
  def whole_clips(cls, rows: int, grid: tuple[int, int]) -> TokenLayout:
    """One clip per row on a full `grid` (freq, time), frequency-major."""
    freq, time = grid
    ones = jnp.ones((rows, freq * time), jnp.int32)
    freq_positions = jnp.repeat(jnp.arange(freq, dtype=jnp.int32), time)
    time_positions = jnp.tile(jnp.arange(time, dtype=jnp.int32), freq)
    return cls(ones, ones * freq_positions, ones * time_positions, jnp.full((rows, 1), time, jnp.int32))

  @property
  def clips(self) -> int:
    return self.time_patches.shape[1]


def one_patch_row(frames: int, mel_bins: int) -> tuple[jax.Array, TokenLayout]:
  """A packed row of one clip slot `[1, 1, frames, mel_bins]` holding one patch: the example input that
  initialises a packed-row model (the shapes fix its parameters)."""
  zeros = jnp.zeros((1, 1), jnp.int32)
  layout = TokenLayout(jnp.ones((1, 1), jnp.int32), zeros, zeros, jnp.ones((1, 1), jnp.int32))
  return jnp.zeros((1, 1, frames, mel_bins), jnp.float32), layout


def slot_mask(segment_ids: jax.Array, clips: int) -> jax.Array:
  """`[rows, clips, tokens]`: True where a token belongs to clip slot k (segment k + 1)."""
  slots = jnp.arange(1, clips + 1, dtype=segment_ids.dtype)
  return segment_ids[:, None, :] == slots[None, :, None]


def patchify(spectrogram: jax.Array, patch: int | tuple[int, int]) -> jax.Array:
  """Non-overlapping patches, frequency-major: `[..., frames, mel_bins]` -> `[..., freq * time, patch_freq *
  patch_time]` (frames and mel bins beyond whole patches are dropped; each vector is a patch's [freq, time]
  values)."""
  patch_freq, patch_time = as_patch(patch)
  *lead, frames, mel_bins = spectrogram.shape
  freq, time = mel_bins // patch_freq, frames // patch_time
  x = spectrogram[..., :time * patch_time, :freq * patch_freq].reshape(*lead, time, patch_time, freq, patch_freq)
  x = jnp.moveaxis(x, (-4, -3, -2, -1), (-3, -1, -4, -2))  # [..., freq, time, patch (mel), patch (frames)]
  return x.reshape(*lead, freq * time, patch_freq * patch_time)


def gather_packed(slot_patches: jax.Array, layout: TokenLayout) -> jax.Array:
  """Packed rows `[rows, row_tokens, dim]` from each row's clip slots, patchified on a common grid
  `[rows, clips, freq, time, dim]` (a clip's frames padded to the slot's), by the layout's segment ids and in-clip
  positions (zeros on padding)."""
  rows, clips, freq, time, dim = slot_patches.shape
  flat = slot_patches.reshape(rows, clips * freq * time, dim)
  index = (jnp.maximum(layout.segment_ids - 1, 0) * freq + layout.freq_positions) * time + layout.time_positions
  gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
  return jnp.where((layout.segment_ids > 0)[..., None], gathered, 0)


def packed_patches(spectrogram: jax.Array, layout: TokenLayout | None, patch: Patch
                   ) -> tuple[jax.Array, TokenLayout]:
  """Patch vectors `[rows, row_tokens, patch_freq * patch_time]` and their layout, from packed slots
  `[rows, clips, frames, mel_bins]` with `layout`, or from whole-clip rows `[rows, frames, mel_bins]` (layout
  None: every patch of the row, in order)."""
  patch_freq, patch_time = patch
  if layout is None:
    rows, frames, mel_bins = spectrogram.shape
    grid = patch_grid(mel_bins, frames, patch)
    return patchify(spectrogram, patch), TokenLayout.whole_clips(rows, grid)
  rows, clips, frames, mel_bins = spectrogram.shape
  slots = patchify(spectrogram, patch).reshape(rows, clips, mel_bins // patch_freq, frames // patch_time,
                                               patch_freq * patch_time)
  return gather_packed(slots, layout), layout


class PatchProjection(nn.Module):
  """The patch conv (`kernel` `[patch_freq, patch_time, 1, width]`, `bias`), as `nn.Conv` computes it; at another
  patch shape its kernel is PI-resized (FlexiAST, `models/flexi.py`) and each stride scaled with its patch side."""

  width: int
  shape: tuple[int, int]
  strides: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, patch: tuple[int, int] | None = None) -> jax.Array:
    """image `[rows, mel_bins, frames, channels]`, or the vectors `[rows, tokens, patch_freq * patch_time]` of
    non-overlapping patches (`patchify`'s order) projected by the same one-channel kernel."""
    vectors = image.ndim == 3
    kernel = self.param("kernel", with_names(nn.initializers.lecun_normal(), None, None, None, "embed"),
                        (*self.shape, 1 if vectors else image.shape[-1], self.width))
    bias = self.param("bias", with_names(nn.initializers.zeros_init(), "embed"), (self.width,))
    if vectors:
      if patch is not None and tuple(patch) != tuple(self.shape):
        raise ValueError(f"patch vectors are projected at the stored {tuple(self.shape)} patch, not {tuple(patch)}")
      image, kernel, bias = nn.dtypes.promote_dtype(image, kernel, bias, dtype=self.dtype)
      return image @ kernel.reshape(-1, self.width) + bias
    strides = self.strides
    if patch is not None and tuple(patch) != tuple(self.shape):
      kernel, strides = resize_patch_kernel(kernel, tuple(patch)), scaled_strides(self.shape, strides, patch)
    image, kernel, bias = nn.dtypes.promote_dtype(image, kernel, bias, dtype=self.dtype)
    out = jax.lax.conv_general_dilated(image, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


class PatchEmbed(nn.Module):
  """Conv patches (overlapping when the strides are smaller than the patch) of whole-clip rows, frequency-major.
  `patch` (freq, time) runs patches of that shape with the PI-resized kernel instead, the strides scaled with the
  patch (`audio/patches.py:scaled_strides`)."""

  width: int
  patch: Patch = (16, 16)
  strides: Patch = (10, 10)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array, patch: Patch | None = None, *, patchified: bool = False) -> jax.Array:
    """spectrogram `[rows, frames, mel_bins]` -> tokens `[rows, freq * time, width]`; with `patchified`, the
    vectors `[rows, tokens, patch_freq * patch_time]` of non-overlapping patches (packed rows) -> `[rows, tokens,
    width]`, the same projection as the conv with strides equal to the patch."""
    if patchified:
      return PatchProjection(self.width, tuple(self.patch), tuple(self.strides), self.dtype, name="proj")(spectrogram)
    image = jnp.swapaxes(spectrogram, 1, 2)[..., None]
    patches = PatchProjection(self.width, tuple(self.patch), tuple(self.strides), self.dtype, name="proj")(image, patch)
    rows, freq, time, width = patches.shape
    return patches.reshape(rows, freq * time, width)


def whole_clip_rows(spectrogram: jax.Array, layout: TokenLayout | None, family: str) -> jax.Array:
  """The `[rows, frames, mel_bins]` spectrogram of a family that takes one whole clip per row; packed input is a
  clear error."""
  if layout is not None or spectrogram.ndim != 3:
    raise ValueError(f"the {family} model takes whole-clip rows [rows, frames, mel_bins] without a token layout, not "
                     f"packed rows of shape {spectrogram.shape}; packed rows are ElasticAST's input")
  return spectrogram
