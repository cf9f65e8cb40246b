"""Pure step functions, jitted once per static shape by the trainer."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ast_jax.audio import FrontEnd, model_input, slot_input
from ast_jax.audio.fbank import num_frames
from ast_jax.models.elastic import gather_packed, patchify
from ast_jax.train.losses import classification_loss, scores_from_logits
from ast_jax.train.state import TrainState, apply_gradients

Batch = dict[str, jax.Array]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, config: Any,
                    base_rng: jax.Array, patch: tuple[int, int] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """waveforms -> front end with SpecAugment -> model -> loss -> Adam update. Randomness is a function of the step.
  `patch` (frequency, time): run the AST at that patch shape (FlexiAST; one step function per shape).

  With `config.train.grad_accum_steps` = A > 1 the batch is split into A micro-batches (each spread over every
  data-parallel device) whose gradients are summed in float32 before one update: the same update as one big batch,
  for 1/A of the activation memory.
  """
  audio, augment, loss_kind = config.audio.to_dict(), config.augment.to_dict(), config.train.loss
  label_smoothing, accum_steps = config.train.label_smoothing, config.train.grad_accum_steps
  patch_kwargs = {} if patch is None else {"patch": tuple(patch)}
  # FlexiAST: at a drawn patch other than the stored one, also the loss at the stored patch (weight w), with the
  # drawn patch learning from the labels or (flexi_distill) from the stored patch's own predictions.
  drawn_other = patch is not None and tuple(patch) != model_patch(config)
  base_weight = float(config.model.get("flexi_base_weight", 0.0)) if drawn_other else 0.0
  distill = bool(config.model.get("flexi_distill", False))

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    step_rng = jax.random.fold_in(base_rng, state.step)
    augment_rng, dropout_rng = jax.random.split(step_rng)
    features = model_input(batch["waveform"], batch["num_samples"], audio, augment=augment, rng=augment_rng)
    total = jnp.maximum(jnp.sum(batch["mask"]), 1.0)

    def loss_fn(params, features, labels, mask, rng):
      logits, _ = model.apply({"params": params}, features, train=True, rngs={"dropout": rng}, **patch_kwargs)
      if base_weight:
        base_logits, _ = model.apply({"params": params}, features, train=True, rngs={"dropout": rng})
        base_loss = classification_loss(base_logits, labels, mask, loss_kind, label_smoothing)
        targets = scores_from_logits(jax.lax.stop_gradient(base_logits), loss_kind) if distill else labels
        loss = ((1.0 - base_weight) * classification_loss(logits, targets, mask, loss_kind, label_smoothing)
                + base_weight * base_loss)
      else:
        loss = classification_loss(logits, labels, mask, loss_kind, label_smoothing)
      # Weighted by this micro-batch's share of the real examples, so the sum over micro-batches is the mean.
      return loss * jnp.sum(mask) / total

    grad_fn = jax.value_and_grad(loss_fn)
    inputs = (features, batch["label"], batch["mask"])
    if accum_steps == 1:
      loss, grads = grad_fn(state.params, *inputs, dropout_rng)
    else:
      micro = jax.tree.map(lambda x: _micro_batches(x, accum_steps), inputs)

      def accumulate(carry, index_and_inputs):
        index, micro_inputs = index_and_inputs
        loss, grads = grad_fn(state.params, *micro_inputs, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
    new_state, grad_norm = apply_gradients(state, tx, loss, grads)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step))}

  return train_step


def _micro_batches(array: jax.Array, count: int) -> jax.Array:
  """`[batch, ...]` -> `[count, batch / count, ...]`, micro-batch i = rows i, i + count, ... so that every
  micro-batch keeps an equal share on each data-parallel device."""
  batch = array.shape[0]
  if batch % count:
    raise ValueError(f"batch {batch} does not split into {count} micro-batches")
  micro = jnp.swapaxes(array.reshape(batch // count, count, *array.shape[1:]), 0, 1)
  return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (array.ndim - 1))


def make_eval_step(model: nn.Module, config: Any, patch: tuple[int, int] | None = None
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """waveforms -> front end (no augmentation) -> model (at `patch`, when given); returns per-example scores, loss
  terms and embeddings."""
  audio, loss_kind = config.audio.to_dict(), config.train.loss
  patch_kwargs = {} if patch is None else {"patch": tuple(patch)}

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    features = model_input(batch["waveform"], batch["num_samples"], audio)
    logits, intermediates = model.apply({"params": params}, features, train=False, **patch_kwargs)
    loss_sum = classification_loss(logits, batch["label"], batch["mask"], loss_kind) * jnp.sum(batch["mask"])
    return {"scores": scores_from_logits(logits, loss_kind), "loss_sum": loss_sum,
            "embedding": intermediates["embedding"]}

  return eval_step


def packed_patches(batch: Batch, audio: dict[str, Any], patch: int | tuple[int, int],
                   augment: dict[str, Any] | None = None, rng: jax.Array | None = None) -> jax.Array:
  """ElasticAST's input on the device: each waveform slot's front end at its own frame shift (SpecAugment when
  `augment`, the time mask scaled by 1/q), its non-overlapping patches on a common grid (the slot's frames at the
  base frame shift, at least one patch; coarser resolutions fill a prefix of it), gathered into the packed rows
  `[rows, row_tokens, patch_freq * patch_time]` (`patch`: one size, or (frequency, time) sizes)."""
  rows, clips, samples = batch["waveform"].shape
  patch_freq, patch_time = (patch, patch) if isinstance(patch, int) else patch
  frames = max(patch_time, num_frames(samples, FrontEnd.from_config(audio).fbank_options()))
  features = slot_input(batch["waveform"].reshape(rows * clips, samples), batch["num_samples"].reshape(-1),
                        batch["window_shift"].reshape(-1), audio, frames,
                        time_scale=1.0 / batch["resolution"].reshape(-1), augment=augment, rng=rng)
  mel_bins = features.shape[-1]
  slots = patchify(features, (patch_freq, patch_time)).reshape(rows, clips, mel_bins // patch_freq,
                                                              frames // patch_time, patch_freq * patch_time)
  return gather_packed(slots, batch["segment_ids"], batch["freq_positions"], batch["time_positions"])


def model_patch(config: Any) -> tuple[int, int]:
  """The model's stored (frequency, time) patch size: `model.patch_size`, and `model.patch_time` when set."""
  return config.model.patch_size, config.model.get("patch_time") or config.model.patch_size


