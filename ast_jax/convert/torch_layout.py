"""Our Linen parameter tree <-> PyTorch tensors under timm's ViT names (the layout every AST format builds on).

Linen to PyTorch: Dense kernel [in, out] -> weight [out, in]; Conv kernel [freq, time, in, out] ->
weight [out, in, freq, time]; LayerNorm scale -> weight. The head uses upstream AST's names
(`mlp_head.0` = LayerNorm, `mlp_head.1` = Linear). The attention's kernels are split per head
(models/vit.py:Attention) and flatten C-order to timm's: `qkv` kernel [D, 3, heads, head_dim] -> weight [3D, D]
(rows q, k, v, each heads-major, as timm's `reshape(B, N, 3, heads, head_dim)`), bias [3, heads, head_dim] -> [3D];
`proj` kernel [heads, head_dim, D] -> weight [D, D] (columns heads-major).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ast_jax.models.layers import unscan_layers


def require_torch(purpose: str) -> Any:
  """The `torch` module, or a ValueError that names the package to install (`purpose`: what needs it)."""
  try:
    import torch
  except ImportError:
    raise ValueError(f"{purpose} needs PyTorch, which is not installed: pip install torch (a CPU build is enough: "
                     "pip install torch --index-url https://download.pytorch.org/whl/cpu)") from None
  return torch

# (our path under a block, timm name under `blocks.{i}.`, kind); `qkv` and `proj` are Dense kernels split per head.
BLOCK_TENSORS = (
    ("norm1", "norm1", "norm"), ("attn/qkv", "attn.qkv", "qkv"), ("attn/proj", "attn.proj", "proj"),
    ("norm2", "norm2", "norm"), ("mlp/fc1", "mlp.fc1", "dense"), ("mlp/fc2", "mlp.fc2", "dense"),
)


def _get(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _module_to_torch(module: Mapping[str, Any], kind: str) -> dict[str, np.ndarray]:
  if kind == "norm":
    return {"weight": np.asarray(module["scale"]), "bias": np.asarray(module["bias"])}
  # A Dense(General) kernel is [*in, *out] with the bias [*out]: flattened C-order, [in, out] -> weight [out, in].
  bias = np.asarray(module["bias"])
  return {"weight": np.asarray(module["kernel"]).reshape(-1, bias.size).T, "bias": bias.reshape(-1)}


def dense_shapes(kind: str, weight_shape: tuple[int, ...], num_heads: int,
                 name: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Our (kernel, bias) shapes for a torch Linear weight `[out, in]` of this kind (`dense`, `qkv`, `proj`)."""
  out, width = weight_shape
  if kind == "dense":
    return (width, out), (out,)
  if width % num_heads or (kind == "qkv" and out != 3 * width) or (kind == "proj" and out != width):
    raise ValueError(f"{name or kind}.weight {tuple(weight_shape)} is not an attention {kind} weight of "
                     f"{num_heads} heads")
  head_dim = width // num_heads
  if kind == "qkv":
    return (width, 3, num_heads, head_dim), (3, num_heads, head_dim)
  return (num_heads, head_dim, out), (out,)


def from_torch(tensor: Any, shape: Sequence[int]) -> np.ndarray:
  """A torch Linear weight `[out, in]` or bias `[out]` in our layout of `shape`: kernel `[*in, *out]`, bias
  `[*out]`, the attention's per-head axes split C-order. A tensor that cannot take `shape` comes back only
  transposed, for the caller's shape check to name."""
  value = np.asarray(tensor)
  value = np.ascontiguousarray(value.T) if value.ndim == 2 else value
  if value.ndim != len(shape) and value.size == math.prod(shape):  # per-head kernels and biases
    value = value.reshape(tuple(shape))
  return value


def _module_from_torch(state: Mapping[str, np.ndarray], name: str, kind: str,
                       num_heads: int = 1) -> dict[str, np.ndarray]:
  weight, bias = np.asarray(state[f"{name}.weight"]), np.asarray(state[f"{name}.bias"])
  if kind == "norm":
    return {"scale": weight, "bias": bias}
  kernel_shape, bias_shape = dense_shapes(kind, weight.shape, num_heads, name)
  return {"kernel": from_torch(weight, kernel_shape), "bias": from_torch(bias, bias_shape)}


def depth_of(params: Mapping[str, Any]) -> int:
  return len([name for name in params["encoder"] if name.startswith("blocks_")])


def heads_of(params: Mapping[str, Any]) -> int:
  """The head count of unscanned AST params, from the per-head qkv kernel `[D, 3, heads, head_dim]`."""
  return int(np.shape(params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])[2])


