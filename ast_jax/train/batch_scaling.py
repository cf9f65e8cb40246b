"""The global batch on many devices: the recipe's batch where it splits, else a per-device batch with the learning
rate scaled to it.

The paper recipes name a global batch tuned on one machine (AST on AudioSet: 12 clips, lr 1e-5). On a pod it does
not split: 12 clips over 256 chips is not a batch, and one clip per chip would leave each chip idle. When the
recipe's batch (`data.batch_size`, or `packing.rows` for packed rows) does not split evenly over the data-parallel
devices and the processes, and `batch_scaling.per_device` = n > 0, the run trains on n per data-parallel device
instead (global batch B = n x devices), and

- the learning rate follows B: `batch_scaling.lr_rule` 'sqrt' multiplies it by sqrt(B / B0) (B0: the recipe's
  batch), 'linear' by B / B0, 'none' keeps it. The recipes use 'sqrt': they train with Adam, for which the
  square-root rule keeps the update's noise scale as the batch grows (Malladi et al. 2022, "On the SDEs and
  scaling rules for adaptive gradient algorithms"; Granziol et al. 2022), whereas the linear rule (Goyal et al.
  2017) is derived for SGD and overshoots for Adam at hundreds of times the batch;
- the warm-up keeps its length in examples (warmup_steps x B0 / B) but lasts at least
  `batch_scaling.min_warmup_steps` updates: a few hundred small steps at the scaled rate, as large-batch training
  needs a gradual start (Goyal et al. 2017);
- the evaluation batch, when it does not split either, becomes n per device too.

Epoch-based schedules (the upstream per-epoch decay) need nothing more: steps per epoch follow from B. Where the
recipe's batch does split, nothing changes, so a workstation run reproduces the paper's batch exactly. With
`per_device` = 0 a batch that does not split stops the run before anything loads, naming the flags
(`config_checks.check_batch_divides`; `config_checks.batch_for_mesh` applies both, for the trainer and the
compiler).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ast_jax.models import family_of
from ast_jax.parallel import data_parallel_size

LR_RULES = ("sqrt", "linear", "none")  # config.batch_scaling.lr_rule


def batch_fields(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The config fields of the global train and eval batch: ('data.batch_size', 'data.eval_batch_size') for whole
  clips, ('packing.rows', 'packing.eval_rows') for packed rows."""
  if family_of(config).trains_packed(config):
    return "packing.rows", "packing.eval_rows"
  return "data.batch_size", "data.eval_batch_size"


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  section, name = field.split(".")
  return config[section][name]


def lr_factor(rule: str, batch: int, reference: int) -> float:
  if rule == "sqrt":
    return math.sqrt(batch / reference)
  if rule == "linear":
    return batch / reference
  if rule == "none":
    return 1.0
  raise ValueError(f"batch_scaling.lr_rule={rule!r} is not one of {LR_RULES}")


def scale_to_mesh(config: ml_collections.ConfigDict, mesh: Any, rules: Any = None, process_count: int = 1
                  ) -> tuple[ml_collections.ConfigDict, str | None]:
  """`config` with its batch, lr and warm-up for `mesh` (see the module docstring), and a line saying what changed
  (None when nothing did)."""
  devices = data_parallel_size(mesh, rules)
  unit = math.lcm(devices, process_count) * config.train.grad_accum_steps
  train_field, eval_field = batch_fields(config)
  batch = _get(config, train_field)
  per_device = config.batch_scaling.per_device
  if batch % unit == 0 or per_device <= 0:
    return config, None
  scaled = per_device * devices
  if scaled % unit:
    scaled = math.ceil(scaled / unit) * unit
  factor = lr_factor(config.batch_scaling.lr_rule, scaled, batch)
  config = ml_collections.ConfigDict(config.to_dict())  # a copy, unlocked: the caller's config stays as it was
  section, name = train_field.split(".")
  config[section][name] = scaled
  eval_batch = _get(config, eval_field)
  if eval_batch and eval_batch % math.lcm(devices, process_count):
    config[section][eval_field.split(".")[1]] = scaled
  lr, warmup = config.optim.lr, config.optim.warmup_steps
  config.optim.lr = lr * factor
  if warmup > 0:
    config.optim.warmup_steps = max(round(warmup * batch / scaled), config.batch_scaling.min_warmup_steps)
    config.optim.warmup_every = max(1, round(config.optim.warmup_every * batch / scaled))  # the stairs, in examples
  note = (f"{train_field}={batch} does not split over {devices} data-parallel devices: training on "
          f"{scaled // devices} per device ({train_field}={scaled}), optim.lr {lr:g} -> {config.optim.lr:.4g} "
          f"({config.batch_scaling.lr_rule} rule), optim.warmup_steps {warmup} -> {config.optim.warmup_steps} "
          "(batch_scaling in the config; docs in ast_jax/train/batch_scaling.py)")
  return config, note
