"""Multi-phase coarse-to-fine training (docs/BACKGROUND.md section 4): early phases on temporally compressed
spectrograms, the last at full resolution, for the accuracy of full-resolution training at a fraction of its
compute.

`config.train.phases` lists the phases as 'method:factor:epochs', optionally followed by ':field=value' overrides of
`config.optim` for that phase, e.g. 'avg_pool:2:20, full:1:10:lr=2.5e-4'. Each phase trains the run's config with
one temporal compression by a factor C (T = `audio.target_length` frames at full resolution):

| method        | the phase's config                                    | the model sees                        |
|---------------|-------------------------------------------------------|---------------------------------------|
| `full`        | unchanged                                             | T frames                              |
| `frame_shift` | `audio.frame_shift` x C, `target_length` (T-1)//C + 1, | the same duration framed every 10 C ms |
|               | SpecAugment time mask and roll / C                    |                                       |
| `avg_pool`,   | `audio.time_pool` 'avg' / 'max', `time_pool_factor` C  | T // C frames, pooled after           |
| `max_pool`    |                                                       | normalisation (kernel = stride = C)   |
| `patch`       | `model.run_patch` = (patch_size, patch_time x C)      | T frames in C x longer patches: the   |
|               |                                                       | kernel PI-resized, time stride x C    |

Between phases the weights carry over; the positional table is interpolated (bilinear) to the next phase's patch
grid (the `patch` method keeps the stored table, resized on the fly as FlexiAST does); the optimiser state and the
learning-rate schedule restart (warm-up included) over the phase's own steps. Steps count across the whole run, so a
checkpoint's step names its phase and a run killed mid-phase resumes in the same phase at the same step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from ast_jax.audio.patches import patch_of

METHODS = ("full", "frame_shift", "avg_pool", "max_pool", "patch")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: a compression `method` by `factor` for `epochs` epochs; `optim` overrides `config.optim`."""

  method: str
  factor: int
  epochs: int
  optim: tuple[tuple[str, Any], ...] = ()

  @property
  def name(self) -> str:
    return "full" if self.method == "full" else f"{self.method} x{self.factor}"


def parse_phases(spec: str) -> tuple[Phase, ...]:
  """'method:factor:epochs[:field=value...], ...' -> phases. Raises ValueError naming the entry and the fix."""
  phases = []
  for entry in (part.strip() for part in str(spec).split(",")):
    if not entry:
      continue
    fields = [field.strip() for field in entry.split(":")]
    form = "'method:factor:epochs[:optim_field=value]', e.g. 'avg_pool:2:20'"
    if len(fields) < 3 or any("=" in field for field in fields[:3]):
      raise ValueError(f"train.phases entry {entry!r} is not {form}")
    method, factor, epochs = fields[:3]
    if method not in METHODS:
      raise ValueError(f"train.phases entry {entry!r}: method {method!r} is not one of {METHODS}")
    try:
      factor, epochs = int(factor), int(epochs)
    except ValueError:
      raise ValueError(f"train.phases entry {entry!r}: factor and epochs must be whole numbers ({form})") from None
    if factor < 1 or epochs < 1 or (method == "full") != (factor == 1):
      raise ValueError(f"train.phases entry {entry!r}: epochs must be positive and the factor 1 for 'full', "
                       "at least 2 for a compression")
    overrides = []
    for field in fields[3:]:
      key, _, value = field.partition("=")
      if not key or not value:
        raise ValueError(f"train.phases entry {entry!r}: {field!r} is not an 'optim_field=value' override")
      overrides.append((key.strip(), _number(value.strip())))
    phases.append(Phase(method, factor, epochs, tuple(overrides)))
  return tuple(phases)


def _number(text: str) -> Any:
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def phases_of(config: ml_collections.ConfigDict) -> tuple[Phase, ...]:
  """The run's phases: `train.phases`, or one full-resolution phase of `train.epochs`."""
  return parse_phases(config.train.get("phases", "")) or (Phase("full", 1, config.train.epochs),)


