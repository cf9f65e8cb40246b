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
  )


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
