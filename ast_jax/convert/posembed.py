"""Positional-embedding and patch-kernel adaptation for loading image (or other-grid) weights, as upstream AST does.

All functions are NumPy-only so conversion runs anywhere, without torch or an accelerator.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(array: Any) -> np.ndarray:
  """A NumPy array from a NumPy/JAX array or a CPU torch tensor (torch bfloat16 is widened to float32)."""
  if hasattr(array, "detach"):
    array = array.detach().cpu()
    if str(array.dtype) == "torch.bfloat16":
      array = array.float()
    return array.numpy()
  return np.asarray(array)


def _linear_taps(in_size: int, out_size: int,
                 dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of PyTorch's linear resize (align_corners=False, size given, no antialias).

  Computed in `dtype` (float32 for float32 input, as PyTorch's CPU kernel does). Returns (index0, index1, weight0,
  weight1), each `[out_size]`.
  """
  scale = dtype.type(in_size) / dtype.type(out_size)
  centres = np.arange(out_size).astype(dtype) + dtype.type(0.5)
  # Half-pixel centres, scale * centre - 0.5 rounded once (PyTorch's kernel compiles it to a fused multiply-add; in
  # float64 the float32 product is exact), clamped at 0 from below (area_pixel_compute_source_index).
  source = (scale.astype(np.float64) * centres - 0.5).astype(dtype)
  source = np.maximum(source, dtype.type(0))
  index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  index1 = np.minimum(index0 + 1, in_size - 1)
  weight1 = np.clip(source - index0.astype(dtype), 0, 1).astype(dtype)
  return index0, index1, dtype.type(1) - weight1, weight1


def bilinear_resize(grid: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """torch `F.interpolate(mode='bilinear', align_corners=False)` on `[H, W, D]` -> `[new_h, new_w, D]`.

  Taps are computed in float32 (float64 for float64 input) as PyTorch does; returned in the input's dtype.
  """
  grid = np.asarray(grid)
  if grid.ndim != 3:
    raise ValueError(f"bilinear_resize expects [H, W, D], got shape {grid.shape}")
  if new_h < 1 or new_w < 1:
    raise ValueError(f"target size must be positive, got ({new_h}, {new_w})")
  tap_dtype = np.dtype(np.float64 if grid.dtype == np.float64 else np.float32)
  values = grid.astype(np.float64)
  top, bottom, weight_top, weight_bottom = _linear_taps(grid.shape[0], new_h, tap_dtype)
  values = values[top] * weight_top[:, None, None] + values[bottom] * weight_bottom[:, None, None]
  left, right, weight_left, weight_right = _linear_taps(grid.shape[1], new_w, tap_dtype)
  values = values[:, left] * weight_left[None, :, None] + values[:, right] * weight_right[None, :, None]
  return values.astype(grid.dtype)


def _cut_or_interpolate(grid: np.ndarray, axis: int, new_size: int) -> np.ndarray:
  """Upstream's per-axis rule on `[F, T, D]`: cut the centre if not growing, else bilinear along that axis only."""
  old_size = grid.shape[axis]
  if new_size <= old_size:
    # Upstream's start: int(old / 2) - int(new / 2), the ORIGINAL size's half.
    start = old_size // 2 - new_size // 2
    return np.take(grid, np.arange(start, start + new_size), axis=axis)
  if axis == 0:
    return bilinear_resize(grid, new_size, grid.shape[1])
  return bilinear_resize(grid, grid.shape[0], new_size)


def adapt_pos_embed(pos_embed: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                    num_prefix: int = 2) -> np.ndarray:
  """Moves a learned positional embedding from one (frequency, time) patch grid to another, as upstream AST does.

  pos_embed `[1, num_prefix + F * T, D]` (frequency-major patch rows) -> `[1, num_prefix + f * t, D]`.
  Time is adapted first, then frequency; each axis is centre-cut when it shrinks (or stays), else bilinearly
  interpolated (align_corners=False). The prefix rows (cls, dist) are kept unchanged.
  """
  pos_embed = np.asarray(pos_embed)
  old_f, old_t = (int(size) for size in old_grid)
  new_f, new_t = (int(size) for size in new_grid)
  if min(old_f, old_t, new_f, new_t) < 1 or num_prefix < 0:
    raise ValueError(f"grids must be positive and num_prefix >= 0, got {old_grid} -> {new_grid}, prefix {num_prefix}")
  if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != num_prefix + old_f * old_t:
    raise ValueError(f"pos_embed of shape {pos_embed.shape} does not match [1, {num_prefix} + {old_f}*{old_t}, D] "
                     f"(= [1, {num_prefix + old_f * old_t}, D]) for grid {old_grid} with {num_prefix} prefix rows")
  if (old_f, old_t) == (new_f, new_t):
    return pos_embed.copy()
  width = pos_embed.shape[2]
  prefix = pos_embed[:, :num_prefix]
  grid = pos_embed[0, num_prefix:].reshape(old_f, old_t, width)
  grid = _cut_or_interpolate(grid, axis=1, new_size=new_t)
  grid = _cut_or_interpolate(grid, axis=0, new_size=new_f)
  return np.concatenate([prefix, grid.reshape(1, new_f * new_t, width)], axis=1)


def sum_rgb_kernel(torch_weight: Any, mode: str = "sum") -> np.ndarray:
  """A PyTorch conv weight `[D, C, kh, kw]` (C = 3 for RGB) -> a one-channel Flax kernel `[kh, kw, 1, D]`.

  Upstream AST sums the input channels (`mode='sum'`, the paper says "averaged"); `mode='mean'` divides by C.
  """
  weight = to_numpy(torch_weight)
  if weight.ndim != 4:
    raise ValueError(f"conv weight must be [D, C, kh, kw], got shape {weight.shape}")
  if mode == "sum":
    merged = weight.sum(axis=1, keepdims=True, dtype=np.float64)
  elif mode == "mean":
    merged = weight.mean(axis=1, keepdims=True, dtype=np.float64)
  else:
    raise ValueError(f"mode must be 'sum' or 'mean', not {mode!r}")
  return merged.transpose(2, 3, 1, 0).astype(weight.dtype)
