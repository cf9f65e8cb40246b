"""ElasticAST in plain PyTorch (inference only): runs weights exported from our JAX model.

`python -m ast_jax.convert --from=ast_jax --to=torch SRC DST` writes
```
DST/model.safetensors  float32 tensors under the names below
DST/config.json        {"format": "elastic_ast_torch", "version": 1, "model": ElasticAST(**model)'s arguments,
                        "label_names", "label_ids", "scores" (sigmoid | softmax), "audio": the front end
                        (config.audio), "packing": the packing the model was trained with (max_frames, resolutions)}
```
and `ElasticAST.from_pretrained(DST)` runs it. Names: `patch_embed.proj` (a Conv2d `[width, 1, patch_freq,
patch_time]`, applied to non-overlapping patches), `pos_embed_freq` `[freq_patches, width]`, `pos_embed_time`
`[time_patches, width]`, timm's ViT blocks (`blocks.{i}.norm1`, `.attn.qkv`, `.attn.proj`, `.norm2`, `.mlp.fc1`,
`.mlp.fc2`; `norm`), the attention pool (`pool.query` `[1, 1, width]`, `pool.q`, `pool.k`, `pool.v`, `pool.proj`)
and upstream AST's head (`mlp_head.0` LayerNorm, `mlp_head.1` Linear).

Data flow as `ast_jax/models/elastic.py`: packed slots `[rows, clips, frames, mel_bins]` + the packer's layout ->
patches gathered into rows `[rows, row_tokens, patch_freq * patch_time]` -> linear embedding + frequency and time
positions (integer rows, or fractional: each clip spans the time table) -> pre-LN blocks, attention masked to each
token's own clip -> one pooled vector per clip -> LayerNorm + Linear -> logits `[rows, clips, classes]`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT, FORMAT_VERSION = "elastic_ast_torch", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"
POOLING, POSITIONS = ("attention", "mean"), ("integer", "fractional")


def patchify(spectrogram: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
  """`[..., frames, mel_bins]` -> `[..., freq * time, patch_freq * patch_time]`, frequency-major; each vector is a
  patch's [mel, frame] values (frames and mel bins past whole patches are dropped)."""
  patch_freq, patch_time = patch
  *lead, frames, mel_bins = spectrogram.shape
  freq, time = mel_bins // patch_freq, frames // patch_time
  x = spectrogram[..., :time * patch_time, :freq * patch_freq].reshape(*lead, time, patch_time, freq, patch_freq)
  x = x.movedim((-4, -3, -2, -1), (-3, -1, -4, -2))  # [..., freq, time, patch (mel), patch (frames)]
  return x.reshape(*lead, freq * time, patch_freq * patch_time)


def fractional_rows(table: torch.Tensor, positions: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
  """Rows of `table` `[size, width]` for position p of a clip `extents` patches long, the clip spanning the whole
  table (coordinate (p + 0.5) * size / extent - 0.5, linear between rows): `[...]` -> `[..., width]`."""
  size = table.shape[0]
  coordinate = (positions.float() + 0.5) * size / extents.clamp(min=1).float() - 0.5
  coordinate = coordinate.clamp(0.0, size - 1.0)
  low = coordinate.floor().long()
  high = (low + 1).clamp(max=size - 1)
  weight = (coordinate - low.float())[..., None]
  return table[low] * (1.0 - weight) + table[high] * weight


class Attention(nn.Module):
  """timm's fused-qkv self-attention; `mask` `[rows, 1, tokens, tokens]` (True = may attend)."""

  def __init__(self, width: int, num_heads: int, scale_logits: bool = True):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, width // num_heads
    # Upstream ElasticAST's released weights were trained without 1/sqrt(head_dim).
    self.scale = self.head_dim**-0.5 if scale_logits else 1.0
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rows, length, width = tokens.shape
    qkv = self.qkv(tokens).reshape(rows, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    mixed = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, scale=self.scale)
    return self.proj(mixed.transpose(1, 2).reshape(rows, length, width))


class Mlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(tokens)))  # exact (erf) GELU, as models/vit.py


