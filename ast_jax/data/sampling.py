"""Which example sits at each position of the endless training stream: shuffled or label-balanced epochs."""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np


def balanced_weights(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
  """Upstream's sample weights `[examples]`: sum over an example's labels of 1000 / (label count + 0.01)."""
  counts = np.zeros(num_classes, np.float64)
  for labels in label_sets:
    counts[list(labels)] += 1.0
  label_weight = 1000.0 / (counts + 0.01)
  return np.array([label_weight[list(labels)].sum() for labels in label_sets], np.float64)


class EpochSampler:
  """Maps a stream position to an example index, one epoch of `num_examples` draws after another.

  Without `weights` every epoch is a fresh permutation; with `weights` an epoch is `num_examples` draws with
  replacement, probability proportional to the weight (upstream's WeightedRandomSampler). Each epoch's order
  depends only on (seed, epoch), so any position can be recomputed after a restore, in any process.
  """

  def __init__(self, num_examples: int, seed: int, weights: np.ndarray | None = None):
    if num_examples <= 0:
      raise ValueError("cannot sample from an empty training set")
    if weights is not None:
      weights = np.asarray(weights, np.float64)
      if weights.shape != (num_examples,) or not np.all(weights >= 0) or weights.sum() <= 0:
        raise ValueError("balanced sampling needs one non-negative weight per example, not all zero")
      weights = weights / weights.sum()
    self.num_examples = num_examples
    self.seed = seed & 0xFFFFFFFF
    self.probabilities = weights
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The example indices `[num_examples]` of `epoch`, in stream order."""
    rng = np.random.default_rng([self.seed, epoch, int(self.probabilities is not None)])
    if self.probabilities is None:
      return rng.permutation(self.num_examples)
    return rng.choice(self.num_examples, size=self.num_examples, replace=True, p=self.probabilities)

  def __call__(self, position: int) -> int:
    epoch, offset = divmod(int(position), self.num_examples)
    with self._lock:  # reader threads ask for neighbouring positions concurrently
      order = self._orders.get(epoch)
      if order is None:
        order = self.epoch_order(epoch)
        # Two epochs at most: prefetching straddles an epoch boundary, never more.
        self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1} | {epoch: order}
    return int(order[offset])

  def __getstate__(self) -> dict:
    state = self.__dict__.copy()
    state["_orders"], state["_lock"] = {}, None  # worker processes recompute orders; locks do not pickle
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()
