"""Scanned <-> unscanned encoder layouts.

Unscanned (the canonical layout, which every file format uses): `encoder/blocks_0 ... blocks_{depth-1}`.
Scanned (`config.model.scan_layers`): one `encoder/blocks` whose leaves are stacked on a leading `[depth]` axis.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

_BLOCK = re.compile(r"blocks_(\d+)$")


def is_scanned(params: Mapping[str, Any]) -> bool:
  return "blocks" in params.get("encoder", {})


def unscan_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`encoder/blocks` with `[depth, ...]` leaves -> `encoder/blocks_{i}`; unscanned input is returned as is."""
  if not is_scanned(params):
    return dict(params)
  encoder = {name: value for name, value in params["encoder"].items() if name != "blocks"}
  stacked = params["encoder"]["blocks"]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for index in range(depth):
    encoder[f"blocks_{index}"] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
  return {**params, "encoder": encoder}


def scan_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """`encoder/blocks_{i}` -> `encoder/blocks` with leaves stacked on a leading `[depth]` axis (host arrays)."""
  if is_scanned(params) or "encoder" not in params:  # a model without stacked blocks has one layout
    return dict(params)
  indices = sorted(int(_BLOCK.match(name).group(1)) for name in params["encoder"] if _BLOCK.match(name))
  if indices != list(range(len(indices))):
    raise ValueError(f"encoder blocks are not numbered 0..{len(indices) - 1}: {indices}")
  blocks = [params["encoder"][f"blocks_{index}"] for index in indices]
  encoder = {name: value for name, value in params["encoder"].items() if not _BLOCK.match(name)}
  encoder["blocks"] = jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *blocks)
  return {**params, "encoder": encoder}


def to_layout(params: Mapping[str, Any], scanned: bool) -> dict[str, Any]:
  return scan_layers(params) if scanned else unscan_layers(params)
