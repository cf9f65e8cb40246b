"""Checks a config before anything is loaded, so a bad value fails at once with a message naming the field."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import ml_collections

from ast_jax.audio.fbank import WINDOW_TYPES
from ast_jax.audio.features import TIME_POOLS
from ast_jax.audio.patches import patch_of, strides_of
from ast_jax.data.packed_batches import CROPS
from ast_jax.data.packer import METHODS as PACKING_METHODS
from ast_jax.data.scan import BAD_AUDIO_MODES, SCAN_MODES
from ast_jax.data.sources import SOURCES
from ast_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from ast_jax.models.family import FLEXI_PATCH, PACKED_ROWS, TIME_COMPRESSION, Family, families_with, family_of
from ast_jax.models.flexi import FLEXI_AXES, flexi_shape
from ast_jax.models.stack import REMAT_POLICIES
from ast_jax.models.vit import DTYPES
from ast_jax.parallel import data_parallel_size
from ast_jax.train.losses import LOSSES
from ast_jax.train.batch_scaling import LR_RULES, scale_to_mesh
from ast_jax.train.metrics import METRICS
from ast_jax.train.optim import SCHEDULES, WEIGHT_DECAY_MODES
from ast_jax.train.phases import phases_problems

log = logging.getLogger(__name__)

# Each field's choices, as the module that reads the field names them.
CHOICES = {
    "data.source": SOURCES,
    "data.on_bad_audio": BAD_AUDIO_MODES,
    "data.scan": SCAN_MODES,
    "audio.window_type": WINDOW_TYPES,
    "model.dtype": tuple(DTYPES),
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "model.remat": tuple(REMAT_POLICIES),
    "optim.schedule": SCHEDULES,
    "optim.weight_decay_mode": WEIGHT_DECAY_MODES,
    "train.loss": LOSSES,
    "train.main_metric": METRICS,
    "batch_scaling.lr_rule": LR_RULES,
}
POSITIVE = ("num_classes", "data.batch_size", "train.epochs", "audio.target_length", "audio.num_mel_bins",
            "audio.sample_rate", "audio.frame_length", "audio.frame_shift", "audio.std", "optim.lr",
            "train.keep_checkpoints", "train.log_every_steps", "train.eval_every_epochs", "model.patch_size",
            "model.fstride", "model.tstride", "train.grad_accum_steps")
UNIT_INTERVAL = ("augment.mixup", "train.label_smoothing", "optim.b1", "optim.b2")


class ConfigError(ValueError):
  """A config field with an invalid value; the message lists every such field."""


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every invalid field of `config`."""
  problems = []
  for field, choices in CHOICES.items():
    if _get(config, field) not in choices:
      problems.append(f"{field}={_get(config, field)!r} is not one of {choices}")
  for field in POSITIVE:
    if not _get(config, field) > 0:
      problems.append(f"{field}={_get(config, field)!r} must be positive")
  for field in UNIT_INTERVAL:
    if not 0 <= _get(config, field) <= 1:
      problems.append(f"{field}={_get(config, field)!r} must lie in [0, 1]")
  for field in ("augment.freq_mask", "augment.time_mask", "data.num_workers", "train.checkpoint_every_steps",
                "train.max_steps", "train.peak_flops", "train.max_consecutive_skips", "batch_scaling.per_device",
                "batch_scaling.min_warmup_steps"):
    if _get(config, field) < 0:
      problems.append(f"{field}={_get(config, field)!r} must not be negative")
  first, last = config.train.average_weights
  if (first, last) != (0, 0) and not 1 <= first <= last:
    problems.append(f"train.average_weights={(first, last)} must be (0, 0) or 1 <= first <= last")
  if first > config.train.epochs:
    problems.append(f"train.average_weights starts at epoch {first}, after the last epoch {config.train.epochs}")
  patch_freq, patch_time = patch_of(config.model)
  if config.audio.target_length < patch_time or config.audio.num_mel_bins < patch_freq:
    problems.append(f"audio.target_length={config.audio.target_length} x audio.num_mel_bins="
                    f"{config.audio.num_mel_bins} is smaller than one {patch_freq}x{patch_time} patch (mel bins x "
                    "frames), so the patch grid is empty: raise audio.target_length / audio.num_mel_bins or lower "
                    "model.patch_size / patch_time")
  if config.augment.freq_mask > config.audio.num_mel_bins:
    problems.append(f"augment.freq_mask={config.augment.freq_mask} exceeds audio.num_mel_bins")
  if config.augment.time_mask > config.audio.target_length:
    problems.append(f"augment.time_mask={config.augment.time_mask} exceeds audio.target_length")
  problems += _mesh_problems(config)
  problems += _data_problems(config)
  problems += _sweep_problems(config)
  try:
    family = family_of(config)
  except ValueError as error:
    problems.append(str(error))
  else:
    problems += family.problems(config)
    if "packing" in config and not family.trains_packed(config):
      packers = ("elastic",) + families_with(PACKED_ROWS)
      problems.append(f"a packing section needs a model family that trains on packed rows ({', '.join(packers)}); "
                      f"model.name={config.model.name!r} does not: remove it or change the model")
    elif "packing" in config:
      problems += _packing_problems(config)
    problems += _tensor_problems(config, family)
    problems += _flexi_problems(config, family)
    problems += _front_end_problems(config, family)
    problems += phases_problems(config)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _front_end_problems(config: ml_collections.ConfigDict, family: Family) -> list[str]:
  """Time pooling (valid values, at least one patch left after pooling); a run patch only from a 'patch' phase."""
  audio, model, problems = config.audio, config.model, []
  pool, factor = audio.get("time_pool", "none"), audio.get("time_pool_factor", 1)
  if pool not in TIME_POOLS or not (isinstance(factor, int) and factor >= 1):
    problems.append(f"audio.time_pool={pool!r} / time_pool_factor={factor!r}: the pool is one of {TIME_POOLS} and "
                    "the factor a positive int")
  elif pool != "none" and TIME_COMPRESSION not in family.options:
    problems.append(f"audio.time_pool needs a model family that takes compressed input "
                    f"({', '.join(families_with(TIME_COMPRESSION))}); model.name={model.name!r} does not")
  if tuple(model.get("run_patch", ())):
    problems.append("model.run_patch is set by a 'patch' phase of train.phases; to train at another patch shape, "
                    "set model.patch_size / patch_time")
  elif not problems and pool != "none":
    try:
      family.flops(config)  # the patch grid of the pooled input
    except ValueError as error:
      problems.append(f"model input: {error}")
  return problems


