"""The timing protocol every benchmark here shares: first call, warm-up calls, median of timed calls."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Timing:
  first_s: float  # the first call: tracing and compilation (JAX) or allocator warm-up (PyTorch), plus one step
  median_s: float  # median of the timed calls
  times_s: tuple[float, ...]


def measure(call: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
  """Times `call` (which must block until its work is done): one first call, `warmup` untimed calls, then the
  median of `repeats` timed calls."""
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, not {repeats}")
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(warmup):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return Timing(first, statistics.median(times), tuple(times))
