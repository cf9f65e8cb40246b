"""Learned positional tables: every rule that moves a table to another patch grid, or reads it between its rows.

A table is `[1, prefix + freq * time, width]`: `prefix` rows for the prefix tokens (AST's cls and dist, a plain
ViT's cls, AuM's CLS rows), then one row per patch of a (freq, time) grid, frequency-major. Grids are always
(freq, time) pairs. The prefix rows never move; only the patch grid does, under one of three named rules:

| rule        | the patch grid                                            | used by                                   |
|-------------|-----------------------------------------------------------|-------------------------------------------|
| `upstream`  | time first, then frequency; each axis centre-cut when it  | upstream AST's import: ImageNet DeiT/ViT  |
|             | shrinks or stays, else bilinear along that axis alone     | and upstream `.pth` weights (convert/);   |
|             | (PyTorch `F.interpolate`, align_corners=False); NumPy     | the fixed-length AST sweep (eval_sweep)   |
| `bilinear`  | both axes at once, bilinear (PyTorch `F.interpolate`,     | coarse-to-fine phases: the table carried  |
|             | align_corners=False), never cut; NumPy                    | to the next phase's grid (train/phases)   |
| `antialias` | both axes at once, `jax.image.resize` bilinear with       | FlexiAST: the table at each patch shape   |
|             | antialias, in at least float32; jit-able                  | (models/ast.py); AuM's table (CLS rows    |
|             |                                                           | first) of another length (convert/aum)    |

ElasticAST reads a 1-D table at fractional coordinates instead (`fractional_rows`): a clip of any length is
mapped onto the whole table, centres aligned, linear between rows.

Pure NumPy and JAX: conversion, training and the models all call it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("upstream", "bilinear", "antialias")


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


def _upstream(grid: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """`[F, T, D]` -> `[f, t, D]`: time first, then frequency, each centre-cut or interpolated."""
  grid = _cut_or_interpolate(grid, axis=1, new_size=new_grid[1])
  return _cut_or_interpolate(grid, axis=0, new_size=new_grid[0])


def _antialias(grid: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """`[F, T, D]` -> `[f, t, D]` by `jax.image.resize` with antialias, in at least float32, in `grid`'s dtype."""
  compute_dtype = jnp.promote_types(grid.dtype, jnp.float32)
  resized = jax.image.resize(grid.astype(compute_dtype), (*new_grid, grid.shape[-1]), method="bilinear",
                             antialias=True)
  return resized.astype(grid.dtype)


def _pair(grid: tuple[int, int]) -> tuple[int, int]:
  freq, time = (int(size) for size in grid)
  return freq, time


def resize_table(table: np.ndarray | jax.Array, from_grid: tuple[int, int], to_grid: tuple[int, int], *,
                 rule: str, prefix: int = 2) -> np.ndarray | jax.Array:
  """A positional table moved from one (freq, time) patch grid to another under `rule` (see the module docstring).

  table `[1, prefix + F * T, width]` -> `[1, prefix + f * t, width]` in the table's dtype; the `prefix` rows are
  kept as they are. `upstream` and `bilinear` return NumPy (a new array, also on the same grid); `antialias`
  returns a JAX array (the table itself on the same grid) and runs under jit with the grids, `rule` and `prefix`
  static.
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
  old_f, old_t = _pair(from_grid)
  new_f, new_t = _pair(to_grid)
  if min(old_f, old_t, new_f, new_t) < 1 or prefix < 0:
    raise ValueError(f"grids must be positive and prefix >= 0, got {from_grid} -> {to_grid}, prefix {prefix}")
  if rule != "antialias":
    table = np.asarray(table)
  if table.ndim != 3 or table.shape[0] != 1 or table.shape[1] != prefix + old_f * old_t:
    raise ValueError(f"positional table of shape {table.shape} does not match [1, {prefix} + {old_f}*{old_t}, D] "
                     f"(= [1, {prefix + old_f * old_t}, D]) for grid {tuple(from_grid)} with {prefix} prefix rows")
  if (old_f, old_t) == (new_f, new_t):
    return table if rule == "antialias" else table.copy()
  width = table.shape[2]
  grid = table[0, prefix:].reshape(old_f, old_t, width)
  if rule == "antialias":
    grid = _antialias(grid, (new_f, new_t)).reshape(1, new_f * new_t, width)
    return jnp.concatenate([table[:, :prefix], grid], axis=1)
  grid = _upstream(grid, (new_f, new_t)) if rule == "upstream" else bilinear_resize(grid, new_f, new_t)
  return np.concatenate([table[:, :prefix], grid.reshape(1, new_f * new_t, width)], axis=1)


def fractional_rows(table: jax.Array, positions: jax.Array, extents: jax.Array) -> jax.Array:
  """Rows of `table` `[size, width]` for position p of a clip `extents` patches long, mapped onto the whole table
  (centres aligned: coordinate (p + 0.5) * size / extent - 0.5) and linearly interpolated between rows.

  ElasticAST's fractional time positions: `positions` and `extents` `[...]` -> `[..., width]`.
  """
  size = table.shape[0]
  coordinate = (positions.astype(jnp.float32) + 0.5) * size / jnp.maximum(extents, 1).astype(jnp.float32) - 0.5
  coordinate = jnp.clip(coordinate, 0.0, size - 1.0)
  low = jnp.floor(coordinate).astype(jnp.int32)
  high = jnp.minimum(low + 1, size - 1)
  weight = (coordinate - low)[..., None]
  return table[low] * (1.0 - weight) + table[high] * weight
