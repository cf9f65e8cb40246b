"""The train and eval steps: pure functions of (state or params, batch), jitted once per static shape by the trainer.

One pair of steps serves every backbone and both kinds of batch (`ast_jax/data/batch.py`): whole-clip rows take
the fast path (the front end at the recipe's frame shift, no token layout), packed rows carry their layout to the
model, which gathers their tokens (`models/tokens.py`). Logits, labels and the clip mask are flattened to
`[rows * clips, ...]` for the loss, so the step never asks which model it feeds.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ast_jax.audio import FrontEnd, model_input
from ast_jax.audio.fbank import num_frames
from ast_jax.audio.patches import patch_of
from ast_jax.models.tokens import TokenLayout
from ast_jax.train.losses import classification_loss, scores_from_logits
from ast_jax.train.state import TrainState, apply_gradients

Batch = dict[str, jax.Array]


def batch_input(batch: Batch, audio: Mapping[str, Any], patch: tuple[int, int],
                augment: Mapping[str, Any] | None = None, rng: jax.Array | None = None
                ) -> tuple[jax.Array, TokenLayout | None]:
  """The model's input from a batch on the device: (spectrogram, layout).

  Whole-clip rows -> `[rows, frames, mel_bins]` and no layout. Packed rows -> each slot's spectrogram at its own
  frame shift `[rows, clips, frames, mel_bins]` (frames: the slot's samples at the base shift, at least one
  `patch` in time; coarser resolutions fill a prefix) and the packer's layout. SpecAugment when `augment` and
  `rng` are given (the time mask scaled by 1/q on packed slots).
  """
  rows, clips, samples = batch["waveform"].shape
  layout = TokenLayout.from_batch(batch)
  waveforms, num_samples = batch["waveform"].reshape(rows * clips, samples), batch["num_samples"].reshape(-1)
  if layout is None:
    if clips != 1:
      raise ValueError(f"whole-clip rows hold one clip each, not {clips}: a batch of several clips per row needs "
                       "its token layout (segment_ids, positions)")
    return model_input(waveforms, num_samples, audio, augment=augment, rng=rng), None
  frames = max(patch[1], num_frames(samples, FrontEnd.from_config(audio).fbank_options()))
  spectrogram = model_input(waveforms, num_samples, audio, window_shifts=batch["window_shift"].reshape(-1),
                            frames=frames, time_scale=1.0 / batch["resolution"].reshape(-1), augment=augment,
                            rng=rng)
  return spectrogram.reshape(rows, clips, *spectrogram.shape[1:]), layout


def _flat(values: jax.Array, classes: int) -> jax.Array:
  return values.reshape(-1, classes)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: Callable, config: Any,
                    base_rng: jax.Array, patch: tuple[int, int] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """waveforms -> front end with SpecAugment -> model -> loss over real clips -> Adam update. Randomness is a
  function of the step. `patch` (frequency, time): run the model at that patch shape (FlexiAST; one step
  function per shape).

  With `config.train.grad_accum_steps` = A > 1 the rows are split into A micro-batches (each spread over every
  data-parallel device) whose gradients are summed in float32 before one update: the same update as one big batch,
  for 1/A of the activation memory.
  """
  audio, augment, loss_kind = config.audio.to_dict(), config.augment.to_dict(), config.train.loss
  label_smoothing, accum_steps = config.train.label_smoothing, config.train.grad_accum_steps
  own_patch = patch_of(config.model)
  patch_kwargs = {} if patch is None else {"patch": tuple(patch)}
  # FlexiAST: at a drawn patch other than the stored one, also the loss at the stored patch (weight w), with the
  # drawn patch learning from the labels or (flexi_distill) from the stored patch's own predictions.
  drawn_other = patch is not None and tuple(patch) != own_patch
  base_weight = float(config.model.get("flexi_base_weight", 0.0)) if drawn_other else 0.0
  distill = bool(config.model.get("flexi_distill", False))

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    augment_rng, dropout_rng = jax.random.split(jax.random.fold_in(base_rng, state.step))
    spectrogram, layout = batch_input(batch, audio, own_patch, augment, augment_rng)
    total = jnp.maximum(jnp.sum(batch["clip_mask"]), 1.0)
    classes = batch["label"].shape[-1]

    def loss_fn(params, spectrogram, layout, labels, mask, rng):
      labels, mask = _flat(labels, classes), mask.reshape(-1)
      logits, _ = model.apply({"params": params}, spectrogram, layout, train=True, rngs={"dropout": rng},
                              **patch_kwargs)
      logits = _flat(logits, classes)
      if base_weight:
        base_logits, _ = model.apply({"params": params}, spectrogram, layout, train=True, rngs={"dropout": rng})
        base_logits = _flat(base_logits, classes)
        base_loss = classification_loss(base_logits, labels, mask, loss_kind, label_smoothing)
        targets = scores_from_logits(jax.lax.stop_gradient(base_logits), loss_kind) if distill else labels
        loss = ((1.0 - base_weight) * classification_loss(logits, targets, mask, loss_kind, label_smoothing)
                + base_weight * base_loss)
      else:
        loss = classification_loss(logits, labels, mask, loss_kind, label_smoothing)
      # Weighted by this micro-batch's share of the real clips, so the sum over micro-batches is the mean.
      return loss * jnp.sum(mask) / total

    grad_fn = jax.value_and_grad(loss_fn)
    inputs = (spectrogram, layout, batch["label"], batch["clip_mask"])
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
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step))}
    if layout is not None:
      metrics["packing_efficiency"] = jnp.mean(layout.segment_ids > 0)
    return new_state, metrics

  return train_step


def _micro_batches(array: jax.Array, count: int) -> jax.Array:
  """`[rows, ...]` -> `[count, rows / count, ...]`, micro-batch i = rows i, i + count, ... so that every
  micro-batch keeps an equal share on each data-parallel device."""
  rows = array.shape[0]
  if rows % count:
    raise ValueError(f"{rows} rows do not split into {count} micro-batches")
  micro = jnp.swapaxes(array.reshape(rows // count, count, *array.shape[1:]), 0, 1)
  return nn.with_logical_constraint(micro, (None, "batch") + (None,) * (array.ndim - 1))


def make_eval_step(model: nn.Module, config: Any, patch: tuple[int, int] | None = None
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """waveforms -> front end (no augmentation) -> model (at `patch`, when given). Returns per-clip `scores`
  (`[rows, classes]` for whole-clip rows, `[rows, clips, classes]` for packed rows), the loss summed over real
  clips, the `clip_mask` (scores of empty slots and padding are to be dropped with it) and the embeddings."""
  audio, loss_kind, own_patch = config.audio.to_dict(), config.train.loss, patch_of(config.model)
  patch_kwargs = {} if patch is None else {"patch": tuple(patch)}

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    spectrogram, layout = batch_input(batch, audio, own_patch)
    logits, intermediates = model.apply({"params": params}, spectrogram, layout, train=False, **patch_kwargs)
    classes, mask = logits.shape[-1], batch["clip_mask"].reshape(-1)
    loss = classification_loss(_flat(logits, classes), _flat(batch["label"], classes), mask, loss_kind)
    return {"scores": scores_from_logits(logits, loss_kind), "loss_sum": loss * jnp.sum(mask),
            "clip_mask": batch["clip_mask"], "embedding": intermediates["embedding"]}

  return eval_step
