"""Evaluation: a step run over every evaluation batch, scores gathered from every process, the upstream metrics."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from jax.experimental import multihost_utils

from ast_jax.parallel import global_batch
from ast_jax.train.metrics import classification_metrics


def evaluate_params(eval_step: Any, params: Any, batches: Iterable[dict[str, np.ndarray]], mesh: Any,
                    rules: Any = None) -> dict[str, float]:
  """Runs `eval_step` over every batch and computes the upstream metrics over the real clips (clip_mask = 1)."""
  scores, labels, loss_sum, count = [], [], 0.0, 0.0
  for host_batch in batches:
    batch = global_batch(mesh, host_batch, rules)  # placed by the rules' `batch` entry
    outputs = eval_step(params, batch)
    # Every process gathers the whole batch, so multi-host runs compute metrics over the full evaluation set.
    # Outputs are per clip slot; the clip mask drops empty slots and padding ([rows * clips, classes]).
    gathered = multihost_utils.process_allgather(
        {"scores": outputs["scores"], "label": batch["label"], "mask": batch["clip_mask"]}, tiled=True)
    real = np.asarray(gathered["mask"]).reshape(-1) > 0
    classes = gathered["scores"].shape[-1]
    scores.append(np.asarray(gathered["scores"]).reshape(-1, classes)[real])
    labels.append(np.asarray(gathered["label"]).reshape(-1, classes)[real])
    loss_sum += float(outputs["loss_sum"])
    count += float(real.sum())
  if count == 0:
    raise ValueError("the evaluation set is empty")
  metrics = classification_metrics(np.concatenate(scores), np.concatenate(labels))
  return {"loss": loss_sum / count, **metrics, "num_examples": int(count)}
