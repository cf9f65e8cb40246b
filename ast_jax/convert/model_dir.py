"""The ast_jax model directory: weights plus everything needed to use them.

```
DIR/model.safetensors   parameters, flat keys joined by '/' ("encoder/blocks_0/attn/qkv/kernel"), float32
DIR/ast_jax.json        {"format": "ast_jax", "version": 1, "num_classes", "model": config.model,
                         "audio": config.audio (front end, target_length, mean, std), "label_names", "label_ids",
                         "packing": config.packing (models trained on packed rows only: row size, clips per row)}
```
Training writes one to `workdir/model/` at the end; `ast_jax.predict` and `ast_jax.convert` read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
METADATA = "ast_jax.json"


@dataclasses.dataclass
class ModelBundle:
  """Parameters (nested dict of numpy arrays) with the config that built them and the label names."""

  params: dict[str, Any]
  config: ml_collections.ConfigDict  # .model, .audio, .num_classes
  label_names: list[str]
  label_ids: list[str] = dataclasses.field(default_factory=list)  # e.g. AudioSet mids, when known


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for name, value in params.items():
    key = f"{prefix}{name}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, key + "/"))
    else:
      # Contiguous: safetensors writes an array's buffer as it lies in memory, so a transposed view would be
      # written in the wrong order.
      flat[key] = np.ascontiguousarray(value, np.float32)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  params: dict[str, Any] = {}
  for key, value in flat.items():
    node = params
    *parents, leaf = key.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return params


def bundle_config(model: Mapping[str, Any], audio: Mapping[str, Any], num_classes: int,
                  loss: str = "bce", packing: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A config with the sections a model directory carries, on top of the defaults (so every field exists).
  `loss` says how logits become scores: bce -> sigmoid, ce -> softmax. `packing`: the packing section of a model
  trained on packed rows (its family builds the model from it and predict packs files into such rows)."""
  from configs.common import base_config, packed_rows

  config = base_config()
  config.model.update(dict(model))
  config.audio.update(dict(audio))
  config.num_classes = int(num_classes)
  config.train.loss = loss
  if packing is not None:
    augment = config.augment.to_dict()
    packed_rows(config, **dict(packing))
    config.augment.update(augment)  # packed_rows turns off mixup and roll: a training matter, not the model's
  return config


def packing_of(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The packing section a model directory keeps (None for a model trained on whole-clip rows)."""
  if "packing" not in config:
    return None
  packing = config.packing.to_dict()
  packing["resolutions"] = list(packing["resolutions"])
  return packing


def save_safetensors(arrays: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> None:
  """Writes `arrays` to a .safetensors file readable as the umask allows (safetensors creates files 0600, so a
  shared model directory would be unreadable to the group)."""
  from safetensors.numpy import save_file

  save_file(arrays, path, metadata=metadata)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_model_dir(path: str, bundle: ModelBundle) -> None:
  os.makedirs(path, exist_ok=True)
  if len(bundle.label_names) != bundle.config.num_classes:
    raise ValueError(f"{len(bundle.label_names)} label names for {bundle.config.num_classes} classes")
  save_safetensors(flatten(bundle.params), os.path.join(path, WEIGHTS))
  metadata = {
      "format": "ast_jax", "version": FORMAT_VERSION, "num_classes": bundle.config.num_classes,
      "model": bundle.config.model.to_dict(), "audio": bundle.config.audio.to_dict(), "loss": bundle.config.train.loss,
      "label_names": list(bundle.label_names), "label_ids": list(bundle.label_ids),
  }
  if packing_of(bundle.config) is not None:
    metadata["packing"] = packing_of(bundle.config)
  with open(os.path.join(path, METADATA), "w") as handle:
    json.dump(metadata, handle, indent=2)


def load_model_dir(path: str) -> ModelBundle:
  """Reads a model directory; a training workdir (which holds one in `model/`) is accepted too."""
  from safetensors.numpy import load_file

  if not os.path.exists(os.path.join(path, METADATA)) and os.path.exists(os.path.join(path, "model", METADATA)):
    path = os.path.join(path, "model")
  elif not os.path.exists(os.path.join(path, METADATA)) and os.path.isdir(os.path.join(path, "checkpoints")):
    return load_training_checkpoint(path)
  metadata_path = os.path.join(path, METADATA)
  if not os.path.exists(metadata_path):
    raise FileNotFoundError(f"{path}: not an ast_jax model directory (no {METADATA})")
  with open(metadata_path) as handle:
    metadata = json.load(handle)
  if metadata.get("format") != "ast_jax" or metadata.get("version", 0) > FORMAT_VERSION:
    raise ValueError(f"{metadata_path}: unsupported format {metadata.get('format')!r} version "
                     f"{metadata.get('version')!r}")
  config = bundle_config(metadata["model"], metadata["audio"], metadata["num_classes"], metadata.get("loss", "bce"),
                         metadata.get("packing"))
  params = per_head_attention(unflatten(load_file(os.path.join(path, WEIGHTS))), config.model)
  return ModelBundle(params, config, list(metadata["label_names"]), list(metadata.get("label_ids", [])))


def per_head_attention(params: dict[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
  """Unscanned params as written by any version: attention kernels stored fused (`qkv` kernel [D, 3D], `proj`
  kernel [D, D], before they were split per head) are split into today's layout here, the one place files are read.
  `model` (config.model) gives the head count."""
  from ast_jax.convert.torch_layout import has_fused_attention, split_attention_heads

  if not has_fused_attention(params):
    return params
  from ast_jax.models.vit import VARIANTS

  num_heads = model.get("num_heads") or VARIANTS[model.get("variant") or "base"][2]
  return split_attention_heads(params, num_heads)


def load_training_checkpoint(workdir: str) -> ModelBundle:
  """The latest training checkpoint of a workdir (a run still going, or one from before `model/` existed), as the
  model of the phase that wrote it (a coarse phase's time pooling or patch)."""
  import jax
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  if not steps:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  latest = os.path.join(directory, str(steps[-1]))
  with open(os.path.join(latest, "meta", "metadata")) as handle:
    meta = json.load(handle)
  config = json.loads(meta.get("phase_config", meta["config"]))  # a coarse phase's checkpoint holds its model
  state = ocp.PyTreeCheckpointer().restore(os.path.join(latest, "state"))
  from ast_jax.models.layers import unscan_layers

  bundle = bundle_config({**config["model"], "scan_layers": False}, config["audio"], config["num_classes"],
                         config["train"]["loss"], config.get("packing"))
  params = per_head_attention(unscan_layers(jax.tree.map(np.asarray, state["params"])), bundle.model)
  return ModelBundle(params, bundle, list(meta["label_names"]))


def label_names_from_csv(path: str) -> tuple[list[str], list[str]]:
  """(display names, mids) of an AST label CSV."""
  from ast_jax.data.sources import read_label_csv

  mids, names = read_label_csv(path)
  return names, mids


def default_label_names(count: int, names: Sequence[str] | None = None) -> list[str]:
  return list(names) if names else [f"class_{index}" for index in range(count)]
