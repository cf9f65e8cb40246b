"""Analytic FLOP counts of the backbones; each family's `flops(config)` (models/<family>.py) applies them.

What is counted: matrix products only, a multiply-add as 2 FLOPs. Per example, with T tokens (patches + the 2
prefix tokens), width D, MLP width M:
- patch embedding: num_patches * patch_size^2 * D * 2 (one input channel);
- per block: qkv 2*T*D*3D, attention scores 2*T*T*D, attention-weighted sum 2*T*T*D, output projection 2*T*D*D,
  MLP 2 * 2*T*D*M;
- head: 2*D*classes.
Not counted: LayerNorm, softmax, GELU, biases, residual adds, the optimiser update, the front end. A train step is
3x the forward pass (the backward pass is 2x).

AuM (`aum_forward_flops_breakdown`), per token and layer, width D, d_inner E = 2D, state N, dt rank R, conv K:
in_proj 2*D*2E, conv 2*E*K, x_proj 2*E*(R + 2N), dt_proj 2*R*E, the scan 4*E*N per direction (the state update
a h + b and the C readout, a multiply-add each), out_proj 2*E*D; conv, x_proj and dt_proj twice where a variant
has a second branch (bi_bi, fo_fo). The exp of delta A and the other elementwise work are not counted,
though on a CPU they, not the projections, take most of an AuM step (docs/RESULTS.md). Rematerialised forward passes are not counted either: MFU counts
the model's FLOPs, not the hardware's, so remat lowers MFU rather than inflating it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ast_jax.audio.patches import patch_grid


def forward_flops_breakdown(*, width: int, depth: int, mlp_dim: int, num_tokens: int, patch_size: int | tuple[int, int],
                            num_patches: int, num_classes: int) -> dict[str, float]:
  """Forward FLOPs per example, by part: patch_embed, qkv, attention (scores + mix), proj, mlp, head.
  `patch_size`: one size (square), or (frequency, time) sizes."""
  tokens, width = float(num_tokens), float(width)
  patch_freq, patch_time = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
  return {
      "patch_embed": num_patches * patch_freq * patch_time * width * 2,
      "qkv": depth * 2 * tokens * width * 3 * width,
      "attention": depth * 2 * (2 * tokens * tokens * width),
      "proj": depth * 2 * tokens * width * width,
      "mlp": depth * 2 * 2 * tokens * width * mlp_dim,
      "head": 2 * width * num_classes,
  }


def aum_forward_flops_breakdown(*, width: int, depth: int, num_tokens: int, patch_size: int | tuple[int, int],
                                num_patches: int, num_classes: int, bidirectional: str = "fo_bi", d_state: int = 16,
                                d_conv: int = 4, expand: int = 2, dt_rank: int = 0) -> dict[str, float]:
  """AuM forward FLOPs per example, by part (module docstring)."""
  tokens, inner = float(num_tokens), float(expand * width)
  dt_rank = dt_rank or -(-width // 16)
  patch_freq, patch_time = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
  branches = 1 if bidirectional == "fo_bi" else 2  # separate conv/x_proj/dt_proj per direction
  return {
      "patch_embed": num_patches * patch_freq * patch_time * width * 2,
      "in_proj": depth * 2 * tokens * width * 2 * inner,
      "branch": depth * branches * 2 * tokens * inner * (d_conv + dt_rank + 2 * d_state + dt_rank),
      "scan": depth * 2 * 4 * tokens * inner * d_state,  # two directions
      "out_proj": depth * 2 * tokens * inner * width,
      "head": 2 * width * num_classes,
  }


def forward_flops(**shape: Any) -> float:
  """Forward-pass FLOPs per example (see the module docstring for what is counted; arguments as
  `forward_flops_breakdown`'s)."""
  return sum(forward_flops_breakdown(**shape).values())


def train_flops_per_example(**shape: Any) -> float:
  """Train-step FLOPs per example: forward + backward (2x forward); remat is not counted."""
  return 3 * forward_flops(**shape)


def summary(shape: dict[str, Any], *, freq: int, time: int, batch: int, train_flops: float | None = None,
            forward: float | None = None) -> dict[str, float]:
  """The dict every family's `flops(config)` returns: width, depth, mlp_dim, patch_size, freq, time, num_patches,
  tokens, forward_flops and train_flops (per example or packed row), tokens_per_step and train_flops_per_step (per
  global batch of `batch` examples or rows)."""
  forward = forward_flops(**shape) if forward is None else forward
  train = 3 * forward if train_flops is None else train_flops
  tokens = shape["num_tokens"]
  patch = shape["patch_size"]
  return dict(width=shape["width"], depth=shape["depth"], mlp_dim=shape.get("mlp_dim", 0),
              patch_size=patch if isinstance(patch, int) else patch[0], freq=freq, time=time,
              num_patches=shape["num_patches"], tokens=tokens, forward_flops=forward, train_flops=train,
              tokens_per_step=tokens * batch, train_flops_per_step=train * batch)


def flexi_mean(config: Any, shape: dict[str, Any], stored: tuple[int, int]) -> tuple[float, float]:
  """FlexiAST training: the expected tokens and train FLOPs per example over the drawn patch shapes, a step at a
  shape other than the stored one adding the stored shape's forward and backward when flexi_base_weight > 0."""
  from ast_jax.models.flexi import flexi_patch_probs, flexi_patch_sizes

  def at(patch: tuple[int, int]) -> tuple[int, float]:
    freq, time = patch_grid(config.audio.num_mel_bins, config.audio.target_length, patch)
    tokens = freq * time + 2
    return tokens, train_flops_per_example(**{**shape, "num_tokens": tokens, "patch_size": patch,
                                              "num_patches": freq * time})

  base = at(stored) if config.model.get("flexi_base_weight", 0.0) else (0, 0.0)
  costs = [np.add(at(patch), base if patch != stored else (0, 0.0)) for patch in flexi_patch_sizes(config)]
  tokens, flops = np.average(costs, axis=0, weights=flexi_patch_probs(config))
  return float(tokens), float(flops)
