"""The training loop, read top to bottom: mesh, input, model and optimiser, state, steps, restore, loop, evaluate."""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ast_jax import data as data_lib
from ast_jax.convert import model_dir
from ast_jax.convert.init import initial_params
from ast_jax.data.inputs import build_input
from ast_jax.models import build_model, config_flops, example_inputs, family_of
from ast_jax.models.flexi import flexi_patch_probs, flexi_patch_sizes
from ast_jax.models.layers import to_layout, unscan_layers
from ast_jax.parallel import (create_sharded, global_batch, logical_rules,
                              make_mesh, put_host_tree, to_host)
from ast_jax.parallel.sharding import partitioning, shardings_of
from ast_jax.train import state as state_lib
from ast_jax.train import faults, interrupt
from ast_jax.train.checkpoint import Checkpointer, CorruptCheckpoint
from ast_jax.train.config_checks import ConfigError, batch_for_mesh, check_data_paths, validate_config
from ast_jax.train.evaluate import evaluate_params
from ast_jax.train.phases import PhasePlan, carry_params, phase_of_checkpoint, plan_phases
from ast_jax.train.preemption import PreemptionWatch
from ast_jax.train.programs import phase_programs, state_init
from ast_jax.train.eval_sweep import run_sweep
from ast_jax.train.throughput import Throughput, peak_flops_per_device
from ast_jax.train.workdir import check_workdir, checkpoint_bytes
from ast_jax.train.writers import MetricsWriter, Progress

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
  """The run stopped itself: too many consecutive updates skipped for non-finite numbers. Checkpoints are intact."""


class Preempted(RuntimeError):
  """SIGTERM (a scheduler's preemption or time-limit notice, train/preemption.py) stopped the run after train step
  `step`, once its checkpoint at that step was complete; running the same command again resumes there."""

  def __init__(self, step: int):
    super().__init__(f"preempted after step {step}, whose checkpoint is complete; run the same command to resume")
    self.step = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest usable checkpoint. Returns the last evaluation record.

  A multi-phase run (`train.phases`, train/phases.py) trains its phases one after another in one step count; a
  single-phase run is one full-resolution phase. Every evaluation record carries the training FLOPs (analytic) and
  seconds spent so far in each phase.

  The config, the mesh, the batch sizes and the workdir are checked before any data is read or compiled. A latest
  checkpoint that turns out unreadable or corrupt is moved aside and the run starts over from the one before it.
  """
  validate_config(config)
  try:
    mesh = make_mesh(config.mesh)
  except ValueError as error:  # e.g. a mesh needing more devices than there are
    raise ConfigError(str(error)) from None
  config = batch_for_mesh(config, mesh, logical_rules(config.sharding_rules), jax.process_count())[0]
  check_data_paths(config)
  check_workdir(workdir, checkpoint_bytes(config))
  keep_config(config, workdir)
  while True:
    try:
      return _train(config, workdir, mesh)
    except CorruptCheckpoint:  # moved aside, with a warning naming the checkpoint used instead
      continue


def keep_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config of this run (the batch rule for the mesh applied) to `workdir/configs/`, one file
  per run named by its UTC start time, so a resumed or re-run workdir keeps what every run trained with."""
  if jax.process_index() != 0:
    return
  folder = os.path.join(workdir, "configs")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json"), "w") as handle:
    handle.write(config.to_json_best_effort(indent=2))


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: Any) -> dict[str, Any]:
  rules = logical_rules(config.sharding_rules)

  # Input: each process reads its block of every global batch (fixed-length clips, or packed rows of clips). The
  # same waveforms feed every phase: the front end, where a phase compresses time, runs inside the step.
  sources = data_lib.build_sources(config)
  inputs = build_input(config, sources, packed=family_of(config).trains_packed(config))
  steps_per_epoch = inputs.steps_per_epoch
  plans = plan_phases(config, steps_per_epoch)
  # max_steps stops early (benchmarks, tests, a staged run); the schedules are always the full run's.
  schedule_steps = plans[-1].end_step
  total_steps = min(schedule_steps, config.train.max_steps) if config.train.max_steps else schedule_steps
  host = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  run = _Run(config, workdir, mesh, rules, sources, inputs, plans, total_steps, host)

  record: dict[str, Any] = run.writer.last_record() or {}
  first_avg = config.train.average_weights[0]
  if run.latest_step >= total_steps and record and completed_step(workdir) >= total_steps:
    log.info("the run in %s is complete (step %d); nothing to do", workdir, run.latest_step)
    run.close()
    return record

  # Phases, from the one that wrote the latest checkpoint; the weights carry from each phase to the next.
  state, carried, final_plan = None, None, plans[0]
  try:
    for plan in plans[phase_of_checkpoint(plans, run.latest_step):]:
      if plan.first_step >= total_steps and plan.index > 0:
        break
      final_plan = plan
      state, record, shardings = run.phase(plan, carried)
      if plan.index + 1 < len(plans) and int(state.step) == plan.end_step:
        carried = carry_params(to_host(state.params), plan.config, plans[plan.index + 1].config)
  except (CorruptCheckpoint, TrainingStopped, Preempted):
    run.progress.close()
    run.close()  # waits for saves in flight: the checkpoints written so far stay complete
    raise
  run.progress.close()
  interrupt.finishing()  # from here a Ctrl-C exits at once: a rerun redoes what follows

  final_config = final_plan.config
  # A rerun of a run stopped after this evaluation finds its record last, and does not evaluate again.
  if first_avg > 0 and int(state.averaged_count) > 0 and record.get("weights") != "averaged":
    averaged_epochs = [first_avg, min(config.train.average_weights[1], config.train.epochs)]
    record = run.evaluate(final_plan, state_lib.averaged_params(state), total_steps, config.train.epochs,
                          {**run.epoch_stats, "weights": "averaged", "averaged_epochs": averaged_epochs})
  final = to_host(state_lib.averaged_params(state) if first_avg > 0 and int(state.averaged_count) > 0
                  else state.params)  # on every process: gathering shards is a collective
  if jax.process_index() == 0:
    export_model(os.path.join(workdir, "model"), final, final_config, sources.label_names)
  if config.eval_sweep.lengths or config.eval_sweep.resolutions or config.get("eval_patch_sizes"):
    run_sweep(final_config, final, inputs, mesh, rules, shardings.params, workdir, **host)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, COMPLETE_FILE), "w") as handle:
      handle.write(f"{total_steps}\n")
  run.close()
  return record