def _fused_attention(params: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """{block name: its `attn` params} for the unscanned blocks whose qkv kernel is fused `[D, 3D]`."""
  blocks = params.get("encoder", {})
  return {name: block["attn"] for name, block in blocks.items()
          if name.startswith("blocks_") and "attn" in block and np.ndim(block["attn"]["qkv"]["kernel"]) == 2}


def has_fused_attention(params: Mapping[str, Any]) -> bool:
  return bool(_fused_attention(params))


def split_attention_heads(params: Mapping[str, Any], num_heads: int) -> dict[str, Any]:
  """Unscanned params whose attention kernels are fused (`qkv` kernel [D, 3D], bias [3D]; `proj` kernel [D, D]: the
  layout before kernels were split per head) -> the per-head layout. Blocks already per head (and params without
  attention blocks) are returned as they are."""
  fused = _fused_attention(params)
  if not fused:
    return dict(params)
  encoder = dict(params["encoder"])
  for name, attn in fused.items():
    # The fused kernels are timm's weights transposed; the per-head layout is read from those.
    state = {f"{part}.{suffix}": value for part in ("qkv", "proj")
             for suffix, value in _module_to_torch(attn[part], "dense").items()}
    split = {part: _module_from_torch(state, part, part, num_heads) for part in ("qkv", "proj")}
    encoder[name] = {**encoder[name], "attn": {**attn, **split}}
  return {**params, "encoder": encoder}


def params_to_timm(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """AST params -> {timm/upstream name: float32 array} (backbone as `v.*` would hold it, head as `mlp_head.*`)."""
  params = unscan_layers(params)
  state = {
      "cls_token": np.asarray(params["cls_token"]),
      "dist_token": np.asarray(params["dist_token"]),
      "pos_embed": np.asarray(params["pos_embed"]),
      "patch_embed.proj.weight": np.asarray(params["patch_embed"]["proj"]["kernel"]).transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": np.asarray(params["patch_embed"]["proj"]["bias"]),
  }
  for index in range(depth_of(params)):
    block = params["encoder"][f"blocks_{index}"]
    for ours, theirs, kind in BLOCK_TENSORS:
      for suffix, value in _module_to_torch(_get(block, ours), kind).items():
        state[f"blocks.{index}.{theirs}.{suffix}"] = value
  for suffix, value in _module_to_torch(params["encoder"]["norm"], "norm").items():
    state[f"norm.{suffix}"] = value
  for suffix, value in _module_to_torch(params["head"]["norm"], "norm").items():
    state[f"mlp_head.0.{suffix}"] = value
  for suffix, value in _module_to_torch(params["head"]["dense"], "dense").items():
    state[f"mlp_head.1.{suffix}"] = value
  return {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}


def timm_to_params(state: Mapping[str, np.ndarray], depth: int, num_heads: int) -> dict[str, Any]:
  """The inverse of `params_to_timm` (every name must be present; extra names are the caller's to report)."""
  encoder: dict[str, Any] = {}
  for index in range(depth):
    block: dict[str, Any] = {}
    for ours, theirs, kind in BLOCK_TENSORS:
      node = block
      *parents, leaf = ours.split("/")
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = _module_from_torch(state, f"blocks.{index}.{theirs}", kind, num_heads)
    encoder[f"blocks_{index}"] = block
  encoder["norm"] = _module_from_torch(state, "norm", "norm")
  kernel = np.asarray(state["patch_embed.proj.weight"]).transpose(2, 3, 1, 0)
  return {
      "cls_token": np.asarray(state["cls_token"]),
      "dist_token": np.asarray(state["dist_token"]),
      "pos_embed": np.asarray(state["pos_embed"]),
      "patch_embed": {"proj": {"kernel": np.ascontiguousarray(kernel),
                               "bias": np.asarray(state["patch_embed.proj.bias"])}},
      "encoder": encoder,
      "head": {"norm": _module_from_torch(state, "mlp_head.0", "norm"),
               "dense": _module_from_torch(state, "mlp_head.1", "dense")},
  }


def timm_names(depth: int) -> set[str]:
  """Every name `params_to_timm` writes for a model of this depth."""
  names = {"cls_token", "dist_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias", "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"}
  for index in range(depth):
    for _, theirs, _ in BLOCK_TENSORS:
      names |= {f"blocks.{index}.{theirs}.weight", f"blocks.{index}.{theirs}.bias"}
  return names
