"""Faults injected into a run on purpose, so tests can prove that training survives them (tests/test_faults.py).

Off unless the environment variable `AST_JAX_FAULTS` is set; then a comma-separated list of `what@where:steps`:

  kill@step:S      SIGKILL right after train step S (1-based count of steps done) is dispatched, while it computes
  kill@eval:S      SIGKILL inside the evaluation at step S, after its first batch
  kill@save:S      SIGKILL while the asynchronous checkpoint save of step S is writing its files
  nan@step:S[-E]   the waveforms of the batches of steps S..E (1-based) are NaN: a non-finite loss and gradient
  term@step:S      SIGTERM right after train step S is dispatched: a scheduler's preemption notice, which the run
                   answers with a checkpoint and exit status 75 (train/preemption.py, tests/test_preemption.py)

A kill is the process's own SIGKILL: nothing runs after it (no finally, no atexit), as on a preempted machine. A
term is the process's own SIGTERM, as a scheduler sends it ahead of the kill; in a multi-process run the variable
can be set for one process only, and every process stops at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

ENV = "AST_JAX_FAULTS"
KINDS = {("kill", "step"), ("kill", "eval"), ("kill", "save"), ("nan", "step"), ("term", "step")}


def parse(spec: str) -> dict[tuple[str, str], set[int]]:
  """'kill@save:48,nan@step:3-5' -> {('kill', 'save'): {48}, ('nan', 'step'): {3, 4, 5}}."""
  faults: dict[tuple[str, str], set[int]] = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    try:
      what, rest = item.split("@")
      where, steps = rest.split(":")
      first, _, last = steps.partition("-")
      span = range(int(first), int(last or first) + 1)
    except ValueError:
      raise ValueError(f"{ENV}: cannot read {item!r}; expected what@where:step or what@where:first-last") from None
    if (what, where) not in KINDS:
      raise ValueError(f"{ENV}: unknown fault {what}@{where}; known: {sorted(f'{a}@{b}' for a, b in KINDS)}")
    faults.setdefault((what, where), set()).update(span)
  return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def armed(what: str, where: str, step: int) -> bool:
  return step in _FAULTS.get((what, where), ())


def kill(reason: str) -> None:
  log.warning("fault injected: SIGKILL %s", reason)
  for handler in logging.getLogger().handlers:
    handler.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
  """Called right after train step `step` is dispatched (its computation is still running)."""
  if armed("kill", "step", step):
    kill(f"during train step {step}")
  if armed("term", "step", step):
    log.warning("fault injected: SIGTERM during train step %d", step)
    os.kill(os.getpid(), signal.SIGTERM)


def poison(batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
  """The host batch of 1-based step `step`, its waveforms replaced by NaN when a nan fault is armed there."""
  if not armed("nan", "step", step):
    return batch
  log.warning("fault injected: NaN waveforms in the batch of step %d", step)
  return {**batch, "waveform": np.full_like(batch["waveform"], np.nan)}


def during_eval(batches: Iterable[Any], step: int) -> Iterator[Any]:
  """Yields `batches`; when a kill is armed for the evaluation at `step`, kills once the first batch is done."""
  for index, batch in enumerate(batches):
    if index == 1 and armed("kill", "eval", step):
      kill(f"during the evaluation at step {step}")
    yield batch
  if armed("kill", "eval", step):
    kill(f"at the end of the evaluation at step {step}")


def during_save(directory: str, step: int) -> threading.Thread | None:
  """When a kill is armed for the save of `step`: a thread that watches `directory` and kills the process as soon
  as the save's temporary directory appears (files being written, not yet committed). Start it before the save;
  if the save commits before it is seen, the thread kills after the commit, and the log says so."""
  if not armed("kill", "save", step):
    return None
  prefix = f"{step}.orbax-checkpoint-tmp"

  def watch() -> None:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
      names = os.listdir(directory) if os.path.isdir(directory) else []
      if any(name.startswith(prefix) for name in names):
        kill(f"while the checkpoint of step {step} is being written")
      if str(step) in names:
        kill(f"after the checkpoint of step {step} was committed (the save was too quick to interrupt)")
      time.sleep(0.0005)

  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread
