"""Spectrogram geometry: the patch type and its grid, shared by the data packer and the models' tokeniser.

A patch is always a `(freq, time)` pair: mel bins by frames. Strides are pairs too; without strides the patches
tile the spectrogram without overlap. A config names a model's patch in `model.patch_size` (frequency, and time
unless `model.patch_time` > 0) and its strides in `model.fstride` / `model.tstride` (default: the patch itself).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

Patch = tuple[int, int]  # (freq, time): mel bins x frames


def as_patch(size: int | Sequence[int]) -> Patch:
  """A positive `(freq, time)` pair from one int (a square patch) or a pair."""
  freq, time = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  freq, time = int(freq), int(time)
  if freq < 1 or time < 1:
    raise ValueError(f"a patch size must be positive, got {size}")
  return freq, time


def stored_patch(patch_size: int, patch_time: int = 0) -> Patch:
  """The patch a model stores: `patch_size` mel bins x (`patch_time`, or `patch_size` when 0) frames."""
  return int(patch_size), int(patch_time or patch_size)


def patch_of(model_config: Any) -> Patch:
  """The model's stored patch from its config: `model.patch_size` and `model.patch_time` (`stored_patch`)."""
  return stored_patch(model_config.get("patch_size", 16), model_config.get("patch_time", 0))


def strides_of(model_config: Any) -> Patch:
  """The model's (frequency, time) strides: `model.fstride` / `model.tstride`, each defaulting to the patch side."""
  freq, time = patch_of(model_config)
  return int(model_config.get("fstride", 0) or freq), int(model_config.get("tstride", 0) or time)


def patch_grid(mel_bins: int, frames: int, patch: int | Sequence[int], strides: Sequence[int] | None = None,
               *, at_least_one: bool = False) -> tuple[int, int]:
  """The (freq, time) grid of `patch` patches at `strides` (default: no overlap) over `mel_bins` x `frames`:
  ((F - pf) // sf + 1, (T - pt) // st + 1). With `at_least_one`, a clip shorter than one patch in time counts as
  one time patch (the packer pads such a clip to a whole patch); otherwise it is an error."""
  patch_freq, patch_time = as_patch(patch)
  stride_freq, stride_time = as_patch(strides) if strides is not None else (patch_freq, patch_time)
  if mel_bins < patch_freq:
    raise ValueError(f"spectrogram {mel_bins} mel bins x {frames} frames is smaller than one {patch_freq}x{patch_time} "
                     "patch (mel bins x frames): too few mel bins")
  if frames < patch_time:
    if at_least_one:
      return (mel_bins - patch_freq) // stride_freq + 1, 1
    raise ValueError(f"spectrogram {mel_bins} mel bins x {frames} frames is smaller than one {patch_freq}x"
                     f"{patch_time} patch (mel bins x frames)")
  return (mel_bins - patch_freq) // stride_freq + 1, (frames - patch_time) // stride_time + 1


def scaled_strides(own_patch: Sequence[int], own_strides: Sequence[int], patch: Sequence[int]) -> Patch:
  """The strides of a stored patch run at another patch shape (FlexiAST): each stride scaled with its patch side,
  so the overlap ratio is kept (non-overlapping stays non-overlapping). Raises ValueError when a scaled stride is
  not a whole number of bins or frames."""
  strides = []
  for stride, own, new, axis in zip(own_strides, own_patch, patch, ("frequency", "time")):
    if (stride * new) % own:
      raise ValueError(f"patch {tuple(patch)} does not scale the {axis} stride {stride} of the stored {own_patch[0]}x"
                       f"{own_patch[1]} patch to a whole number ({stride} * {new} / {own}); use a size that does, or "
                       "non-overlapping patches (strides = patch size)")
    strides.append(stride * new // own)
  return strides[0], strides[1]
