"""Audio Mamba (AuM) classifier in plain PyTorch, under upstream's state-dict names (kaistmm/Audio-Mamba-AuM).

Upstream runs on the CUDA-only `mamba_ssm` kernels; this module reimplements the same network with ordinary torch
ops (a sequential float32 selective scan), so weights exported from our JAX model run on CPU and can be compared
number for number with it. Inference only: no dropout, no drop-path, no fused kernels.

Data flow: spectrogram [batch, frames, mel_bins] -> image [batch, 1, mel_bins, frames] -> conv patches (frequency-major
tokens) -> CLS token(s) + learned positions -> `depth` RMSNorm + bidirectional Mamba blocks -> final RMSNorm ->
pooled CLS (or mean) -> linear head.

Bidirectional variants (upstream `bimamba_type` in brackets):
  fo_bi (v1): one conv/x_proj/dt_proj; the backward scan reuses them on the flipped sequence with its own `A_b_log`.
  bi_bi (v2): a full second branch (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`) on the flipped sequence.
  fo_fo (v1_2): the same second branch as bi_bi, but run forward (unflipped).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

BIDIRECTIONAL = ("fo_bi", "bi_bi", "fo_fo")
CLS_POSITIONS = ("head", "middle", "tail", "head_tail", "none")


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
  """Sequential selective scan, float32. Returns y [batch, length, d_inner].

  u, delta: [batch, length, d_inner]; A: [d_inner, d_state]; B, C: [batch, length, d_state]; D: [d_inner].
  h_l = exp(delta_l A) h_{l-1} + delta_l u_l B_l;  y_l = <h_l, C_l> + D u_l.
  """
  u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
  decay = torch.exp(delta[..., None] * A)  # [batch, length, d_inner, d_state]
  drive = (delta * u)[..., None] * B[:, :, None, :]
  state = torch.zeros_like(decay[:, 0])
  outputs = []
  for step in range(u.shape[1]):
    state = decay[:, step] * state + drive[:, step]
    outputs.append(torch.einsum("bdn,bn->bd", state, C[:, step]))
  return torch.stack(outputs, dim=1) + D * u


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * weight, in float32 (upstream `mamba_ssm` RMSNorm, weight only)."""

  def __init__(self, dim: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


def _causal_conv(channels: int, kernel: int) -> nn.Conv1d:
  # Depthwise; padded by kernel-1 on both sides and cut back to the first `length` outputs, as upstream does.
  return nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=True)


def _s4d_real_log(d_inner: int, d_state: int) -> torch.Tensor:
  return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


class Mamba(nn.Module):
  """Bidirectional Mamba mixer: [batch, length, d_model] -> [batch, length, d_model]."""

  def __init__(self, d_model: int, bidirectional: str = "fo_bi", d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: int = 0):
    super().__init__()
    if bidirectional not in BIDIRECTIONAL:
      raise ValueError(f"bidirectional must be one of {BIDIRECTIONAL}, got {bidirectional!r}")
    self.bidirectional, self.d_state = bidirectional, d_state
    self.d_inner = expand * d_model
    self.dt_rank = dt_rank or math.ceil(d_model / 16)
    self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
    self.conv1d = _causal_conv(self.d_inner, d_conv)
    self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
    self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
    self.A_log = nn.Parameter(_s4d_real_log(self.d_inner, d_state))
    self.D = nn.Parameter(torch.ones(self.d_inner))
    self.A_b_log = nn.Parameter(_s4d_real_log(self.d_inner, d_state))
    if bidirectional != "fo_bi":
      self.conv1d_b = _causal_conv(self.d_inner, d_conv)
      self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
      self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner)
      self.D_b = nn.Parameter(torch.ones(self.d_inner))
    self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

  def _scan_inputs(self, x: torch.Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear,
                   dt_proj: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x [batch, length, d_inner] -> u, delta [batch, length, d_inner]; B, C [batch, length, d_state]."""
    length = x.shape[1]
    u = F.silu(conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
    dt_low, B, C = x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
    delta = F.softplus(dt_proj(dt_low).float())  # the dt bias sits inside the softplus
    return u, delta, B, C

  def _branch(self, x: torch.Tensor, z: torch.Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
              A_log: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    u, delta, B, C = self._scan_inputs(x, conv1d, x_proj, dt_proj)
    return selective_scan(u, delta, -torch.exp(A_log.float()), B, C, D) * F.silu(z.float())

  def forward(self, hidden: torch.Tensor) -> torch.Tensor:
    x, z = self.in_proj(hidden).chunk(2, dim=-1)
    if self.bidirectional == "fo_bi":
      u, delta, B, C = self._scan_inputs(x, self.conv1d, self.x_proj, self.dt_proj)
      y_forward = selective_scan(u, delta, -torch.exp(self.A_log.float()), B, C, self.D) * F.silu(z.float())
      # The backward scan shares u, delta, B, C and D with the forward one; only A differs.
      u_b, delta_b, B_b, C_b = (t.flip(1) for t in (u, delta, B, C))
      y_backward = selective_scan(u_b, delta_b, -torch.exp(self.A_b_log.float()), B_b, C_b, self.D)
      y = y_forward + (y_backward * F.silu(z.flip(1).float())).flip(1)
    else:
      y_forward = self._branch(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
      second = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b)
      if self.bidirectional == "bi_bi":
        y_second = self._branch(x.flip(1), z.flip(1), *second).flip(1)
      else:
        y_second = self._branch(x, z, *second)
      y = (y_forward + y_second) / 2
    return self.out_proj(y.to(self.out_proj.weight.dtype))


class Block(nn.Module):
  """Upstream's "add -> norm -> mixer" block; the residual stream is kept in float32."""

  def __init__(self, dim: int, norm_eps: float, **mixer_kwargs):
    super().__init__()
    self.norm = RMSNorm(dim, norm_eps)
    self.mixer = Mamba(dim, **mixer_kwargs)

  def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    residual = hidden.float() if residual is None else residual + hidden.float()
    return self.mixer(self.norm(residual).to(hidden.dtype)), residual


class PatchEmbed(nn.Module):
  """[batch, 1, mel_bins, frames] -> tokens [batch, patches, dim], frequency-major (index f * T' + t)."""

  def __init__(self, dim: int, patch_size: tuple[int, int], strides: tuple[int, int]):
    super().__init__()
    self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=strides)

  def forward(self, image: torch.Tensor) -> torch.Tensor:
    return self.proj(image).flatten(2).transpose(1, 2)


