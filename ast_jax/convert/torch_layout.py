"""Our Linen parameter tree <-> PyTorch tensors under timm's ViT names (the layout every AST format builds on).

Linen to PyTorch: Dense kernel [in, out] -> weight [out, in]; Conv kernel [freq, time, in, out] ->
weight [out, in, freq, time]; LayerNorm scale -> weight. The head uses upstream AST's names
(`mlp_head.0` = LayerNorm, `mlp_head.1` = Linear).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ast_jax.models.layers import unscan_layers

# (our path under a block, timm name under `blocks.{i}.`, kind)
BLOCK_TENSORS = (
    ("norm1", "norm1", "norm"), ("attn/qkv", "attn.qkv", "dense"), ("attn/proj", "attn.proj", "dense"),
    ("norm2", "norm2", "norm"), ("mlp/fc1", "mlp.fc1", "dense"), ("mlp/fc2", "mlp.fc2", "dense"),
)


def _get(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _module_to_torch(module: Mapping[str, Any], kind: str) -> dict[str, np.ndarray]:
  if kind == "norm":
    return {"weight": np.asarray(module["scale"]), "bias": np.asarray(module["bias"])}
  return {"weight": np.asarray(module["kernel"]).T, "bias": np.asarray(module["bias"])}


def _module_from_torch(state: Mapping[str, np.ndarray], name: str, kind: str) -> dict[str, np.ndarray]:
  weight, bias = np.asarray(state[f"{name}.weight"]), np.asarray(state[f"{name}.bias"])
  if kind == "norm":
    return {"scale": weight, "bias": bias}
  return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}


def depth_of(params: Mapping[str, Any]) -> int:
  return len([name for name in params["encoder"] if name.startswith("blocks_")])


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


def timm_to_params(state: Mapping[str, np.ndarray], depth: int) -> dict[str, Any]:
  """The inverse of `params_to_timm` (every name must be present; extra names are the caller's to report)."""
  encoder: dict[str, Any] = {}
  for index in range(depth):
    block: dict[str, Any] = {}
    for ours, theirs, kind in BLOCK_TENSORS:
      node = block
      *parents, leaf = ours.split("/")
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = _module_from_torch(state, f"blocks.{index}.{theirs}", kind)
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
