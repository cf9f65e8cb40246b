"""Hugging Face `ASTForAudioClassification` directories: model.safetensors + config.json + preprocessor_config.json.

Weights are written under the names of the published checkpoints (`audio_spectrogram_transformer.encoder.layer.{i}.
attention.attention.query`, ...), which every transformers release loads; reading also accepts the newer in-memory
names (`layers.{i}.attention.q_proj`, ...). Numerics: HF has one LayerNorm epsilon for backbone and head (1e-12
in the published checkpoints); an import sets both of ours to it, an export writes our backbone's (the head's
1e-5 vs 1e-6 moves logits by about 1e-6).

An AST whose family runs at any patch (FlexiAST: the `flexi_patch` option) exports at another square patch P
(`save_hf(..., patch=P)`, `convert --patch_size=P`): the model `model.apply(..., patch=(P, P))` runs, stored at P
(`at_patch`). HF's ASTConfig holds one square patch size and a stride per axis; each stride is the model's scaled
with the patch (stride * P / stored side, a whole number), so an overlapping model keeps its overlap ratio.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from ast_jax.convert import torch_layout
from ast_jax.convert.model_dir import ModelBundle, bundle_config, save_safetensors

PREFIX = "audio_spectrogram_transformer."
# timm name under blocks.{i}. -> HF name under encoder.layer.{i}.
BLOCK_NAMES = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
TOP_NAMES = {
    "cls_token": "embeddings.cls_token", "dist_token": "embeddings.distillation_token",
    "pos_embed": "embeddings.position_embeddings", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias", "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
HEAD_NAMES = {"mlp_head.0": "classifier.layernorm", "mlp_head.1": "classifier.dense"}
# Newer transformers' in-memory names -> the published ones.
MODERN_TO_PUBLISHED = (
    (r"\.layers\.(\d+)\.", r".encoder.layer.\1."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."), (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


def timm_to_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in state.items():
    if name in TOP_NAMES:
      out[PREFIX + TOP_NAMES[name]] = value
      continue
    head = re.match(r"(mlp_head\.\d)\.(weight|bias)$", name)
    if head:
      out[f"{HEAD_NAMES[head.group(1)]}.{head.group(2)}"] = value
      continue
    index, rest, suffix = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", name).groups()
    layer = f"{PREFIX}encoder.layer.{index}."
    if rest == "attn.qkv":  # rows [q; k; v]
      for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        out[f"{layer}attention.attention.{part}.{suffix}"] = np.ascontiguousarray(chunk)
    else:
      out[f"{layer}{BLOCK_NAMES[rest]}.{suffix}"] = value
  return out


def hf_to_timm(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Published or modern HF names -> timm names. Unknown names are kept as they are (reported unused later)."""
  published = {}
  for name, value in state.items():
    for pattern, replacement in MODERN_TO_PUBLISHED:
      name = re.sub(pattern, replacement, name)
    published[name] = np.asarray(value, np.float32)
  inverse_top = {PREFIX + hf: timm for timm, hf in TOP_NAMES.items()}
  inverse_head = {hf: timm for timm, hf in HEAD_NAMES.items()}
  inverse_block = {hf: timm for timm, hf in BLOCK_NAMES.items()}
  out, qkv = {}, {}
  for name, value in published.items():
    if name in inverse_top:
      out[inverse_top[name]] = value
      continue
    head = re.match(r"(classifier\.(?:layernorm|dense))\.(weight|bias)$", name)
    block = re.match(re.escape(PREFIX) + r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if head:
      out[f"{inverse_head[head.group(1)]}.{head.group(2)}"] = value
    elif block and block.group(2).startswith("attention.attention."):
      qkv.setdefault((block.group(1), block.group(3)), {})[block.group(2).rsplit(".", 1)[1]] = value
    elif block and block.group(2) in inverse_block:
      out[f"blocks.{block.group(1)}.{inverse_block[block.group(2)]}.{block.group(3)}"] = value
    else:
      out[name] = value
  for (index, suffix), parts in qkv.items():
    out[f"blocks.{index}.attn.qkv.{suffix}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
  return out


def hf_config(bundle: ModelBundle) -> dict[str, Any]:
  model, audio = bundle.config.model, bundle.config.audio
  if audio.get("time_pool", "none") != "none":
    raise ValueError(f"this model reads spectrograms pooled {audio.time_pool_factor}x along time "
                     f"(audio.time_pool={audio.time_pool!r}), which Hugging Face's AST feature extractor cannot do")
  from ast_jax.audio.patches import patch_of, strides_of

  (patch, patch_time), (fstride, tstride) = patch_of(model), strides_of(model)
  if patch != patch_time:
    raise ValueError(f"Hugging Face's ASTConfig holds square patches only; this model stores {patch}x{patch_time} "
                     "patches (mel bins x frames): export it at a square --patch_size=P")
  params = bundle.params
  width = params["cls_token"].shape[-1]
  return {
      "architectures": ["ASTForAudioClassification"], "model_type": "audio-spectrogram-transformer",
      "hidden_size": int(width), "num_hidden_layers": torch_layout.depth_of(params),
      "num_attention_heads": torch_layout.heads_of(params),
      "intermediate_size": int(params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"].shape[1]),
      "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "layer_norm_eps": float(model.layer_norm_eps), "qkv_bias": True,
      "patch_size": patch, "frequency_stride": fstride, "time_stride": tstride,
      "max_length": int(audio.target_length), "num_mel_bins": int(audio.num_mel_bins),
      "id2label": {str(i): name for i, name in enumerate(bundle.label_names)},
      "label2id": {name: i for i, name in enumerate(bundle.label_names)},
  }


def preprocessor_config(bundle: ModelBundle) -> dict[str, Any]:
  audio = bundle.config.audio
  return {
      "feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "sampling_rate": int(audio.sample_rate),
      "num_mel_bins": int(audio.num_mel_bins), "max_length": int(audio.target_length), "do_normalize": True,
      "mean": float(audio.mean), "std": float(audio.std), "padding_value": 0.0, "return_attention_mask": False,
  }


def square_patch_size(text: str) -> int:
  """`--patch_size`: one positive integer P (P x P patches; 'PxP' is accepted). A rectangle, zero, a negative or
  anything else raises ValueError naming the flag."""
  sizes = [size.strip() for size in re.split(r"[x,]", str(text).strip().lower())]
  if len(sizes) not in (1, 2) or not all(re.fullmatch(r"[+-]?\d+", size) for size in sizes):
    raise ValueError(f"--patch_size={text}: not a patch size; give one positive integer P (P x P patches)")
  values = {int(size) for size in sizes}
  if len(values) > 1:
    raise ValueError(f"--patch_size={text}: Hugging Face's ASTConfig holds square patches only; give one size P "
                     "(P mel bins x P frames)")
  size = values.pop()
  if size < 1:
    raise ValueError(f"--patch_size={text}: a patch size must be a positive integer")
  return size


def at_patch(bundle: ModelBundle, patch: int | Sequence[int]) -> ModelBundle:
  """The bundle re-expressed at `patch` (freq, time; an int is square): the model that `model.apply(...,
  patch=patch)` runs on `audio.target_length` frames, storing that patch. Kernel PI-resized (models/flexi.py),
  strides scaled with the patch (audio/patches.py:scaled_strides), positional table resized from the stored grid to
  the new one as models/ast.py resizes it at run time (rule 'antialias'). The bundle itself at its own patch.

  Raises ValueError for a family without the `flexi_patch` option, a non-positive patch, a patch larger than the
  spectrogram, or one that scales a stride to a fraction of a bin or frame."""
  from ast_jax.audio.patches import as_patch, patch_grid, patch_of, scaled_strides, strides_of
  from ast_jax.models.family import FLEXI_PATCH, families_with, family_of
  from ast_jax.models.flexi import resize_patch_kernel
  from ast_jax.models.positions import resize_table

  family, new = family_of(bundle.config), as_patch(patch)
  if FLEXI_PATCH not in family.options:
    raise ValueError(f"patch size {new[0]}x{new[1]}: {family.name!r} models run only at the patch they store; "
                     f"families that run at any patch ({FLEXI_PATCH}): {', '.join(families_with(FLEXI_PATCH))}")
  model, audio = bundle.config.model, bundle.config.audio
  own, strides = patch_of(model), strides_of(model)
  if new == own:
    return bundle
  try:
    new_strides = scaled_strides(own, strides, new)
    own_grid = patch_grid(audio.num_mel_bins, audio.target_length, own, strides)
    new_grid = patch_grid(audio.num_mel_bins, audio.target_length, new, new_strides)
  except ValueError as error:
    raise ValueError(f"patch size {new[0]}x{new[1]}: {error}") from None
  params = dict(bundle.params)
  proj = params["patch_embed"]["proj"]
  kernel = resize_patch_kernel(np.asarray(proj["kernel"], np.float32), new)
  params["patch_embed"] = {**params["patch_embed"], "proj": {**proj, "kernel": kernel}}
  table = resize_table(np.asarray(params["pos_embed"], np.float32), own_grid, new_grid, rule="antialias")
  params["pos_embed"] = np.asarray(table, np.float32)
  config = copy.deepcopy(bundle.config)
  config.model.update(patch_size=new[0], fstride=new_strides[0], tstride=new_strides[1])
  if new[0] != new[1] or "patch_time" in config.model:
    config.model.patch_time = 0 if new[0] == new[1] else new[1]
  if "run_patch" in config.model:
    config.model.run_patch = ()  # the stored patch is now the one it named
  return ModelBundle(params, config, list(bundle.label_names), list(bundle.label_ids))


def save_hf(path: str, bundle: ModelBundle, patch: int | None = None) -> None:
  """Writes `bundle` as a Hugging Face AST directory; `patch` P: at P x P patches (`at_patch`), else at its own."""
  from ast_jax.models.family import family_of

  family = family_of(bundle.config)
  if "hf" not in family.weight_formats:
    raise ValueError(f"Hugging Face's ASTForAudioClassification holds AST models, not {family.name!r} ones; "
                     f"{family.name!r} models export with " + " or ".join(f"--to={f}" for f in family.weight_formats))
  if patch is not None:
    bundle = at_patch(bundle, square_patch_size(str(patch)))
  hf_config(bundle)  # a model HF cannot hold fails before anything is written
  os.makedirs(path, exist_ok=True)
  state = timm_to_hf(torch_layout.params_to_timm(bundle.params))
  save_safetensors(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  for name, content in (("config.json", hf_config(bundle)), ("preprocessor_config.json", preprocessor_config(bundle))):
    with open(os.path.join(path, name), "w") as handle:
      json.dump(content, handle, indent=2)


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
  if os.path.exists(os.path.join(path, "model.safetensors")):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))
  if os.path.exists(os.path.join(path, "pytorch_model.bin")):
    torch = torch_layout.require_torch(f"reading {os.path.join(path, 'pytorch_model.bin')}")
    state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    return {name: tensor.float().numpy() for name, tensor in state.items()}
  raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def load_hf(path: str) -> tuple[ModelBundle, list[str]]:
  """A Hugging Face AST directory -> (bundle, names of unused checkpoint tensors)."""
  with open(os.path.join(path, "config.json")) as handle:
    config = json.load(handle)
  preprocessor = {}
  if os.path.exists(os.path.join(path, "preprocessor_config.json")):
    with open(os.path.join(path, "preprocessor_config.json")) as handle:
      preprocessor = json.load(handle)
  width, heads = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
  if config.get("intermediate_size", 4 * width) % width:
    raise ValueError(f"{path}: intermediate_size {config['intermediate_size']} is not a multiple of hidden_size")
  eps = config.get("layer_norm_eps", 1e-12)
  model = dict(name="ast", variant="", width=width, depth=config.get("num_hidden_layers", 12), num_heads=heads,
               mlp_ratio=config.get("intermediate_size", 4 * width) // width, patch_size=config.get("patch_size", 16),
               fstride=config.get("frequency_stride", 10), tstride=config.get("time_stride", 10),
               layer_norm_eps=eps, head_layer_norm_eps=eps)
  id2label = config.get("id2label") or {}
  num_classes = len(id2label) or int(config.get("num_labels", 527))
  labels = [id2label.get(str(i), id2label.get(i, f"class_{i}")) for i in range(num_classes)]
  audio = dict(sample_rate=preprocessor.get("sampling_rate", 16000),
               num_mel_bins=config.get("num_mel_bins", preprocessor.get("num_mel_bins", 128)),
               target_length=config.get("max_length", preprocessor.get("max_length", 1024)),
               mean=preprocessor.get("mean", -4.2677393), std=preprocessor.get("std", 4.5689974))
  state = hf_to_timm(read_hf_weights(path))
  depth = model["depth"]
  expected = torch_layout.timm_names(depth)
  missing = sorted(expected - set(state))
  if missing:
    raise ValueError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  params = torch_layout.timm_to_params(state, depth, heads)
  bundle = ModelBundle(params, bundle_config(model, audio, num_classes), labels)
  return bundle, sorted(set(state) - expected)
