"""ImageNet (timm DeiT / ViT) initialisation of AST, as upstream AST does it (docs/BACKGROUND.md section 1.3).

timm key                         ->  ast_jax param path                    transform
cls_token [1,1,D]                    cls_token
dist_token [1,1,D] (or cls_token)    dist_token                            a plain ViT's cls token is duplicated
pos_embed [1,P+G*G,D]                pos_embed [1,2+f*t,D]                 centre cut / bilinear per axis
patch_embed.proj.weight [D,3,16,16]  patch_embed/proj/kernel [16,16,1,D]   RGB summed (upstream) or averaged
blocks.{i}.{norm1,norm2}.weight      encoder/blocks_{i}/{norm1,norm2}/scale
blocks.{i}.attn.qkv.weight [3D,D]    encoder/blocks_{i}/attn/qkv/kernel    transposed, split per head [D,3,H,D/H]
norm.weight                          encoder/norm/scale
head.*, head_dist.*                  (unused; our head stays freshly initialised)
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ast_jax.convert.torch_layout import from_torch, require_torch
from ast_jax.models.positions import resize_table

# Wrappers added by DataParallel or training scripts around a timm model's own keys.
_KEY_PREFIXES = ("module.", "model.")
# Checkpoint keys that belong to ImageNet classifiers, not to the backbone we load.
_HEAD_KEYS = re.compile(r"^(head|head_dist)\.")
_LISTED = 12  # tensors named in an error message before "... and N more"


def _strip_prefix(key: str) -> str:
  while key.startswith(_KEY_PREFIXES):
    key = key.split(".", 1)[1]
  return key


def _source_key(path: str) -> str:
  """Our param path -> its timm key: 'encoder/blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.weight'."""
  parts = path.split("/")
  if parts[0] == "encoder":
    parts = parts[1:]
  parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", part) for part in parts]
  parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
  return ".".join(parts)


def _name_some(items: list[str]) -> str:
  shown = ", ".join(items[:_LISTED])
  return shown + (f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def to_numpy(array: Any) -> np.ndarray:
  """A NumPy array from a NumPy/JAX array or a CPU torch tensor (torch bfloat16 is widened to float32)."""
  if hasattr(array, "detach"):
    array = array.detach().cpu()
    if str(array.dtype) == "torch.bfloat16":
      array = array.float()
    return array.numpy()
  return np.asarray(array)


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


def _square_grid(pos_embed: np.ndarray, num_prefix: int) -> tuple[int, int]:
  """The ImageNet patch grid from a pos_embed `[1, num_prefix + G*G, D]`."""
  patches = pos_embed.shape[1] - num_prefix if pos_embed.ndim == 3 else 0
  side = math.isqrt(max(patches, 0))
  if patches < 1 or side * side != patches:
    raise ValueError(f"checkpoint pos_embed {pos_embed.shape} is not [1, {num_prefix} + G*G, D] for a square grid")
  return side, side


def _convert_pos_embed(pos_embed: np.ndarray, has_dist: bool, new_grid: tuple[int, int]) -> np.ndarray:
  """Checkpoint pos_embed -> `[1, 2 + f*t, D]`, the cls row duplicated for dist when the checkpoint has no dist."""
  num_prefix = 2 if has_dist else 1
  adapted = resize_table(pos_embed, _square_grid(pos_embed, num_prefix), new_grid, rule="upstream",
                         prefix=num_prefix)
  if has_dist:
    return adapted
  return np.concatenate([adapted[:, :1], adapted[:, :1], adapted[:, 1:]], axis=1)


def _convert(path: str, tensor: np.ndarray, state: Mapping[str, np.ndarray], new_grid: tuple[int, int],
             channel_mode: str, expected: tuple[int, ...]) -> np.ndarray:
  """One checkpoint tensor in our layout of shape `expected` (before the shape check)."""
  if path == "pos_embed":
    return _convert_pos_embed(tensor, "dist_token" in state, new_grid)
  if path.endswith("/kernel") and tensor.ndim == 4:
    return sum_rgb_kernel(tensor, channel_mode)
  if path.endswith(("/kernel", "/bias")) and tensor.ndim <= 2:
    return from_torch(tensor, expected)  # torch Linear [out, in] -> Dense [in, out], attention split per head
  return tensor


def imagenet_init(state_dict: Mapping[str, Any], params: Mapping[str, Any], *, new_grid: tuple[int, int],
                  channel_mode: str = "sum") -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Loads a timm DeiT/ViT state dict into freshly initialised AST params.

  state_dict: timm keys (optionally prefixed `module.` / `model.`) -> arrays. params: our AST params (the `params`
  collection, or `{"params": ...}`), NumPy or JAX leaves. new_grid: our (frequency, time) patch grid.
  Returns (params with the backbone replaced, report) where report holds `loaded` (our paths set from the checkpoint),
  `fresh` (our paths left as initialised: the head) and `unused` (checkpoint keys not used: its ImageNet heads).
  Raises ValueError naming the tensors if a backbone tensor is missing, has the wrong shape, or is left over
  (depth or width mismatch): nothing is loaded partially.
  """
  wrapped = set(params) == {"params"}
  flat_params = traverse_util.flatten_dict(params["params"] if wrapped else params, sep="/")
  state: dict[str, np.ndarray] = {}
  original_key: dict[str, str] = {}
  for key, value in state_dict.items():
    name = _strip_prefix(key)
    if name in state:
      raise ValueError(f"checkpoint keys {original_key[name]!r} and {key!r} both map to {name!r}")
    state[name], original_key[name] = to_numpy(value), key

  converted, fresh, missing, mismatched, used = {}, [], [], [], set()
  for path, leaf in flat_params.items():
    if path.startswith("head/"):
      fresh.append(path)
      continue
    source = _source_key(path)
    if source == "dist_token" and source not in state:
      source = "cls_token"  # a plain ViT: its single cls token serves as both prefix tokens
    if source not in state:
      missing.append(f"{path} (checkpoint {source!r})")
      continue
    used.add(source)
    tensor = state[source]
    expected = tuple(leaf.shape)
    if path == "pos_embed" and tensor.ndim == 3 and tensor.shape[-1] != expected[-1]:
      mismatched.append(f"{path} <- {original_key[source]!r} {tensor.shape}: width {tensor.shape[-1]} != model "
                        f"{expected[-1]}")
      continue
    value = _convert(path, tensor, state, new_grid, channel_mode, expected)
    if value.shape != expected:
      grid_hint = f" (new_grid {tuple(new_grid)})" if path == "pos_embed" else ""
      mismatched.append(f"{path} <- {original_key[source]!r} {tensor.shape}: converted {value.shape} != model "
                        f"{expected}{grid_hint}")
      continue
    converted[path] = value.astype(np.dtype(leaf.dtype))

  leftover = sorted(name for name in state if name not in used)
  backbone_leftover = [original_key[name] for name in leftover if not _HEAD_KEYS.match(name)]
  problems = []
  if missing:
    problems.append(f"model params missing from the checkpoint: {_name_some(missing)}")
  if mismatched:
    problems.append(f"shape mismatches: {_name_some(mismatched)}")
  if backbone_leftover:
    problems.append(f"checkpoint backbone tensors the model has no place for: {_name_some(backbone_leftover)}")
  if problems:
    raise ValueError("ImageNet checkpoint does not fit this AST (depth/width/grid mismatch?); "
                     + "; ".join(problems))

  merged = {path: converted.get(path, leaf) for path, leaf in flat_params.items()}
  new_params = traverse_util.unflatten_dict(merged, sep="/")
  report = {"loaded": sorted(converted), "fresh": sorted(fresh), "unused": [original_key[name] for name in leftover]}
  return ({"params": new_params} if wrapped else new_params), report


def _unwrap_checkpoint(obj: Any) -> Mapping[str, Any]:
  """Training checkpoints nest the weights as {'model': ...} or {'state_dict': ...}."""
  while isinstance(obj, Mapping):
    inner = next((obj[key] for key in ("model", "state_dict") if isinstance(obj.get(key), Mapping)), None)
    if inner is None:
      return obj
    obj = inner
  raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat state dict (key -> array) from .pth/.pt (torch, CPU, weights only), .npz or .safetensors."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".pth", ".pt"):
    torch = require_torch(f"reading {path}")  # only needed for PyTorch pickles

    state = _unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    # Non-tensor entries (epoch counters, names) are metadata, not weights.
    return {key: to_numpy(value) for key, value in state.items() if isinstance(value, torch.Tensor)}
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  if suffix == ".safetensors":
    from safetensors.numpy import load_file

    return dict(load_file(path))
  raise ValueError(f"unknown checkpoint format {suffix!r} for {path}; expected .pth, .pt, .npz or .safetensors")
