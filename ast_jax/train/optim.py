"""Optimiser and learning-rate schedules: upstream Adam with warm-up and per-epoch step decay, or cosine."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def upstream_step_schedule(lr: float, steps_per_epoch: int, *, warmup_steps: int, warmup_every: int,
                           decay_start_epoch: int, decay_every: int, decay_factor: float) -> Schedule:
  """lr(step) as upstream AST codes it.

  Warm-up: during the first `warmup_steps` steps the lr is set to (step / warmup_steps) * lr every `warmup_every`
  steps (so the first `warmup_every` steps run at lr 0, as upstream). Decay: torch MultiStepLR with milestones
  range(decay_start_epoch, inf, decay_every) stepped after each epoch, so epoch e (1-based) runs at
  lr * factor ** #{m : m <= e - 1}.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")

  def schedule(step):
    step = jnp.asarray(step)
    if warmup_steps > 0:
      held = (step // warmup_every) * warmup_every
      warmup = jnp.minimum(held, warmup_steps) / warmup_steps
    else:
      warmup = 1.0
    finished_epochs = step // steps_per_epoch
    decays = jnp.maximum(0, (finished_epochs - decay_start_epoch) // decay_every + 1)
    return lr * warmup * decay_factor ** decays

  return schedule


SCHEDULES = ("step", "cosine")  # config.optim.schedule
WEIGHT_DECAY_MODES = ("l2", "decoupled")  # config.optim.weight_decay_mode


def make_schedule(optim: Mapping[str, Any], steps_per_epoch: int, total_steps: int) -> Schedule:
  """The schedule `config.optim.schedule` names ('step' or 'cosine')."""
  if optim["schedule"] == "step":
    return upstream_step_schedule(
        optim["lr"], steps_per_epoch, warmup_steps=optim["warmup_steps"], warmup_every=optim["warmup_every"],
        decay_start_epoch=optim["decay_start_epoch"], decay_every=optim["decay_every"],
        decay_factor=optim["decay_factor"])
  if optim["schedule"] == "cosine":
    warmup = min(optim["warmup_steps"], max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim["lr"], warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=optim["lr"] * optim["min_lr_ratio"])
  raise ValueError(f"unknown schedule {optim['schedule']!r}; use 'step' or 'cosine'")


def make_optimizer(optim: Mapping[str, Any], schedule: Schedule) -> optax.GradientTransformation:
  """Adam with torch-style L2 weight decay (upstream) or decoupled decay (AdamW), optional global-norm clipping."""
  parts = []
  if optim["grad_clip_norm"]:
    parts.append(optax.clip_by_global_norm(optim["grad_clip_norm"]))
  mode = optim["weight_decay_mode"]
  if mode == "l2":
    # torch.optim.Adam(weight_decay=w) adds w * param to the gradient before the moments.
    if optim["weight_decay"]:
      parts.append(optax.add_decayed_weights(optim["weight_decay"]))
    parts.append(optax.scale_by_adam(b1=optim["b1"], b2=optim["b2"], eps=optim["eps"]))
  elif mode == "decoupled":
    parts.append(optax.scale_by_adam(b1=optim["b1"], b2=optim["b2"], eps=optim["eps"]))
    if optim["weight_decay"]:
      parts.append(optax.add_decayed_weights(optim["weight_decay"], mask=_decay_mask))
  else:
    raise ValueError(f"unknown weight_decay_mode {mode!r}; use 'l2' or 'decoupled'")
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


def _decay_mask(params):
  """AdamW decays matrices only: no biases, LayerNorm scales, tokens or positional embeddings."""
  import jax

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf.ndim >= 2 and "embed" not in jax.tree_util.keystr(path) and "token" not in
      jax.tree_util.keystr(path), params)
