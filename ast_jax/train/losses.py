"""Losses on raw logits, averaged over real (mask = 1) examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


LOSSES = ("bce", "ce")  # config.train.loss


def classification_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, kind: str,
                        label_smoothing: float = 0.0) -> jax.Array:
  """Mean loss over real examples. logits, labels `[batch, classes]` (labels multi-hot or mixup-soft); mask `[batch]`.

  bce: sigmoid binary cross-entropy averaged over classes, as torch.nn.BCEWithLogitsLoss;
  ce: softmax cross-entropy against the (normalised) soft labels, as upstream's CrossEntropyLoss on argmax
  targets for single-label data.
  """
  logits = logits.astype(jnp.float32)
  if kind == "bce":
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
  elif kind == "ce":
    targets = labels / jnp.maximum(labels.sum(axis=-1, keepdims=True), 1e-12)
    if label_smoothing:
      targets = optax.smooth_labels(targets, label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
  else:
    raise ValueError(f"unknown loss {kind!r}; use 'bce' or 'ce'")
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def scores_from_logits(logits: jax.Array, kind: str) -> jax.Array:
  """Per-class scores for metrics: sigmoid for BCE-trained models, softmax for CE-trained ones."""
  return jax.nn.sigmoid(logits) if kind == "bce" else jax.nn.softmax(logits, axis=-1)
