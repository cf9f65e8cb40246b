"""Audio Mamba weights: our Linen tree <-> upstream AuM's PyTorch state dict (kaistmm/Audio-Mamba-AuM).

Names (docs/BACKGROUND.md section 5.7): `patch_embed.proj.*`, `cls_token` (or `cls_token_head` / `cls_token_tail`),
`pos_embed.pos_embed`, `layers.{i}.norm.weight`, `layers.{i}.mixer.{in_proj, conv1d, x_proj, dt_proj, A_log, D,
A_b_log, out_proj, [conv1d_b, x_proj_b, dt_proj_b, D_b]}`, `norm_f.weight`, `head.*`; a `module.` prefix
(DataParallel) is dropped on reading. Layouts: Dense kernel [in, out] <-> weight [out, in]; the depthwise conv
kernel [width, channels] <-> weight [channels, 1, width]; the patch conv as AST's (torch_layout.py).
`ast_jax/convert/aum_torch.py` runs an exported state dict in plain PyTorch.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import numpy as np

from ast_jax.convert.merge import LoadReport
from ast_jax.convert.model_dir import flatten, unflatten
from ast_jax.convert.torch_layout import require_torch
from ast_jax.models.layers import unscan_layers

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"^encoder/blocks_(\d+)/(.*)$")
_TOP = {"pos_embed": "pos_embed.pos_embed", "encoder/norm_f/weight": "norm_f.weight"}


def _torch_name(path: str) -> str:
  """Our parameter path -> upstream's tensor name."""
  if path in _TOP:
    return _TOP[path]
  match = _BLOCK.match(path)
  if match:
    path = f"layers.{match.group(1)}.{match.group(2)}"
  return re.sub(r"/(kernel|bias|weight)$", lambda leaf: "." + ("weight" if leaf.group(1) != "bias" else "bias"),
                path).replace("/", ".")


def _to_torch(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("patch_embed/proj/kernel"):  # [freq, time, 1, out] -> [out, 1, freq, time]
    return value.transpose(3, 2, 0, 1)
  if re.search(r"/conv1d(_b)?/kernel$", path):  # [width, channels] -> [channels, 1, width]
    return value.T[:, None, :]
  if path.endswith("/kernel") or path == "head/kernel":
    return value.T
  return value


def _from_torch(path: str, value: np.ndarray) -> np.ndarray:
  if path.endswith("patch_embed/proj/kernel"):
    value = value.transpose(2, 3, 1, 0)
  elif re.search(r"/conv1d(_b)?/kernel$", path):
    value = value[:, 0, :].T
  elif path.endswith("/kernel"):
    value = value.T
  return np.ascontiguousarray(value, np.float32)


def to_upstream(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """AuM params (scanned or not) -> {upstream name: float32 array}."""
  flat = flatten(unscan_layers(params))
  return {_torch_name(path): np.ascontiguousarray(_to_torch(path, value), np.float32) for path, value in flat.items()}


def strip_module(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops DataParallel's `module.` prefix; tensors become float32 NumPy arrays."""
  out = {}
  for name, value in state.items():
    value = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
    out[name[len("module."):] if name.startswith("module.") else name] = value
  return out


def from_upstream(state: Mapping[str, Any], template: Mapping[str, Any], grid: tuple[int, int] | None = None
                  ) -> tuple[dict[str, Any], LoadReport]:
  """Fills `template` (freshly initialised AuM params) from an upstream state dict. With the model's (frequency,
  time) patch `grid`, a positional table of another time length is resized to it (bilinear, antialias, as
  upstream's FlexiPosEmbed); a head of another class count stays fresh. Anything else missing or misshapen is an
  error."""
  state = strip_module(state)
  report, problems, merged = LoadReport(), [], {}
  for path, fresh in flatten(unscan_layers(template)).items():
    name = _torch_name(path)
    if name not in state:
      problems.append(f"{name}: missing from the checkpoint (model expects {fresh.shape})")
      continue
    value = _from_torch(path, state[name])
    if path == "pos_embed" and value.shape != fresh.shape:
      value = _resize_table(value, fresh, sum(name.startswith("cls_token") for name in template), grid)
      report.adapted.append(f"pos_embed {state[name].shape[1]} -> {fresh.shape[1]} rows")
    if value.shape != fresh.shape:
      if path.startswith("head/"):
        merged[path] = fresh
        report.fresh.append(f"{name} (checkpoint {value.shape}, model {fresh.shape})")
        continue
      problems.append(f"{name}: checkpoint {value.shape}, model {fresh.shape}")
      continue
    merged[path] = value
    report.loaded.append(name)
  expected = {_torch_name(path) for path in flatten(unscan_layers(template))}
  report.unused = sorted(set(state) - expected)
  if problems:
    raise ValueError("checkpoint does not fit the AuM model (check model.bidirectional, cls_position, width and "
                     "depth):\n  " + "\n  ".join(problems))
  if report.unused:
    log.warning("checkpoint tensors not used by the model: %s", report.unused)
  return unflatten(merged), report


def _resize_table(value: np.ndarray, fresh: np.ndarray, prefix: int, grid: tuple[int, int] | None) -> np.ndarray:
  """A positional table of another time length, resized to `grid` (the checkpoint has the same frequency rows:
  same mel bins and patches)."""
  from ast_jax.models.positions import resize_table

  source_patches = value.shape[1] - prefix
  if grid is None or grid[0] * grid[1] != fresh.shape[1] - prefix or source_patches % grid[0]:
    raise ValueError(f"pos_embed.pos_embed: checkpoint {value.shape}, model {fresh.shape}: the checkpoint's "
                     f"{source_patches} patch rows do not form a grid with the model's frequency rows {grid}")
  return np.asarray(resize_table(value, (grid[0], source_patches // grid[0]), grid, rule="antialias",
                                 prefix=prefix))


def save_upstream(path: str, params: Mapping[str, Any]) -> None:
  """Writes an upstream-layout `.pth` (needs PyTorch)."""
  torch = require_torch(f"writing {path}")

  torch.save({name: torch.from_numpy(value.copy()) for name, value in to_upstream(params).items()}, path)


def load_upstream(path: str, template: Mapping[str, Any], grid: tuple[int, int]) -> tuple[dict[str, Any], LoadReport]:
  """Reads an upstream `.pth` (or `.safetensors`) into `template`; `grid` is the model's (frequency, time) patch
  grid, used to resize a positional table of another length."""
  from ast_jax.convert.imagenet import read_state_dict

  return from_upstream(read_state_dict(path), template, grid)