def phase_config(config: ml_collections.ConfigDict, phase: Phase) -> ml_collections.ConfigDict:
  """The config a phase trains with: `config` with the phase's compression, epochs and optimiser overrides."""
  out = ml_collections.ConfigDict(config.to_dict())
  factor, audio, augment = phase.factor, out.audio, out.augment
  if phase.method == "frame_shift":
    audio.frame_shift = config.audio.frame_shift * factor
    audio.target_length = (config.audio.target_length - 1) // factor + 1  # the same duration at the coarser shift
    augment.time_mask = -(-config.augment.time_mask // factor)
    augment.roll = -(-config.augment.roll // factor)
  elif phase.method in ("avg_pool", "max_pool"):
    audio.time_pool, audio.time_pool_factor = phase.method.split("_")[0], factor
  elif phase.method == "patch":
    patch_freq, patch_time = patch_of(config.model)
    out.model.run_patch = (patch_freq, patch_time * factor)
  out.train.epochs = phase.epochs
  for key, value in phase.optim:
    if key not in out.optim:
      raise ValueError(f"train.phases: {key!r} is not a config.optim field (one of {sorted(out.optim.keys())})")
    try:
      out.optim[key] = type(out.optim[key])(value)
    except (TypeError, ValueError):
      raise ValueError(f"train.phases: optim.{key}={value!r} is not a {type(out.optim[key]).__name__}") from None
  return out


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """A phase placed in the run: its config and its steps [first_step, end_step) of the run's step count."""

  index: int
  phase: Phase
  config: ml_collections.ConfigDict
  first_step: int
  end_step: int

  @property
  def steps(self) -> int:
    return self.end_step - self.first_step


def plan_phases(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[PhasePlan]:
  """The run's phases one after another, `steps_per_epoch` steps per epoch in every phase (the input pipeline and
  the batch are the same in every phase; only the on-device front end and the model's patches change)."""
  plans, first = [], 0
  for index, phase in enumerate(phases_of(config)):
    end = first + phase.epochs * steps_per_epoch
    plans.append(PhasePlan(index, phase, phase_config(config, phase), first, end))
    first = end
  return plans


def phase_of_checkpoint(plans: list[PhasePlan], step: int) -> int:
  """The index of the phase whose training wrote a checkpoint at `step` (a checkpoint at a phase's last step
  belongs to that phase: its state has that phase's shapes); 0 before any step."""
  for plan in plans:
    if step <= plan.end_step:
      return plan.index
  return plans[-1].index


def model_grid(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The (frequency, time) grid of the model's stored positional table under `config` (its input frames, its
  stored patch and strides; a `run_patch` resizes the table on the fly and does not change it)."""
  from ast_jax.audio.features import FrontEnd
  from ast_jax.audio.patches import patch_grid, strides_of

  return patch_grid(config.audio.num_mel_bins, FrontEnd.from_config(config.audio).frames, patch_of(config.model),
                    strides_of(config.model))


def carry_params(params: Any, source: ml_collections.ConfigDict, target: ml_collections.ConfigDict) -> Any:
  """Parameters moved from one phase to the next: every array unchanged except `pos_embed`, moved from `source`'s
  grid to `target`'s by rule 'bilinear' (PyTorch `F.interpolate`, align_corners=False; `models/positions.py`),
  prefix rows kept. Host arrays in, host arrays out."""
  from ast_jax.models.positions import resize_table

  old, new = model_grid(source), model_grid(target)
  moved = dict(params)
  if old != new:
    moved["pos_embed"] = resize_table(params["pos_embed"], old, new, rule="bilinear")
  return moved


def phases_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Config errors of multi-phase training (called by `validate_config`)."""
  spec = config.train.get("phases", "")
  if not spec:
    return []
  try:
    phases = parse_phases(spec)
  except ValueError as error:
    return [str(error)]
  problems = []
  if sum(phase.epochs for phase in phases) != config.train.epochs:
    problems.append(f"train.phases={spec!r} add up to {sum(phase.epochs for phase in phases)} epochs but "
                    f"train.epochs={config.train.epochs}: make them equal")
  if phases[-1].method != "full":
    problems.append(f"train.phases={spec!r} must end with a 'full' phase: the trained model is the full-resolution "
                    "one (evaluated, exported and swept as such)")
  from ast_jax.models.family import TIME_COMPRESSION, families_with, family_of

  if TIME_COMPRESSION not in family_of(config).options:
    problems.append("train.phases need a model family that takes compressed input "
                    f"({', '.join(families_with(TIME_COMPRESSION))}); model.name={config.model.name!r} does not")
  if config.model.get("flexi_patch_sizes"):
    problems.append("train.phases do not combine with model.flexi_patch_sizes")
  if config.audio.get("time_pool", "none") != "none":
    problems.append("train.phases set audio.time_pool per phase: leave it 'none'")
  first_avg = config.train.average_weights[0]
  if first_avg and first_avg <= sum(phase.epochs for phase in phases[:-1]):
    problems.append(f"train.average_weights={tuple(config.train.average_weights)} starts before the last phase "
                    "(weights of different grids cannot be averaged): average within the last phase only")
  from ast_jax.models.family import config_flops

  for phase in phases:
    try:
      config_flops(phase_config(config, phase))  # the phase's patch grid fits its (compressed) input
    except ValueError as error:
      problems.append(f"train.phases phase {phase.name!r}: {error}")
  return problems
