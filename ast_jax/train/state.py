"""The training state: everything a resumed run needs besides the data iterator."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Running sum of end-of-epoch weights for weight averaging ({} when averaging is off).
  averaged_sum: Any
  averaged_count: jax.Array
  # Training loss summed over the current epoch, so a mid-epoch resume reports the same epoch mean.
  epoch_loss_sum: jax.Array
  epoch_loss_count: jax.Array
  # Updates skipped for a non-finite loss or gradient: in all, in a row now, and the longest such run (the trainer
  # stops the run when that reaches train.max_consecutive_skips).
  skipped_steps: jax.Array
  consecutive_skips: jax.Array
  longest_skip_run: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, average_weights: bool) -> TrainState:
  zero = jnp.zeros((), jnp.float32)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      averaged_sum=jax.tree.map(jnp.zeros_like, params) if average_weights else {},
      averaged_count=jnp.zeros((), jnp.int32),
      epoch_loss_sum=zero,
      epoch_loss_count=zero,
      skipped_steps=jnp.zeros((), jnp.int32),
      consecutive_skips=jnp.zeros((), jnp.int32),
      longest_skip_run=jnp.zeros((), jnp.int32),
  )


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, loss: jax.Array, grads: Any
                    ) -> tuple[TrainState, jax.Array]:
  """One optimiser step, or none when the loss or a gradient is not finite: then parameters, optimiser state and
  the epoch's loss sum stay as they were, the step still counts (its batch is consumed) and the skip is counted.
  Returns (new state, the global gradient norm)."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  def keep(new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

  consecutive = jnp.where(finite, 0, state.consecutive_skips + 1)
  return state.replace(
      step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
      epoch_loss_sum=state.epoch_loss_sum + jnp.where(finite, loss, 0.0),
      epoch_loss_count=state.epoch_loss_count + finite.astype(jnp.float32),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32), consecutive_skips=consecutive,
      longest_skip_run=jnp.maximum(state.longest_skip_run, consecutive)), grad_norm


def accumulate_average(state: TrainState) -> TrainState:
  """Adds the current weights to the running sum (called at the end of each averaged epoch)."""
  return state.replace(averaged_sum=jax.tree.map(jnp.add, state.averaged_sum, state.params),
                       averaged_count=state.averaged_count + 1)


def averaged_params(state: TrainState) -> Any:
  count = jnp.maximum(state.averaged_count, 1).astype(jnp.float32)
  return jax.tree.map(lambda total: total / count, state.averaged_sum)


def reset_epoch_loss(state: TrainState) -> TrainState:
  return state.replace(epoch_loss_sum=jnp.zeros_like(state.epoch_loss_sum),
                       epoch_loss_count=jnp.zeros_like(state.epoch_loss_count))