class PositionEmbedding(nn.Module):
  """Learned table [1, n_prefix + patches, dim]; CLS rows first, whatever the CLS tokens' sequence positions."""

  def __init__(self, rows: int, dim: int):
    super().__init__()
    self.pos_embed = nn.Parameter(torch.zeros(1, rows, dim))


class AudioMamba(nn.Module):
  """AuM classifier: spectrogram [batch, frames, mel_bins] -> logits [batch, num_classes]."""

  def __init__(self, num_classes: int, embed_dim: int, depth: int = 24, mel_bins: int = 128, frames: int = 1024,
               patch_size: tuple[int, int] = (16, 16), strides: tuple[int, int] = (16, 16),
               bidirectional: str = "fo_bi", cls_position: str = "middle", d_state: int = 16, d_conv: int = 4,
               expand: int = 2, dt_rank: int = 0, norm_eps: float = 1e-5):
    super().__init__()
    if bidirectional not in BIDIRECTIONAL:
      raise ValueError(f"bidirectional must be one of {BIDIRECTIONAL}, got {bidirectional!r}")
    if cls_position not in CLS_POSITIONS:
      raise ValueError(f"cls_position must be one of {CLS_POSITIONS}, got {cls_position!r}")
    self.cls_position = cls_position
    self.patch_grid = ((mel_bins - patch_size[0]) // strides[0] + 1, (frames - patch_size[1]) // strides[1] + 1)
    self.num_patches = self.patch_grid[0] * self.patch_grid[1]
    self.n_prefix = {"head_tail": 2, "none": 0}.get(cls_position, 1)
    self.patch_embed = PatchEmbed(embed_dim, tuple(patch_size), tuple(strides))
    if cls_position == "head_tail":
      self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim))
      self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim))
    elif cls_position != "none":
      self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = PositionEmbedding(self.n_prefix + self.num_patches, embed_dim)
    mixer = dict(bidirectional=bidirectional, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
    self.layers = nn.ModuleList(Block(embed_dim, norm_eps, **mixer) for _ in range(depth))
    self.norm_f = RMSNorm(embed_dim, norm_eps)
    self.head = nn.Linear(embed_dim, num_classes)

  @property
  def cls_index(self) -> int:
    """Sequence index of the single CLS token (head/middle/tail)."""
    return {"head": 0, "middle": self.num_patches // 2, "tail": self.num_patches}[self.cls_position]

  def _sequence_pos_embed(self) -> torch.Tensor:
    # Upstream moves the CLS token(s) to the front to add the table; reordering the table's rows is the same sum.
    table = self.pos_embed.pos_embed
    if self.cls_position == "head_tail":
      return torch.cat([table[:, :1], table[:, 2:], table[:, 1:2]], dim=1)
    if self.cls_position == "none":
      return table
    p = self.cls_index
    return torch.cat([table[:, 1:1 + p], table[:, :1], table[:, 1 + p:]], dim=1)

  def embed(self, spectrogram: torch.Tensor) -> torch.Tensor:
    """[batch, frames, mel_bins] -> tokens with CLS and positions [batch, n_prefix + patches, dim]."""
    x = self.patch_embed(spectrogram.transpose(1, 2).unsqueeze(1))
    batch = x.shape[0]
    if self.cls_position == "head_tail":
      x = torch.cat([self.cls_token_head.expand(batch, -1, -1), x, self.cls_token_tail.expand(batch, -1, -1)], 1)
    elif self.cls_position != "none":
      p = self.cls_index
      x = torch.cat([x[:, :p], self.cls_token.expand(batch, -1, -1), x[:, p:]], dim=1)
    return x + self._sequence_pos_embed()

  def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
    """[batch, frames, mel_bins] -> pooled embedding [batch, dim] (CLS token(s), or the mean without one)."""
    hidden, residual = self.embed(spectrogram), None
    for layer in self.layers:
      hidden, residual = layer(hidden, residual)
    out = self.norm_f(residual + hidden.float())
    if self.cls_position == "head_tail":
      return (out[:, 0] + out[:, -1]) / 2
    if self.cls_position == "none":
      return out.mean(dim=1)
    return out[:, self.cls_index]

  def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
    """[batch, frames, mel_bins] -> logits [batch, num_classes]."""
    return self.head(self.forward_features(spectrogram).to(self.head.weight.dtype))

  @classmethod
  def from_state_dict(cls, state: Mapping[str, torch.Tensor], *, bidirectional: str | None = None,
                      cls_position: str | None = None, mel_bins: int = 128, frames: int | None = None,
                      patch_size: tuple[int, int] | None = None, strides: tuple[int, int] | None = None,
                      **kwargs) -> AudioMamba:
    """Builds an AudioMamba sized from an upstream-named state dict, loads it strictly, returns it in eval mode.

    Sizes (embed_dim, depth, classes, patch size, d_state, d_conv, expand, dt_rank) come from the tensors. The
    tensors cannot tell apart: which of head/middle/tail a single `cls_token` sits at (pass `cls_position`, default
    "middle"), and bi_bi from fo_fo (same parameters; default bi_bi, pass `bidirectional="fo_fo"` for the other).
    `frames` defaults to the smallest length whose patch grid matches the `pos_embed` rows, given `mel_bins`,
    `strides` (default: the patch size) and the patch size (default: the conv kernel).
    """
    state = strip_module_prefix(state)
    weight = state["patch_embed.proj.weight"]  # [dim, 1, patch_freq, patch_time]
    embed_dim, kernel = weight.shape[0], tuple(weight.shape[2:])
    if patch_size is not None and tuple(patch_size) != kernel:
      raise ValueError(f"patch_size {tuple(patch_size)} does not match the conv kernel {kernel}")
    patch_size = kernel
    strides = tuple(strides or patch_size)
    cls_position = _cls_position_of(state, cls_position)
    bidirectional = _bidirectional_of(state, bidirectional)
    if frames is None:
      n_prefix = {"head_tail": 2, "none": 0}.get(cls_position, 1)
      freq_patches = (mel_bins - patch_size[0]) // strides[0] + 1
      num_patches = state["pos_embed.pos_embed"].shape[1] - n_prefix
      if num_patches % freq_patches:
        raise ValueError(f"{num_patches} position rows do not fill {freq_patches} frequency patches; pass mel_bins")
      frames = (num_patches // freq_patches - 1) * strides[1] + patch_size[1]
    d_inner, dt_rank = state["layers.0.mixer.dt_proj.weight"].shape
    sizes = dict(
        num_classes=state["head.weight"].shape[0], embed_dim=embed_dim,
        depth=1 + max(int(m.group(1)) for key in state if (m := re.match(r"layers\.(\d+)\.", key))),
        d_state=state["layers.0.mixer.A_log"].shape[1], d_conv=state["layers.0.mixer.conv1d.weight"].shape[-1],
        expand=d_inner // embed_dim, dt_rank=dt_rank)
    model = cls(**{**sizes, **kwargs}, mel_bins=mel_bins, frames=frames, patch_size=patch_size, strides=strides,
                bidirectional=bidirectional, cls_position=cls_position)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _cls_position_of(state: Mapping[str, torch.Tensor], requested: str | None) -> str:
  found = "head_tail" if "cls_token_head" in state else "single" if "cls_token" in state else "none"
  if found == "single":
    requested = requested or "middle"
    if requested not in ("head", "middle", "tail"):
      raise ValueError(f"state has one cls_token; cls_position must be head/middle/tail, got {requested!r}")
    return requested
  if requested is not None and requested != found:
    raise ValueError(f"state implies cls_position {found!r}, got {requested!r}")
  return found


def _bidirectional_of(state: Mapping[str, torch.Tensor], requested: str | None) -> str:
  if "layers.0.mixer.A_b_log" not in state:
    raise ValueError("no layers.0.mixer.A_b_log: only bidirectional AuM (fo_bi, bi_bi, fo_fo) is supported")
  if "layers.0.mixer.conv1d_b.weight" not in state:
    found = ("fo_bi",)
  else:
    found = ("bi_bi", "fo_fo")
  if requested is None:
    return found[0]
  if requested not in found:
    raise ValueError(f"state implies bidirectional in {found}, got {requested!r}")
  return requested


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Drops a leading `module.` from every key (checkpoints saved from nn.DataParallel)."""
  return {key.removeprefix("module."): value for key, value in state.items()}


def count_parameters(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())
