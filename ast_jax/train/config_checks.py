"""Checks a config before anything is loaded, so a bad value fails at once with a message naming the field."""

from __future__ import annotations

from typing import Any

import ml_collections

from ast_jax.train.phases import phases_problems

CHOICES = {
    "data.source": ("demo", "folder", "datafile", "esc50", "speechcommands"),
    "data.on_bad_audio": ("error", "skip"),
    "data.scan": ("header", "decode", "off"),
    "audio.window_type": ("hanning", "hamming", "povey", "rectangular", "blackman"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla", "blockwise", "cudnn"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "optim.schedule": ("step", "cosine"),
    "optim.weight_decay_mode": ("l2", "decoupled"),
    "train.loss": ("bce", "ce"),
    "train.main_metric": ("accuracy", "mAP", "mAUC", "d_prime"),
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
                "train.max_steps", "train.peak_flops", "train.max_consecutive_skips"):
    if _get(config, field) < 0:
      problems.append(f"{field}={_get(config, field)!r} must not be negative")
  first, last = config.train.average_weights
  if (first, last) != (0, 0) and not 1 <= first <= last:
    problems.append(f"train.average_weights={(first, last)} must be (0, 0) or 1 <= first <= last")
  if first > config.train.epochs:
    problems.append(f"train.average_weights starts at epoch {first}, after the last epoch {config.train.epochs}")
  patch = config.model.patch_size
  if config.audio.target_length < patch or config.audio.num_mel_bins < patch:
    problems.append(f"audio.target_length={config.audio.target_length} x audio.num_mel_bins="
                    f"{config.audio.num_mel_bins} is smaller than one {patch}x{patch} patch, so the patch grid is "
                    "empty: raise audio.target_length / audio.num_mel_bins or lower model.patch_size")
  if config.augment.freq_mask > config.audio.num_mel_bins:
    problems.append(f"augment.freq_mask={config.augment.freq_mask} exceeds audio.num_mel_bins")
  if config.augment.time_mask > config.audio.target_length:
    problems.append(f"augment.time_mask={config.augment.time_mask} exceeds audio.target_length")
  problems += _mesh_problems(config)
  problems += _data_problems(config)
  problems += _sweep_problems(config)
  if config.model.get("name", "ast") not in ("ast", "elastic", "aum"):
    problems.append(f"model.name={config.model.name!r} is not one of ('ast', 'elastic', 'aum')")
  elif config.model.name == "elastic":
    problems += _packing_problems(config)
  elif config.model.name == "aum":
    problems += _aum_problems(config)
  problems += _flexi_problems(config)
  problems += _front_end_problems(config)
  problems += phases_problems(config)
  if problems:
    raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _aum_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Audio Mamba: its switches, its size, and a patch grid that fits the input."""
  from ast_jax.models.aum import BIDIRECTIONAL, CLS_POSITIONS, SCANS, VARIANTS

  model, problems = config.model, []
  for field, choices in (("bidirectional", BIDIRECTIONAL), ("cls_position", CLS_POSITIONS), ("scan", SCANS)):
    if model.get(field) not in choices:
      problems.append(f"model.{field}={model.get(field)!r} is not one of {choices}: build the config with "
                      "configs.common.aum(config)")
  if model.variant and model.variant not in VARIANTS:
    problems.append(f"model.variant={model.variant!r} is not an AuM size {tuple(VARIANTS)} (or '' with model.width)")
  elif not (model.variant or model.width > 0):
    problems.append("model.width must be positive when model.variant is ''")
  for field in ("d_state", "d_conv", "expand", "scan_chunk"):
    if not (isinstance(model.get(field), int) and model.get(field) > 0):
      problems.append(f"model.{field}={model.get(field)!r} must be a positive int")
  if not problems:
    from ast_jax.bench.flops import config_flops

    try:
      config_flops(config)  # the patch grid
    except ValueError as error:
      problems.append(f"model input: {error}")
  return problems


def _front_end_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Time pooling (valid values, at least one patch left after pooling); a run patch only from a 'patch' phase."""
  from ast_jax.audio.features import TIME_POOLS

  audio, model, problems = config.audio, config.model, []
  pool, factor = audio.get("time_pool", "none"), audio.get("time_pool_factor", 1)
  if pool not in TIME_POOLS or not (isinstance(factor, int) and factor >= 1):
    problems.append(f"audio.time_pool={pool!r} / time_pool_factor={factor!r}: the pool is one of {TIME_POOLS} and "
                    "the factor a positive int")
  elif pool != "none" and model.get("name", "ast") != "ast":
    problems.append("audio.time_pool applies to model.name='ast' (fixed-length input)")
  if tuple(model.get("run_patch", ())):
    problems.append("model.run_patch is set by a 'patch' phase of train.phases; to train at another patch shape, "
                    "set model.patch_size / patch_time")
  elif not problems and pool != "none" and model.get("name", "ast") == "ast":
    from ast_jax.bench.flops import config_flops

    try:
      config_flops(config)  # the patch grid of the pooled input
    except ValueError as error:
      problems.append(f"model input: {error}")
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
              for length in sweep.lengths if int(length) != length or length < config.model.patch_size][:1]
  if any(not q >= 1.0 for q in sweep.resolutions):
    problems.append(f"eval_sweep.resolutions={tuple(sweep.resolutions)!r}: each q must be >= 1 (frame shift "
                    "audio.frame_shift * q)")
  return problems


