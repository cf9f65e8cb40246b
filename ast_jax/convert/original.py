"""Upstream AST checkpoints (YuanGongND/ast): `.pth` state dicts saved from DataParallel.

Keys: `module.v.*` (the DeiT backbone under timm names, plus its unused ImageNet heads `v.head`, `v.head_dist`)
and `module.mlp_head.{0,1}.*` (LayerNorm + Linear). File names encode the strides: `audioset_10_10_0.4593.pth`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from ast_jax.convert import torch_layout
from ast_jax.convert.merge import LoadReport, merge_timm_state
from ast_jax.audio.patches import patch_grid, patch_of, strides_of

DEIT_HEAD_CLASSES = 1000


def to_original(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """AST params -> upstream state dict. DeiT's two ImageNet heads are written as zeros, so that upstream's
  `ASTModel` (which still holds them) loads the file with strict key matching."""
  state = {}
  for name, value in torch_layout.params_to_timm(params).items():
    state[("module." if name.startswith("mlp_head.") else "module.v.") + name] = value
  width = state["module.v.cls_token"].shape[-1]
  for head in ("head", "head_dist"):
    state[f"module.v.{head}.weight"] = np.zeros((DEIT_HEAD_CLASSES, width), np.float32)
    state[f"module.v.{head}.bias"] = np.zeros((DEIT_HEAD_CLASSES,), np.float32)
  return state


def timm_names_of_original(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips `module.` and `v.`: upstream names -> the timm names of torch_layout."""
  out = {}
  for name, value in state.items():
    name = name[len("module."):] if name.startswith("module.") else name
    out[name[2:] if name.startswith("v.") else name] = value
  return out


def checkpoint_grid(path: str, num_tokens: int, mel_bins: int = 128, patch_size: int = 16) -> tuple[int, int]:
  """The (frequency, time) patch grid an upstream checkpoint was trained on: strides from the file name
  (`*_{fstride}_{tstride}_*.pth`), else 10/10 (every released AudioSet model but the stride ablations)."""
  match = re.search(r"_(\d+)_(\d+)_[\d.]+\.pth$", os.path.basename(path))
  fstride = int(match.group(1)) if match else 10
  freq = (mel_bins - patch_size) // fstride + 1
  if num_tokens % freq:
    raise ValueError(f"{path}: {num_tokens} patch tokens do not form a grid with {freq} frequency rows "
                     f"(stride {fstride}); rename the file to *_{{fstride}}_{{tstride}}_*.pth")
  return freq, num_tokens // freq


def load_original(path: str, template: Mapping[str, Any], model_config: Mapping[str, Any],
                  mel_bins: int, frames: int) -> tuple[dict[str, Any], LoadReport]:
  """Loads an upstream `.pth` into `template`'s structure, adapting the positional embedding to the grid of
  (`mel_bins`, `frames`) under `model_config`'s strides, as upstream does for AudioSet -> ESC-50."""
  from ast_jax.convert.imagenet import read_state_dict

  state = timm_names_of_original(read_state_dict(path))
  target_grid = patch_grid(mel_bins, frames, patch_of(model_config), strides_of(model_config))
  num_tokens = state["pos_embed"].shape[1] - 2
  same_grid = num_tokens == target_grid[0] * target_grid[1] and not re.search(r"_\d+_\d+_[\d.]+\.pth$", path)
  source_grid = target_grid if same_grid else checkpoint_grid(path, num_tokens, mel_bins, model_config["patch_size"])
  return merge_timm_state(state, template, source_grid=source_grid, target_grid=target_grid,
                          ignore=("head.", "head_dist."))


def save_original(path: str, params: Mapping[str, Any]) -> None:
  """Writes the upstream `.pth` (needs PyTorch)."""
  torch = torch_layout.require_torch(f"writing {path}")

  torch.save({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in to_original(params).items()},
             path)
