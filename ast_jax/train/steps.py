"""Pure step functions, jitted once per static shape by the trainer."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ast_jax.audio import model_input
from ast_jax.train.losses import classification_loss, scores_from_logits
from ast_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, config: Any,
                    base_rng: jax.Array) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """waveforms -> front end with SpecAugment -> model -> loss -> Adam update. Randomness is a function of the step."""
  audio, augment, loss_kind = config.audio.to_dict(), config.augment.to_dict(), config.train.loss
  label_smoothing = config.train.label_smoothing

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    step_rng = jax.random.fold_in(base_rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    features = model_input(batch["waveform"], batch["num_samples"], audio, augment=augment, rng=augment_rng)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, features, train=True, rngs={"dropout": dropout_rng})
      return classification_loss(logits, batch["label"], batch["mask"], loss_kind, label_smoothing)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": jnp.asarray(schedule(state.step))}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              epoch_loss_sum=state.epoch_loss_sum + loss,
                              epoch_loss_count=state.epoch_loss_count + 1)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, config: Any) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """waveforms -> front end (no augmentation) -> model; returns per-example scores, loss terms and embeddings."""
  audio, loss_kind = config.audio.to_dict(), config.train.loss

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    features = model_input(batch["waveform"], batch["num_samples"], audio)
    logits, intermediates = model.apply({"params": params}, features, train=False)
    loss_sum = classification_loss(logits, batch["label"], batch["mask"], loss_kind) * jnp.sum(batch["mask"])
    return {"scores": scores_from_logits(logits, loss_kind), "loss_sum": loss_sum,
            "embedding": intermediates["embedding"]}

  return eval_step