COMPLETE_FILE = "complete"  # the last step, written after everything else; a run stopped before it redoes them


def completed_step(workdir: str) -> int:
  """The step in `workdir`'s COMPLETE_FILE, written once the final evaluation, model and sweep are; -1 if none."""
  try:
    with open(os.path.join(workdir, COMPLETE_FILE)) as handle:
      return int(handle.read())
  except (OSError, ValueError):
    return -1


class _Run:
  """What every phase of a run shares: mesh, input, checkpoints, metrics, progress, and the per-phase ledger of
  training seconds and FLOPs (kept in each checkpoint's metadata, so it survives restarts)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: Any, rules: Any, sources: Any,
               inputs: Any, plans: list[PhasePlan], total_steps: int, host: dict[str, int]):
    self.config, self.mesh, self.rules, self.sources, self.inputs = config, mesh, rules, sources, inputs
    self.plans, self.total_steps, self.host = plans, total_steps, host
    self.train_iter = inputs.train_iterator(config.seed, **host)
    self.init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    self.latest_step = self.checkpointer.latest_step() or 0
    self.writer = MetricsWriter(workdir, resume_step=self.latest_step, tensorboard=config.train.tensorboard,
                                enabled=jax.process_index() == 0)
    self.run_meta = {"config": config.to_json_best_effort(), "label_names": list(sources.label_names),
                     "skipped_files": sources.skipped_files, "skipped": dict(sources.skipped)}
    self.packing_stats = getattr(inputs, "efficiency", {})
    record = self.writer.last_record() or {}
    self.epoch_stats = {key: record[key] for key in ("train_loss", "lr", "examples_per_sec", "tokens_per_sec", "mfu",
                                                      "train_packing_efficiency") if key in record}
    self.progress = Progress(total_steps, self.latest_step, config.train.log_every_steps, config.train.progress_bar)
    self.phase_seconds: list[float] = []  # training seconds per phase so far (epochs' step time, compilation too)
    self.eval_step: Any = None
    self.preemption = PreemptionWatch()  # last: a failure above would leave its SIGTERM handler in place

  def phase(self, plan: PhasePlan, carried: Any) -> tuple[state_lib.TrainState, dict[str, Any], Any]:
    """Trains one phase from where the run stands (a checkpoint inside it, the previous phase's weights, or a fresh
    start) to its end or `total_steps`. Returns (state, last evaluation record, state shardings)."""
    config, mesh, rules, inputs = plan.config, self.mesh, self.rules, self.inputs
    steps_per_epoch, num_phases = inputs.steps_per_epoch, len(self.plans)
    # Checkpoints of this phase say which model they hold (predict reads a workdir's latest checkpoint with it).
    self.run_meta["phase_config"] = config.to_json_best_effort()
    programs = phase_programs(config, mesh, rules, self.train_rng, steps_per_epoch, plan.steps, plan.first_step)
    model, tx = programs.model, programs.tx
    first_avg, last_avg = config.train.average_weights
    state, _ = initial_state(config, model, tx, mesh, rules, self.init_rng, params=carried, step=plan.first_step,
                             load_init=plan.index == 0)
    state_shardings = programs.state_shardings
    flops = config_flops(config)
    peak = peak_flops_per_device(jax.devices()[0], config.model.dtype, config.train.peak_flops)
    where = f"phase {plan.index + 1}/{num_phases} ({plan.phase.name}), " if num_phases > 1 else ""
    log.info("%smodel %s: %.2f M parameters, %d tokens, %.1f GFLOP per training %s; mesh %s; %d steps per "
             "epoch, steps %d-%d of %d", where, config.model.name,
             sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, flops["tokens"], flops["train_flops"] / 1e9,
             "row" if inputs.packed else "example", dict(mesh.shape), steps_per_epoch, plan.first_step,
             plan.end_step, self.total_steps)

    # Steps (train/programs.py), jitted once, traced under the mesh and the logical axis rules. FlexiAST: a patch
    # shape drawn per step, one compiled step per shape (each compiled on first use, then reused).
    flexi_steps = PatchSteps(programs.train_step) if flexi_patch_sizes(config) else None
    train_step = None if flexi_steps else programs.train_step()
    self.eval_step = programs.eval_step

    # Restore: a checkpoint written in this phase (a later phase starts from the carried weights).
    if plan.first_step < self.latest_step <= plan.end_step:
      restored = self.checkpointer.restore(state, self.train_iter)
      if restored is not None:
        state, meta = restored
        self.phase_seconds = list(meta.get("phase_seconds", []))
    self.phase_seconds += [0.0] * (plan.index + 1 - len(self.phase_seconds))
    start_step = int(state.step)
    record = self.writer.last_record() or {}

    # Loop.
    end_step = min(plan.end_step, self.total_steps)
    epoch_start_time, epoch_start_step, last_loss = time.perf_counter(), start_step, None
    saved_step = start_step  # the step of the latest checkpoint save
    logged_efficiency: list[float] = []  # packed batches' measured share of real tokens, at the logged steps
    throughput = Throughput(inputs.examples_per_step, flops["tokens_per_step"], flops["train_flops_per_step"], peak,
                            jax.device_count())
    for step in range(start_step, end_step):
      batch = global_batch(mesh, faults.poison(next(self.train_iter), step + 1), rules)
      if flexi_steps is not None:
        state, metrics = flexi_steps(step_patch(config, step), state, batch)
      else:
        state, metrics = train_step(state, batch)
      done, epoch = step + 1, step // steps_per_epoch + 1
      faults.after_step(done)
      if done % config.train.log_every_steps == 0 or done == end_step:
        last_loss = float(metrics["loss"])  # waits for the step, so the interval's rate is measured
        skipped = self.check_skips(state, done)
        scalars = {"train/loss": last_loss, "train/lr": float(metrics["lr"]), "train/skipped_steps": skipped,
                   "train/grad_norm": float(metrics["grad_norm"]), **throughput.interval(done)}
        if "packing_efficiency" in metrics:
          scalars["train/packing_efficiency"] = float(metrics["packing_efficiency"])
          logged_efficiency.append(scalars["train/packing_efficiency"])
        self.writer.write_scalars(done, scalars)
      rate = (done - epoch_start_step) * inputs.examples_per_step / max(time.perf_counter() - epoch_start_time, 1e-9)
      self.progress.update(done, epoch, last_loss, rate)
      if done % steps_per_epoch == 0 or done == end_step:  # an epoch's end, or the last (max_steps) step
        jax.block_until_ready(state)
        skipped = self.check_skips(state, done)  # before anything is saved
        epoch_seconds = time.perf_counter() - epoch_start_time
        self.phase_seconds[plan.index] += epoch_seconds
        if first_avg <= epoch <= last_avg:
          state = state_lib.accumulate_average(state)
        train_loss = float(state.epoch_loss_sum / jnp.maximum(state.epoch_loss_count, 1))
        state = state_lib.reset_epoch_loss(state)
        self.epoch_stats = {"train_loss": train_loss, "lr": float(metrics["lr"]), "skipped_steps": skipped,
                            **throughput.summary(done - epoch_start_step, epoch_seconds)}
        if logged_efficiency:
          self.epoch_stats["train_packing_efficiency"] = float(np.mean(logged_efficiency))
          logged_efficiency = []
        if epoch % config.train.eval_every_epochs == 0 or done == end_step:
          record = self.evaluate(plan, state.params, done, epoch, self.epoch_stats)
        self.checkpointer.save(done, state, self.train_iter,
                               {**self.run_meta, "epoch": epoch, "phase_seconds": self.phase_seconds})
        epoch_start_time, epoch_start_step, saved_step = time.perf_counter(), done, done
      elif config.train.checkpoint_every_steps and done % config.train.checkpoint_every_steps == 0:
        self.check_skips(state, done)
        self.checkpointer.save(done, state, self.train_iter,
                               {**self.run_meta, "epoch": epoch - 1, "phase_seconds": self.phase_seconds})
        saved_step = done
      if self.preemption.should_stop(done):  # SIGTERM: every process stops here, after the same step
        jax.block_until_ready(state)
        if saved_step != done:  # else the epoch's end or a periodic checkpoint has just saved this step
          self.check_skips(state, done)
          self.checkpointer.save(done, state, self.train_iter,
                                 {**self.run_meta, "epoch": epoch - 1, "phase_seconds": self.phase_seconds})
        self.checkpointer.wait()
        raise Preempted(done)
    if num_phases > 1 and int(state.step) == plan.end_step:
      log.info("phase %d/%d (%s) done: %d epochs, %.3g TFLOP, %.1f s of training", plan.index + 1, num_phases,
               plan.phase.name, plan.phase.epochs, self.phase_flops(plan.end_step)[plan.index] / 1e12,
               self.phase_seconds[plan.index])
    return state, record, state_shardings

  def check_skips(self, state: state_lib.TrainState, step: int) -> int:
    """Stops the run (`TrainingStopped`) once `train.max_consecutive_skips` updates in a row were skipped for a
    non-finite loss or gradient; else returns the number skipped so far. Checked at logged steps and before every
    save, so no checkpoint is written after the limit is reached."""
    skipped, longest = (int(x) for x in jax.device_get((state.skipped_steps, state.longest_skip_run)))
    limit = self.config.train.max_consecutive_skips
    if limit and longest >= limit:
      last = self.checkpointer.latest_step()
      raise TrainingStopped(
          f"{longest} consecutive training steps had a non-finite loss or gradient (checked at step {step}; "
          f"{skipped} skipped in all), so the run stopped. "
          + (f"The last checkpoint (step {last}) is intact. " if last else "No checkpoint was written. ")
          + "Lower optim.lr or set optim.grad_clip_norm, check the data (python -m ast_jax.validate "
          "--config=...), or raise train.max_consecutive_skips.")
    return skipped

  def phase_flops(self, step: int) -> list[float]:
    """Training FLOPs (analytic) of each phase up to run step `step`, from the steps each has run by then."""
    return [max(min(step, plan.end_step) - plan.first_step, 0) * config_flops(plan.config)["train_flops_per_step"]
            for plan in self.plans]

  def evaluate(self, plan: PhasePlan, params: Any, step: int, epoch: int, extra: dict[str, Any]) -> dict[str, Any]:
    flops = self.phase_flops(step)[:plan.index + 1]
    ledger = {"phase": plan.phase.name, "train_seconds": float(sum(self.phase_seconds)),
              "train_flops": float(sum(flops)), "phase_seconds": list(self.phase_seconds), "phase_flops": flops}
    record = {"epoch": epoch, "step": step,
              **evaluate_params(self.eval_step, params, faults.during_eval(self.inputs.eval_batches(**self.host),
                                                                           step), self.mesh, self.rules),
              **extra, **self.packing_stats, **ledger, "skipped_files": self.sources.skipped_files,
              "skipped": dict(self.sources.skipped)}
    self.writer.write_record(record)
    log.info("eval epoch %d step %d: %s", epoch, step, _summary(record))
    return record

  def close(self) -> None:
    self.preemption.close()
    self.checkpointer.wait()
    self.checkpointer.close()
    self.writer.close()


def export_model(path: str, params: Any, config: ml_collections.ConfigDict, label_names: Any) -> None:
  """The trained model as an ast_jax model directory (weight-averaged when averaging is on), for predict/convert."""
  label_ids: list[str] = []
  if config.data.label_csv and os.path.exists(config.data.label_csv):
    label_ids = model_dir.label_names_from_csv(config.data.label_csv)[1]
  # Files hold the unscanned layout, whatever the training layout was.
  bundle_config = model_dir.bundle_config({**config.model, "scan_layers": False}, config.audio, config.num_classes,
                                          config.train.loss, model_dir.packing_of(config))
  partial, previous = path + ".partial", path + ".previous"  # written aside, then renamed: never half a model
  for leftover in (partial, previous):
    shutil.rmtree(leftover, ignore_errors=True)
  model_dir.save_model_dir(partial, model_dir.ModelBundle(unscan_layers(params), bundle_config, list(label_names),
                                                          label_ids if len(label_ids) == len(label_names) else []))
  if os.path.exists(path):
    os.rename(path, previous)
  os.rename(partial, path)
  shutil.rmtree(previous, ignore_errors=True)
  log.info("model written to %s", path)


def initial_state(config: ml_collections.ConfigDict, model: Any, tx: Any, mesh: Any, rules: Any, rng: jax.Array,
                  params: Any = None, step: int = 0, load_init: bool = True
                  ) -> tuple[state_lib.TrainState, Any]:
  """The train state created directly in its shards: from host `params` (the previous phase's weights) at run step
  `step` with a fresh optimiser, else a random init, then `config.init_from` when set and `load_init`.
  Returns (state, its shardings)."""
  average = config.train.average_weights[0] > 0
  state, shardings = create_sharded(state_init(config, model, tx), mesh, rules, rng)
  if params is None and config.init_from and load_init:
    template = unscan_layers(to_host(state.params))
    params = to_layout(initial_params(config.init_from, template, config), config.model.scan_layers)
  if params is not None:
    params = put_host_tree(jax.tree.map(np.float32, params), shardings.params)
    state = jax.jit(lambda params: state_lib.create_train_state(params, tx, average).replace(step=jnp.int32(step)),
                    out_shardings=shardings, donate_argnums=(0,))(params)
  return state, shardings


def param_shardings(config: ml_collections.ConfigDict, mesh: Any, rules: Any) -> Any:
  """The shardings the config's parameters get on `mesh` (nothing is allocated)."""
  model = build_model(config)
  with partitioning(mesh, rules):
    abstract = jax.eval_shape(lambda rng: model.init(rng, *example_inputs(config))["params"], jax.random.key(0))
    return shardings_of(abstract, mesh, rules)


def step_patch(config: ml_collections.ConfigDict, step: int) -> tuple[int, int]:
  """The patch shape of training step `step`, drawn from `flexi_patch_sizes` (uniform, or by
  `flexi_patch_weights`) as a function of (seed, step), so a resumed run draws the same shapes."""
  shapes, rng = flexi_patch_sizes(config), np.random.default_rng([config.seed & 0xFFFFFFFF, step, 11])
  if not config.model.get("flexi_patch_weights", ()):
    return shapes[int(rng.integers(len(shapes)))]
  return shapes[int(rng.choice(len(shapes), p=flexi_patch_probs(config)))]


class PatchSteps:
  """Train steps by patch shape: `compile_step(patch)` once per shape, on first use; each first call (trace,
  compile and one step) is logged with its time."""

  def __init__(self, compile_step: Any):
    self.compile_step, self.steps = compile_step, {}

  def __call__(self, patch: tuple[int, int], state: Any, batch: Any) -> Any:
    if patch in self.steps:
      return self.steps[patch](state, batch)
    start = time.perf_counter()
    self.steps[patch] = self.compile_step(patch)
    state, metrics = self.steps[patch](state, batch)
    jax.block_until_ready(metrics)
    log.info("train step for patch %dx%d compiled and run in %.1f s (%d shapes compiled)", *patch,
             time.perf_counter() - start, len(self.steps))
    return state, metrics


def _summary(record: dict[str, Any]) -> str:
  keys = ("loss", "accuracy", "mAP", "mAUC", "d_prime", "examples_per_sec")
  return " ".join(f"{k}={record[k]:.4f}" for k in keys if isinstance(record.get(k), float))
