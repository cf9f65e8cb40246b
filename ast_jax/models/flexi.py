"""FlexiAST (docs/BACKGROUND.md section 3): one stored patch kernel and positional table, used at any patch shape.

PI-resize (FlexiViT): B `[new_h * new_w, old_h * old_w]` is the bilinear resize (no antialias, half-pixel centres) as a
matrix on row-major flattened patches; a kernel moves to the new shape as W_new = pinv(B^T) @ vec(W_old) per input and
output channel, bias unchanged. When the new shape is at least the old one in both dims, B has full column rank,
B^T pinv(B^T) = I and <resize(x), W_new> = <x, W_old> exactly for every old-shape patch x; otherwise W_new is the
minimum-norm least-squares solution of B^T W_new = W_old. The positional table lives on a base (frequency, time) grid
and is resized to each patch grid by `models/positions.py:resize_table` (rule 'antialias').

Layouts as in `models/ast.py`: spectrogram `[batch, frames, mel_bins]` -> image `[batch, mel_bins (H), frames (W), 1]`,
kernel `[patch_h (frequency), patch_w (time), in, width]`, tokens frequency-major.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ast_jax.audio.patches import patch_of


def _pair(shape: int | tuple[int, int]) -> tuple[int, int]:
  """A positive (height, width) from an int (square) or a pair."""
  height, width = (shape, shape) if isinstance(shape, (int, np.integer)) else shape
  height, width = int(height), int(width)
  if height < 1 or width < 1:
    raise ValueError(f"shape must be positive, got {shape}")
  return height, width


def _linear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size]` float64: 1-D linear resize, half-pixel centres, no antialias, edge samples clamped."""
  source = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  index1 = np.minimum(index0 + 1, in_size - 1)
  weight1 = source - index0
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, index0), 1.0 - weight1)
  np.add.at(matrix, (rows, index1), weight1)  # past the last sample index1 == index0: all weight on the edge
  return matrix


@functools.lru_cache(maxsize=None)
def _resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  matrix = np.kron(_linear_matrix(old[0], new[0]), _linear_matrix(old[1], new[1]))
  matrix.setflags(write=False)
  return matrix


@functools.lru_cache(maxsize=None)
def _pi_resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  # pinv((A_h kron A_w)^T) = pinv(A_h^T) kron pinv(A_w^T): two small SVDs instead of one of B.
  matrix = np.kron(np.linalg.pinv(_linear_matrix(old[0], new[0]).T), np.linalg.pinv(_linear_matrix(old[1], new[1]).T))
  matrix.setflags(write=False)
  return matrix


def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  """B, read-only float64 `[new_h * new_w, old_h * old_w]`: vec(resize(x)) = B @ vec(x) for x `[old_h, old_w]`.

  The bilinear resize of `jax.image.resize(..., "bilinear", antialias=False)` and of torch's
  `F.interpolate(mode="bilinear", align_corners=False)`; row-major flattening. Cached per shape pair.
  """
  return _resize_matrix(_pair(old), _pair(new))


def pi_resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  """pinv(B^T), read-only float64 `[new_h * new_w, old_h * old_w]`, B = `resize_matrix(old, new)`. Cached.

  new >= old in both dims: B^T @ pinv(B^T) = I, so <B x, pinv(B^T) w> = <x, w> exactly. Otherwise pinv(B^T) w is
  the minimum-norm least-squares solution of B^T v = w.
  """
  return _pi_resize_matrix(_pair(old), _pair(new))


def resize_patch_kernel(kernel: np.ndarray | jax.Array, new_shape: int | tuple[int, int]) -> np.ndarray | jax.Array:
  """PI-resizes a conv kernel `[kh, kw, in, out]` -> `[new_h, new_w, in, out]` in the kernel's dtype.

  The matrix is built in float64. A NumPy kernel is multiplied in float64 and returned as NumPy; a JAX array (or
  tracer, with `new_shape` static under jit) is multiplied in float32 (float64 if the kernel is float64) at HIGHEST
  precision. Returns `kernel` itself when the shape is unchanged.
  """
  kh, kw, channels_in, channels_out = kernel.shape
  new_h, new_w = _pair(new_shape)
  if (new_h, new_w) == (kh, kw):
    return kernel
  matrix = pi_resize_matrix((kh, kw), (new_h, new_w))
  if isinstance(kernel, np.ndarray):
    flat = kernel.reshape(kh * kw, -1).astype(np.float64)
    return (matrix @ flat).reshape(new_h, new_w, channels_in, channels_out).astype(kernel.dtype)
  compute_dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  flat = kernel.reshape(kh * kw, -1).astype(compute_dtype)
  resized = jnp.matmul(jnp.asarray(matrix, compute_dtype), flat, precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(new_h, new_w, channels_in, channels_out).astype(kernel.dtype)


FLEXI_AXES = ("both", "time")  # config.model.flexi_axes: square p x p patches, or patch_size bins x p frames


def flexi_patch_sizes(config: Any) -> tuple[tuple[int, int], ...]:
  """FlexiAST's training patch shapes (frequency, time): `model.flexi_patch_sizes`, square or, with
  `model.flexi_axes='time'`, time-only (frequency fixed at `model.patch_size`). Empty: an ordinary AST."""
  return tuple(flexi_shape(config, int(size)) for size in config.model.get("flexi_patch_sizes", ()))


def flexi_shape(config: Any, size: int) -> tuple[int, int]:
  """A FlexiAST patch size as (frequency, time): square, or with `model.flexi_axes='time'` the stored frequency
  size by `size` frames."""
  if config.model.get("flexi_axes", "both") == "time":
    return patch_of(config.model)[0], size
  return size, size


def flexi_patch_probs(config: Any) -> np.ndarray:
  """The probability of each of `flexi_patch_sizes` per step: `model.flexi_patch_weights` normalised, or uniform."""
  weights = np.asarray(config.model.get("flexi_patch_weights", ()) or np.ones(len(flexi_patch_sizes(config))),
                       np.float64)
  return weights / weights.sum()
