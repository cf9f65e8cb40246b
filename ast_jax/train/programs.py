"""The programs of a training phase: model, optimiser, state layout and the jitted train and eval steps, built once
here for both the trainer (`trainer.py`) and the ahead-of-time compiler (`python -m ast_jax.compile`), so what the
compiler reports is the program the trainer runs: the same step functions, shardings, donation and rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import optax

from ast_jax.models import build_model, example_inputs
from ast_jax.parallel import batch_sharding, replicated, sharded_jit
from ast_jax.parallel.sharding import partitioning, shardings_of
from ast_jax.train import state as state_lib
from ast_jax.train.optim import make_optimizer, make_schedule
from ast_jax.train.steps import make_eval_step, make_train_step


def state_init(config: ml_collections.ConfigDict, model: Any, tx: optax.GradientTransformation
               ) -> Callable[[jax.Array], state_lib.TrainState]:
  """rng -> a fresh train state with logically boxed parameters (`parallel.create_sharded` places it)."""
  average = config.train.average_weights[0] > 0

  def init(rng: jax.Array) -> state_lib.TrainState:  # the example inputs are made inside: traced, never placed
    return state_lib.create_train_state(model.init(rng, *example_inputs(config))["params"], tx, average)

  return init


@dataclasses.dataclass
class PhasePrograms:
  """A phase's model and steps. `train_step(*patch)` jits the train step (at the stored patch, or at `patch` for
  FlexiAST and 'patch' phases); `eval_step` is jitted at the run's patch. `abstract_state` is the state as shapes
  with their shardings: what `jax.jit(...).lower` takes in place of arrays."""
  config: ml_collections.ConfigDict
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable[[Any], Any]
  state_shardings: Any
  abstract_state: Any
  data_sharding: Any
  train_step: Callable[..., Any]
  eval_step: Any


def phase_programs(config: ml_collections.ConfigDict, mesh: Any, rules: Any, train_rng: jax.Array,
                   steps_per_epoch: int, phase_steps: int, first_step: int = 0) -> PhasePrograms:
  """The programs of a phase of `phase_steps` steps starting at run step `first_step` (`steps_per_epoch` steps per
  epoch) on `mesh` under the logical `rules`."""
  model = build_model(config)
  # The schedule restarts in every phase: the optimiser counts its own steps from 0 in a fresh state, and the
  # logged lr reads the phase's schedule at (run step - phase start).
  phase_schedule = make_schedule(config.optim, steps_per_epoch, phase_steps)
  tx = make_optimizer(config.optim, phase_schedule)

  def schedule(step: Any) -> Any:
    return phase_schedule(step - first_step)

  rng = jax.random.key(0)  # made outside the mesh context: the mesh may be a topology's, whose devices cannot hold it
  with partitioning(mesh, rules):
    boxed = jax.eval_shape(state_init(config, model, tx), rng)
    state_shardings = shardings_of(boxed, mesh, rules)
  abstract_state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                                nn.meta.unbox(boxed), state_shardings)
  data_sharding = batch_sharding(mesh, rules)
  run_patch = tuple(config.model.get("run_patch", ())) or None  # a 'patch' phase: the kernel at another shape

  def train_step(*patch: tuple[int, int]) -> Any:
    patch = patch or ((run_patch,) if run_patch else ())
    return sharded_jit(make_train_step(model, tx, schedule, config, train_rng, *patch), mesh, rules,
                       in_shardings=(state_shardings, data_sharding),
                       out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))

  eval_step = sharded_jit(make_eval_step(model, config, run_patch), mesh, rules,
                          in_shardings=(state_shardings.params, data_sharding))
  return PhasePrograms(config, model, tx, schedule, state_shardings, abstract_state, data_sharding, train_step,
                       eval_step)