def _packed_model_inputs(batch: Batch) -> tuple[jax.Array, ...]:
  return batch["segment_ids"], batch["freq_positions"], batch["time_positions"], batch["time_patches"]


def make_packed_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, config: Any,
                           base_rng: jax.Array
                           ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The ElasticAST step on packed batches (ast_jax/data/packed.py): the loss averages over real clips only."""
  audio, augment, loss_kind = config.audio.to_dict(), config.augment.to_dict(), config.train.loss
  label_smoothing, patch = config.train.label_smoothing, model_patch(config)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(base_rng, state.step))
    patches = packed_patches(batch, audio, patch, augment, augment_rng)
    positions = _packed_model_inputs(batch)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, patches, *positions, train=True, rngs={"dropout": dropout_rng})
      classes = logits.shape[-1]
      return classification_loss(logits.reshape(-1, classes), batch["label"].reshape(-1, classes),
                                 batch["clip_mask"].reshape(-1), loss_kind, label_smoothing)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    new_state, grad_norm = apply_gradients(state, tx, loss, grads)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step)),
                       "packing_efficiency": jnp.mean(batch["segment_ids"] > 0)}

  return train_step


def make_packed_eval_step(model: nn.Module, config: Any) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """ElasticAST evaluation on packed batches: per-clip scores `[rows, max_clips, classes]`, the loss summed over
  real clips and the clip mask (scores of empty slots are to be dropped with it)."""
  audio, loss_kind, patch = config.audio.to_dict(), config.train.loss, model_patch(config)

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    patches = packed_patches(batch, audio, patch)
    logits, intermediates = model.apply({"params": params}, patches, *_packed_model_inputs(batch), train=False)
    classes, mask = logits.shape[-1], batch["clip_mask"].reshape(-1)
    loss = classification_loss(logits.reshape(-1, classes), batch["label"].reshape(-1, classes), mask, loss_kind)
    return {"scores": scores_from_logits(logits, loss_kind), "loss_sum": loss * jnp.sum(mask),
            "clip_mask": batch["clip_mask"], "embedding": intermediates["embedding"]}

  return eval_step