def _tensor_problems(config: ml_collections.ConfigDict, family: Family) -> list[str]:
  """Tensor parallelism splits attention heads: the head count must divide over the mesh's tensor axis."""
  tensor = dict(config.mesh).get("tensor", 1)
  if not (isinstance(tensor, int) and tensor > 1):
    return []
  try:
    heads = family.kwargs(config).get("num_heads")
  except ValueError:
    return []  # named by the family's own checks
  if heads and heads % tensor:
    return [f"config.mesh.tensor={tensor} does not divide the model's {heads} attention heads (tensor parallelism "
            "splits heads): choose a tensor size that divides the head count, or another variant"]
  return []


def check_data_paths(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the `--config.data.*` flag of every data path the source needs that does not exist,
  before a run creates anything (the compile command, which reads no data, does not call it)."""
  data, problems = config.data, []
  if data.source == "datafile":
    needed = [("train_datafile", data.get("train_datafile")), ("label_csv", data.get("label_csv"))]
    needed += [("eval_datafile", data.eval_datafile)] if data.get("eval_datafile") else []
    for field, path in needed:
      if not path or not os.path.isfile(path):
        problems.append(f"data.{field}={path!r} is not a file: set --config.data.{field}=PATH")
  elif data.source in ("folder", "esc50", "speechcommands") and not os.path.isdir(data.get("path") or ""):
    problems.append(f"data.path={data.get('path')!r} is not a folder: set --config.data.path=DIR (the "
                    f"{data.source} data set's root)")
  if problems:
    raise ConfigError("the data is not where the config says:\n  " + "\n  ".join(problems))


def _packing_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The packing section of any family that trains on packed rows (configs.common.packed_rows): sizes, choices,
  token dropout, resolutions, a row that holds the longest clip, no mixup or roll."""
  packing = config.packing
  patch, patch_time = patch_of(config.model)
  problems = [f"packing.{field}={packing[field]!r} must be positive"
              for field in ("rows", "row_tokens", "max_clips", "max_frames") if not packing[field] > 0]
  for field, choices in (("method", PACKING_METHODS), ("crop", CROPS)):
    if packing[field] not in choices:
      problems.append(f"packing.{field}={packing[field]!r} is not one of {choices}")
  if not 0.0 <= packing.drop_rate < 1.0:
    problems.append(f"packing.drop_rate={packing.drop_rate!r} must lie in [0, 1)")
  if not packing.resolutions or any(not q >= 1.0 for q in packing.resolutions):
    problems.append(f"packing.resolutions={tuple(packing.resolutions)!r} must be frame-shift multipliers q >= 1")
  if packing.eval_rows < 0 or packing.min_crop_frames < 0:
    problems.append("packing.eval_rows and packing.min_crop_frames must not be negative")
  if packing.max_frames >= patch_time:
    longest = (config.audio.num_mel_bins // patch) * (packing.max_frames // patch_time)
    if longest > packing.row_tokens:
      problems.append(f"packing.row_tokens={packing.row_tokens} cannot hold the longest clip ({longest} tokens at "
                      f"packing.max_frames={packing.max_frames}): raise row_tokens or lower max_frames")
  else:
    problems.append(f"packing.max_frames={packing.max_frames} is shorter than one {patch_time}-frame patch")
  if config.augment.mixup > 0 or config.augment.roll > 0:
    problems.append("augment.mixup and augment.roll must be 0 for packed clips of their own length")
  return problems


def _data_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The bad-data limits: a positive channel count, and sample rates as positive ints (empty: any rate)."""
  max_channels, rates = config.data.get("max_channels", 2), tuple(config.data.get("sample_rates", ()))
  problems = []
  if not (isinstance(max_channels, int) and max_channels > 0):
    problems.append(f"data.max_channels={max_channels!r} must be a positive int")
  if not all(isinstance(rate, int) and rate > 0 for rate in rates):
    problems.append(f"data.sample_rates={rates!r} must be positive ints in Hz (empty: any rate)")
  return problems


def _mesh_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The mesh's axis names and sizes, and the rules table's shape (device counts are checked at start-up)."""
  problems = []
  sizes = dict(config.mesh)
  if set(sizes) != {"data", "fsdp", "tensor"}:
    problems.append(f"config.mesh={sizes} must name exactly the axes data, fsdp and tensor")
  elif list(sizes.values()).count(-1) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    problems.append(f"config.mesh={sizes}: sizes must be positive, with at most one -1 (every remaining device)")
  axes = {"data", "fsdp", "tensor"}
  for rule in config.sharding_rules:
    name, target = rule if len(rule) == 2 else (rule, "?")
    targets = target if isinstance(target, (tuple, list)) else (target,)
    if not isinstance(name, str) or any(axis is not None and axis not in axes for axis in targets):
      problems.append(f"config.sharding_rules entry {tuple(rule)!r} must map a logical name to None or to mesh "
                      f"axes among {sorted(axes)}")
  return problems


def _sweep_problems(config: ml_collections.ConfigDict) -> list[str]:
  sweep = config.get("eval_sweep")
  if sweep is None:
    return []
  problems = [f"eval_sweep.lengths={tuple(sweep.lengths)!r}: every length must be a whole number of frames >= "
              f"model.patch_size ({config.model.patch_size})"
              for length in sweep.lengths if int(length) != length or length < patch_of(config.model)[1]][:1]
  if any(not q >= 1.0 for q in sweep.resolutions):
    problems.append(f"eval_sweep.resolutions={tuple(sweep.resolutions)!r}: each q must be >= 1 (frame shift "
                    "audio.frame_shift * q)")
  return problems


def _flexi_problems(config: ml_collections.ConfigDict, family: Family) -> list[str]:
  """FlexiAST training and patch-size sweeps: an AST with non-overlapping patches, every size fitting the input."""
  model = config.model
  train_sizes, eval_sizes = tuple(model.get("flexi_patch_sizes", ())), tuple(config.get("eval_patch_sizes", ()))
  problems = []
  base_weight = model.get("flexi_base_weight", 0.0)
  if not 0.0 <= base_weight < 1.0:
    problems.append(f"model.flexi_base_weight={base_weight!r} must be in [0, 1)")
  if (base_weight or model.get("flexi_distill", False)) and not train_sizes:
    problems.append("model.flexi_base_weight / flexi_distill apply to FlexiAST training: set "
                    "model.flexi_patch_sizes")
  if model.get("flexi_distill", False) and not base_weight:
    problems.append("model.flexi_distill learns from the stored size's predictions: set model.flexi_base_weight > 0")
  weights = tuple(model.get("flexi_patch_weights", ()))
  if weights and (len(weights) != len(train_sizes) or not all(w >= 0 for w in weights) or not sum(weights) > 0):
    problems.append(f"model.flexi_patch_weights={weights!r} must be {len(train_sizes)} non-negative weights (one per "
                    "model.flexi_patch_sizes entry), not all zero")
  if not (train_sizes or eval_sizes):
    return problems
  if model.get("flexi_axes", "both") not in FLEXI_AXES:
    problems.append(f"model.flexi_axes={model.flexi_axes!r} is not one of {FLEXI_AXES}")
  if FLEXI_PATCH not in family.options:
    problems.append(f"model.flexi_patch_sizes and eval_patch_sizes need a model family that runs at any patch size "
                    f"({', '.join(families_with(FLEXI_PATCH))}); model.name={model.name!r} does not")
  patch_time = patch_of(model)[1]
  if strides_of(model) != patch_of(model):
    problems.append(f"model.flexi_patch_sizes / eval_patch_sizes need non-overlapping patches: set model.fstride="
                    f"{model.patch_size} and model.tstride={patch_time} (now {model.fstride}, {model.tstride})")
  for size in train_sizes + eval_sizes:
    freq = flexi_shape(config, size)[0] if isinstance(size, int) else size
    fits = freq <= config.audio.num_mel_bins and size <= config.audio.target_length
    if not (isinstance(size, int) and size > 0) or not fits:
      problems.append(f"patch size {size!r} (model.flexi_patch_sizes / eval_patch_sizes) must be a positive int "
                      f"that fits {config.audio.num_mel_bins} mel bins x {config.audio.target_length} frames")
  return problems


def batch_for_mesh(config: ml_collections.ConfigDict, mesh: Any, rules: Any = None, process_count: int = 1
                   ) -> tuple[ml_collections.ConfigDict, str | None]:
  """`scale_to_mesh`, its note logged, then `check_batch_divides`: the batch a run on `mesh` trains with, or a
  ConfigError naming the flags. The trainer and `python -m ast_jax.compile` both start here."""
  config, note = scale_to_mesh(config, mesh, rules, process_count)
  if note:
    log.info("%s", note)
  check_batch_divides(config, mesh, rules, process_count)
  return config, note


def check_batch_divides(config: ml_collections.ConfigDict, mesh: Any, rules: Any = None,
                        process_count: int | None = None) -> None:
  """The global batch must split evenly over the data-parallel devices, the processes and the micro-batches."""
  dp, accum = data_parallel_size(mesh, rules), config.train.grad_accum_steps
  processes = jax.process_count() if process_count is None else process_count
  if family_of(config).trains_packed(config):  # the batch is packed rows of clips
    sizes = (("packing.rows", config.packing.rows),
             ("packing.eval_rows", config.packing.eval_rows or config.packing.rows))
  else:
    sizes = (("data.batch_size", config.data.batch_size),
             ("data.eval_batch_size", config.data.eval_batch_size or config.data.batch_size))
  for name, size in sizes:
    unit = math.lcm(dp, processes)
    if size % unit:
      raise ConfigError(f"config.{name}={size} does not split evenly over the {dp} data-parallel devices (mesh "
                        f"{dict(mesh.shape)}) and {processes} process(es): set it to a multiple of {unit} "
                        f"(e.g. --config.{name}={max(unit, size // unit * unit)}), train on a batch per device "
                        "(e.g. --config.batch_scaling.per_device=8: ast_jax/train/batch_scaling.py), or change "
                        "config.mesh")
  unit = accum * dp
  name, size = sizes[0]
  if size % unit:
    raise ConfigError(f"config.{name}={size} does not split into grad_accum_steps={accum} micro-batches over {dp} "
                      f"data-parallel devices: set it to a multiple of {unit} (e.g. --config.{name}="
                      f"{max(unit, size // unit * unit)}) or change train.grad_accum_steps")
