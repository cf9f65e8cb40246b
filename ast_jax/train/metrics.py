"""Evaluation metrics as upstream: per-class AP and ROC AUC, their means, d-prime and accuracy.

Written in NumPy to match scikit-learn's `average_precision_score` and `roc_auc_score` (tested against them)
without making scikit-learn a runtime dependency.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
  """AP of one class, sum over thresholds of (R_n - R_{n-1}) P_n (scikit-learn's definition). NaN without positives."""
  targets = targets > 0.5
  positives = targets.sum()
  if positives == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  sorted_scores, hits = scores[order], targets[order]
  # One operating point per distinct score: ties enter together.
  last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
  true_pos = np.cumsum(hits)[last_of_tie]
  precision = true_pos / (last_of_tie + 1)
  recall_gain = np.diff(np.r_[0, true_pos]) / positives
  return float(np.sum(recall_gain * precision))


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
  """ROC AUC of one class by the rank statistic (ties count one half). NaN unless both classes are present."""
  targets = targets > 0.5
  positives, negatives = targets.sum(), (~targets).sum()
  if positives == 0 or negatives == 0:
    return float("nan")
  ranks = stats.rankdata(scores)
  return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def d_prime(auc: float) -> float:
  """d' = sqrt(2) * Phi^-1(AUC)."""
  return float(np.sqrt(2.0) * stats.norm.ppf(auc))


METRICS = ("accuracy", "mAP", "mAUC", "d_prime")  # what classification_metrics returns; config.train.main_metric


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Upstream metrics on `scores` `[examples, classes]` (sigmoid or softmax outputs) and `targets` (multi-hot).

  mAP and mAUC average over the classes that have positives (and negatives, for AUC) in the evaluation set,
  as an undefined per-class value would otherwise make the mean undefined.
  """
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets, np.float64)
  if scores.shape != targets.shape or scores.ndim != 2 or scores.shape[0] == 0:
    raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be [examples, classes]")
  aps = np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
  aucs = np.array([roc_auc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
  mean_ap = float(np.nanmean(aps)) if np.any(np.isfinite(aps)) else float("nan")
  mean_auc = float(np.nanmean(aucs)) if np.any(np.isfinite(aucs)) else float("nan")
  accuracy = float(np.mean(np.argmax(scores, axis=1) == np.argmax(targets, axis=1)))
  return {
      "accuracy": accuracy,
      "mAP": mean_ap,
      "mAUC": mean_auc,
      "d_prime": d_prime(mean_auc) if np.isfinite(mean_auc) else float("nan"),
  }