def _flexi_problems(config: ml_collections.ConfigDict) -> list[str]:
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
  if model.get("flexi_axes", "both") not in ("both", "time"):
    problems.append(f"model.flexi_axes={model.flexi_axes!r} is not one of ('both', 'time')")
  if model.get("name", "ast") != "ast":
    problems.append("model.flexi_patch_sizes and eval_patch_sizes apply to model.name='ast'")
  patch_time = model.get("patch_time") or model.patch_size
  if (model.fstride, model.tstride) != (model.patch_size, patch_time):
    problems.append(f"model.flexi_patch_sizes / eval_patch_sizes need non-overlapping patches: set model.fstride="
                    f"{model.patch_size} and model.tstride={patch_time} (now {model.fstride}, {model.tstride})")
  time_only = model.get("flexi_axes", "both") == "time"
  for size in train_sizes + eval_sizes:
    freq = model.patch_size if time_only else size
    fits = freq <= config.audio.num_mel_bins and size <= config.audio.target_length
    if not (isinstance(size, int) and size > 0) or not fits:
      problems.append(f"patch size {size!r} (model.flexi_patch_sizes / eval_patch_sizes) must be a positive int "
                      f"that fits {config.audio.num_mel_bins} mel bins x {config.audio.target_length} frames")
  return problems


def _packing_problems(config: ml_collections.ConfigDict) -> list[str]:
  """ElasticAST: the packing section and the options packed rows cannot take."""
  if "packing" not in config:
    return ["model.name='elastic' needs a packing section: build the config with configs.common.elastic(config)"]
  packing, model = config.packing, config.model
  patch, patch_time = model.patch_size, model.get("patch_time") or model.patch_size
  problems = []
  for field in ("rows", "row_tokens", "max_clips", "max_frames"):
    if not packing[field] > 0:
      problems.append(f"packing.{field}={packing[field]!r} must be positive")
  for field, choices in (("packing.method", ("first_fit", "best_fit")), ("packing.crop", ("start", "random")),
                         ("model.pooling", ("attention", "mean")), ("model.positions", ("integer", "fractional"))):
    if _get(config, field) not in choices:
      problems.append(f"{field}={_get(config, field)!r} is not one of {choices}")
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
  if model.positions == "integer":
    table = model.max_time_patches or packing.max_frames // patch_time
    longest = max([packing.max_frames, *config.eval_sweep.lengths]) // patch_time
    if longest > table:
      problems.append(f"model.max_time_patches={table} rows cannot index {longest} time patches (packing.max_frames "
                      "or an eval_sweep length): raise max_time_patches or use model.positions='fractional'")
  if model.fstride != patch or model.tstride != patch_time:
    problems.append(f"model.fstride/tstride={model.fstride}/{model.tstride}: ElasticAST's patches do not overlap; "
                    f"set them to the patch's size {patch}/{patch_time}")
  if config.augment.mixup > 0 or config.augment.roll > 0:
    problems.append("augment.mixup and augment.roll must be 0 for packed clips of their own length")
  if config.train.grad_accum_steps != 1:
    problems.append("train.grad_accum_steps must be 1 with packing: raise packing.rows for a larger batch")
  return problems