class Block(nn.Module):
  """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, eps: float, scale_logits: bool):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
    self.attn = Attention(width, num_heads, scale_logits)
    self.mlp = Mlp(width, mlp_dim)

  def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tokens = tokens + self.attn(self.norm1(tokens), mask)
    return tokens + self.mlp(self.norm2(tokens))


class ClipAttentionPool(nn.Module):
  """One learned query per clip attends (multi-head, scaled) to that clip's tokens: `[rows, clips, width]`."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads, self.head_dim = num_heads, width // num_heads
    self.query = nn.Parameter(torch.zeros(1, 1, width))
    self.q, self.k, self.v, self.proj = (nn.Linear(width, width) for _ in range(4))

  def forward(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """tokens `[rows, row_tokens, width]`, slots `[rows, clips, row_tokens]` (True: the token is the clip's)."""
    rows, clips, _ = slots.shape

    def heads(x: torch.Tensor) -> torch.Tensor:  # [rows, length, width] -> [rows, heads, length, head_dim]
      return x.reshape(rows, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    query = heads(self.q(self.query.expand(rows, clips, -1)))
    key, value = heads(self.k(tokens)), heads(self.v(tokens))
    logits = (query * self.head_dim**-0.5) @ key.transpose(-1, -2)  # [rows, heads, clips, row_tokens]
    # The most negative finite logit, as Flax: an empty slot averages every token instead of giving NaN.
    logits = logits.masked_fill(~slots[:, None], torch.finfo(logits.dtype).min)
    mixed = (logits.softmax(-1) @ value).transpose(1, 2).reshape(rows, clips, -1)
    return self.proj(mixed)


def masked_mean(tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
  """`[rows, clips, width]`: each clip's mean token (zeros for an empty slot)."""
  weights = slots.float()
  return (weights @ tokens.float()) / weights.sum(-1, keepdim=True).clamp(min=1.0)


class ElasticAST(nn.Module):
  """`forward(spectrogram, segment_ids, freq_positions, time_positions, time_patches)`: packed slots
  `[rows, clips, frames, mel_bins]` + the packer's layout -> logits `[rows, clips, classes]` (empty slots give
  meaningless logits); `forward(spectrogram)`: single clips `[batch, frames, mel_bins]` -> logits `[batch, classes]`.
  Inputs may be tensors or NumPy arrays."""

  def __init__(self, num_classes: int, width: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: int = 4,
               patch_size: int = 16, patch_time: int = 0, max_freq_patches: int = 8, max_time_patches: int = 64,
               pooling: str = "attention", positions: str = "integer", scale_logits: bool = True,
               layer_norm_eps: float = 1e-6, head_layer_norm_eps: float = 1e-5):
    super().__init__()
    if pooling not in POOLING or positions not in POSITIONS:
      raise ValueError(f"pooling {pooling!r} / positions {positions!r}: choose from {POOLING} / {POSITIONS}")
    self.patch = (patch_size, patch_time or patch_size)
    self.pooling, self.positions = pooling, positions
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(1, width, kernel_size=self.patch, stride=self.patch)
    self.pos_embed_freq = nn.Parameter(torch.zeros(max_freq_patches, width))
    self.pos_embed_time = nn.Parameter(torch.zeros(max_time_patches, width))
    self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio * width, layer_norm_eps, scale_logits)
                                for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
    if pooling == "attention":
      self.pool = ClipAttentionPool(width, num_heads)
    self.mlp_head = nn.Sequential(nn.LayerNorm(width, eps=head_layer_norm_eps), nn.Linear(width, num_classes))
    self.label_names: list[str] = []
    self.audio: dict[str, Any] = {}  # the front end the model was trained on (config.json "audio")

  def forward(self, spectrogram: Any, segment_ids: Any = None, freq_positions: Any = None, time_positions: Any = None,
              time_patches: Any = None) -> torch.Tensor:
    spectrogram = torch.as_tensor(spectrogram, dtype=self.pos_embed_time.dtype, device=self.pos_embed_time.device)
    if segment_ids is None:
      if spectrogram.ndim != 3:
        raise ValueError(f"single clips are [batch, frames, mel_bins], not {tuple(spectrogram.shape)}; packed slots "
                         "[rows, clips, frames, mel_bins] need segment_ids, freq_positions, time_positions and "
                         "time_patches")
      return self.forward_patches(patchify(spectrogram, self.patch), *self._whole_clips(spectrogram))[:, 0]
    if spectrogram.ndim != 4:
      raise ValueError(f"packed slots are [rows, clips, frames, mel_bins], not {tuple(spectrogram.shape)}")
    layout = self._layout(segment_ids, freq_positions, time_positions, time_patches)
    if tuple(layout[3].shape) != tuple(spectrogram.shape[:2]):
      raise ValueError(f"time_patches {tuple(layout[3].shape)} must be the slots' [rows, clips] = "
                       f"{tuple(spectrogram.shape[:2])}")
    return self.forward_patches(self._gather(spectrogram, *layout[:3]), *layout)

  def _whole_clips(self, spectrogram: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The layout of one clip per row `[batch, frames, mel_bins]`: every patch, frequency-major."""
    batch, frames, mel_bins = spectrogram.shape
    freq, time = mel_bins // self.patch[0], frames // self.patch[1]
    if not freq or not time:
      raise ValueError(f"a clip of {frames} frames x {mel_bins} mel bins is smaller than one {self.patch[0]} x "
                       f"{self.patch[1]} patch (mel bins x frames)")
    grid = torch.arange(freq * time, device=spectrogram.device).expand(batch, -1)
    return torch.ones_like(grid), grid // time, grid % time, torch.full_like(grid[:, :1], time)

  def _gather(self, spectrogram: torch.Tensor, segment_ids: torch.Tensor, freq_positions: torch.Tensor,
              time_positions: torch.Tensor) -> torch.Tensor:
    """Packed rows `[rows, row_tokens, patch_freq * patch_time]` from slots `[rows, clips, frames, mel_bins]`, as
    models/tokens.py:gather_packed (zeros on padding)."""
    rows, clips, frames, mel_bins = spectrogram.shape
    freq, time = mel_bins // self.patch[0], frames // self.patch[1]
    real = segment_ids > 0
    if ((freq_positions >= freq) & real).any() or ((time_positions >= time) & real).any():
      raise ValueError(f"the layout points past the slots' {freq} x {time} patch grid ({mel_bins} mel bins x "
                       f"{frames} frames)")
    index = ((segment_ids - 1).clamp(min=0) * freq + freq_positions) * time + time_positions
    flat = patchify(spectrogram, self.patch).reshape(rows, clips * freq * time, -1)
    gathered = flat.gather(1, (index * real)[..., None].expand(-1, -1, flat.shape[-1]))
    return gathered * real[..., None]

  def forward_patches(self, patches: Any, segment_ids: Any, freq_positions: Any, time_positions: Any,
                      time_patches: Any) -> torch.Tensor:
    """patches `[rows, row_tokens, patch_freq * patch_time]` (`patchify`'s order) with segment ids (0 = padding) and
    in-clip positions `[rows, row_tokens]`, each clip's time extent in patches `time_patches` `[rows, clips]` ->
    logits `[rows, clips, classes]`."""
    pooled = self.embed_clips(patches, segment_ids, freq_positions, time_positions, time_patches)
    return self.mlp_head(pooled)

  def embed_clips(self, patches: Any, segment_ids: Any, freq_positions: Any, time_positions: Any,
                  time_patches: Any) -> torch.Tensor:
    """As `forward_patches`, the pooled embedding `[rows, clips, width]` before the head."""
    weight = self.patch_embed.proj.weight
    patches = torch.as_tensor(patches, dtype=weight.dtype, device=weight.device)
    segment_ids, freq_positions, time_positions, time_patches = self._layout(
        segment_ids, freq_positions, time_positions, time_patches)
    self._check_tables(patches, segment_ids, freq_positions, time_positions)
    real = segment_ids > 0
    # Padding tokens' positions may hold anything; no real token sees them.
    freq_positions, time_positions = freq_positions * real, time_positions * real
    tokens = F.linear(patches, weight.flatten(1), self.patch_embed.proj.bias)
    if self.positions == "fractional":
      extents = time_patches.gather(1, (segment_ids - 1).clamp(min=0))
      time_rows = fractional_rows(self.pos_embed_time, time_positions, extents)
    else:
      time_rows = self.pos_embed_time[time_positions]
    tokens = tokens + (self.pos_embed_freq[freq_positions] + time_rows)
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # padding attends to padding only
    for block in self.blocks:
      tokens = block(tokens, mask)
    tokens = self.norm(tokens)
    clip_ids = torch.arange(1, time_patches.shape[1] + 1, device=segment_ids.device)
    slots = segment_ids[:, None, :] == clip_ids[None, :, None]  # [rows, clips, row_tokens]
    return self.pool(tokens, slots) if self.pooling == "attention" else masked_mean(tokens, slots)

  def _layout(self, *layout: Any) -> tuple[torch.Tensor, ...]:
    """(segment_ids, freq_positions, time_positions `[rows, row_tokens]`, time_patches `[rows, clips]`) as long
    tensors on the model's device; one clear error when they do not fit each other."""
    if any(values is None for values in layout):
      raise ValueError("packed rows need all of segment_ids, freq_positions, time_positions and time_patches")
    segment_ids, freq_positions, time_positions, time_patches = (
        torch.as_tensor(values, dtype=torch.long, device=self.pos_embed_time.device) for values in layout)
    shapes = [tuple(x.shape) for x in (segment_ids, freq_positions, time_positions)]
    rows_match = time_patches.ndim == 2 and time_patches.shape[:1] == segment_ids.shape[:1]
    if segment_ids.ndim != 2 or len(set(shapes)) != 1 or not rows_match:
      raise ValueError(f"segment_ids, freq_positions, time_positions {shapes} must share one [rows, row_tokens] shape "
                       f"and time_patches {tuple(time_patches.shape)} be [rows, clips]")
    if (segment_ids < 0).any() or (segment_ids > time_patches.shape[1]).any():
      raise ValueError(f"segment_ids must lie in 0 ... {time_patches.shape[1]} (0: padding; k: clip slot k of "
                       "time_patches)")
    if (((freq_positions < 0) | (time_positions < 0)) & (segment_ids > 0)).any():
      raise ValueError("a clip's freq_positions and time_positions must not be negative")
    return segment_ids, freq_positions, time_positions, time_patches

  def _check_tables(self, patches: torch.Tensor, segment_ids: torch.Tensor, freq_positions: torch.Tensor,
                    time_positions: torch.Tensor) -> None:
    """One clear error for patches that do not fit the layout, or positions past the tables."""
    expected = (*segment_ids.shape, self.patch[0] * self.patch[1])
    if tuple(patches.shape) != expected:
      raise ValueError(f"patches {tuple(patches.shape)} must be [rows, row_tokens, patch_freq * patch_time] = "
                       f"{expected}")
    real = segment_ids > 0
    freq_rows, time_rows = self.pos_embed_freq.shape[0], self.pos_embed_time.shape[0]
    if ((freq_positions >= freq_rows) & real).any():
      raise ValueError(f"a frequency position is past the table's {freq_rows} rows: the model takes "
                       f"{freq_rows * self.patch[0]} mel bins")
    if self.positions == "integer" and ((time_positions >= time_rows) & real).any():
      raise ValueError(f"a time position is past the table's {time_rows} rows: cut clips to {time_rows} time patches "
                       f"({time_rows * self.patch[1]} frames)")

  @classmethod
  def from_pretrained(cls, path: str, map_location: str = "cpu") -> ElasticAST:
    """The model an export directory holds (`config.json` + `model.safetensors`), loaded strictly, in eval mode."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG)
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"{path}: not an ElasticAST PyTorch export (no {CONFIG})")
    with open(config_path) as handle:
      config = json.load(handle)
    if config.get("format") != FORMAT or config.get("version", 0) > FORMAT_VERSION:
      raise ValueError(f"{config_path}: format {config.get('format')!r} version {config.get('version')!r} is not "
                       f"{FORMAT!r} version <= {FORMAT_VERSION}")
    model = cls(**config["model"])
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS), device=map_location), strict=True)
    model.label_names, model.audio = list(config.get("label_names", [])), dict(config.get("audio", {}))
    return model.to(map_location).eval()


# Export: our Linen parameters -> the names above (NumPy; the JAX side is imported only here).

def _linear(module: dict[str, Any], prefix: str) -> dict[str, Any]:
  """A Dense(General) `kernel [*in, *out]`, `bias [*out]` -> `weight [out, in]`, `bias [out]` (C-order)."""
  bias = np.asarray(module["bias"])
  return {f"{prefix}.weight": np.asarray(module["kernel"]).reshape(-1, bias.size).T, f"{prefix}.bias": bias.ravel()}


def _norm(module: dict[str, Any], prefix: str) -> dict[str, Any]:
  return {f"{prefix}.weight": module["scale"], f"{prefix}.bias": module["bias"]}


def state_dict_of(params: dict[str, Any], patch: tuple[int, int]) -> dict[str, Any]:
  """ElasticAST params (scanned or not) -> {name: float32 array} under this module's names."""
  from ast_jax.convert.torch_layout import BLOCK_TENSORS
  from ast_jax.models.layers import unscan_layers

  params = unscan_layers(params)
  kernel = np.asarray(params["patch_embed"]["kernel"])  # [patch_freq * patch_time, width]
  state = {"patch_embed.proj.weight": kernel.T.reshape(-1, 1, *patch), "patch_embed.proj.bias":
           params["patch_embed"]["bias"], "pos_embed_freq": params["pos_embed_freq"],
           "pos_embed_time": params["pos_embed_time"]}
  blocks = sorted(int(name.split("_")[1]) for name in params["encoder"] if name.startswith("blocks_"))
  for index in blocks:
    for ours, theirs, kind in BLOCK_TENSORS:
      module = params["encoder"][f"blocks_{index}"]
      for part in ours.split("/"):
        module = module[part]
      convert = _norm if kind == "norm" else _linear
      state.update(convert(module, f"blocks.{index}.{theirs}"))
  state.update(_norm(params["encoder"]["norm"], "norm"))
  if "pool" in params:
    state["pool.query"] = params["pool"]["query"]
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "proj")):
      state.update(_linear(params["pool"]["attention"][ours], f"pool.{theirs}"))
  state.update(_norm(params["head"]["norm"], "mlp_head.0"))
  state.update(_linear(params["head"]["dense"], "mlp_head.1"))
  return {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}


def model_kwargs(config: Any, params: dict[str, Any]) -> dict[str, Any]:
  """`ElasticAST(**kwargs)` for a model directory's config; the tables' sizes are read from the weights."""
  from ast_jax.models.elastic import ElasticAST as LinenElasticAST
  from ast_jax.models.vit import vit_kwargs

  linen = LinenElasticAST(num_classes=config.num_classes, **vit_kwargs(config.model, LinenElasticAST))
  kwargs = {name: getattr(linen, name) for name in (
      "num_classes", "width", "depth", "num_heads", "mlp_ratio", "patch_size", "patch_time", "pooling", "positions",
      "scale_logits", "layer_norm_eps", "head_layer_norm_eps")}
  kwargs.update(max_freq_patches=int(params["pos_embed_freq"].shape[0]),
                max_time_patches=int(params["pos_embed_time"].shape[0]))
  return {name: value.item() if hasattr(value, "item") else value for name, value in kwargs.items()}


def save_pretrained(path: str, bundle: Any) -> None:
  """Writes an ElasticAST `ModelBundle` (convert/model_dir.py) as `path/model.safetensors` + `path/config.json`."""
  from ast_jax.convert.model_dir import packing_of, save_safetensors
  from ast_jax.models.elastic import ElasticAST as LinenElasticAST
  from ast_jax.models.family import family_of

  family = family_of(bundle.config)
  if family.model is not LinenElasticAST:
    raise ValueError(f"the PyTorch export holds ElasticAST models, not {family.name!r} ones")
  kwargs = model_kwargs(bundle.config, bundle.params)
  if len(bundle.label_names) != kwargs["num_classes"]:
    raise ValueError(f"{len(bundle.label_names)} label names for {kwargs['num_classes']} classes")
  os.makedirs(path, exist_ok=True)
  patch = (kwargs["patch_size"], kwargs["patch_time"] or kwargs["patch_size"])
  save_safetensors(state_dict_of(bundle.params, patch), os.path.join(path, WEIGHTS), metadata={"format": "pt"})
  config = {
      "format": FORMAT, "version": FORMAT_VERSION, "model": kwargs, "label_names": list(bundle.label_names),
      "label_ids": list(bundle.label_ids), "scores": "softmax" if bundle.config.train.loss == "ce" else "sigmoid",
      "audio": bundle.config.audio.to_dict(), "packing": packing_of(bundle.config),
  }
  with open(os.path.join(path, CONFIG), "w") as handle:
    json.dump(config, handle, indent=2)
