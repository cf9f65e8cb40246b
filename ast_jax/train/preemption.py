"""Stopping a run cleanly when its machines are about to be taken away.

Schedulers announce the end of a job with SIGTERM some time before they kill it: SLURM ahead of the time limit or
on preemption (`#SBATCH --signal=TERM@120`, launch/slurm.sbatch), Compute Engine before a TPU VM's maintenance event
or when it reclaims a spot VM. The trainer asks `PreemptionWatch.should_stop(step)` after every train step; on True
it saves a checkpoint at that step, waits until it is written, and the process exits with `PREEMPTED_EXIT_CODE`.

- One process (no jax.distributed): a Python SIGTERM handler sets a flag, and the answer is the flag.
- jax.distributed (several processes, or one started with --distributed): every process must stop at the same
  step, or those that go on wait forever in a collective for those that stopped, and the checkpoint lacks the
  stopped ones' shards. `jax.distributed.initialize` starts a preemption sync manager (on by default:
  `jax_enable_preemption_service`) whose own C++ SIGTERM handler tells the coordination service; every process's
  `multihost_utils.reached_preemption_sync_point(n)` then returns True at the same call count n (one past the
  largest count any process had reached when the notice went round, which takes up to a second). A Python handler
  would replace JAX's, so none is installed.
- Several processes with the preemption service off: there is neither JAX's handler nor its manager
  (`reached_preemption_sync_point` raises RuntimeError). A Python handler sets each process's flag, and an
  all-gather of the flags after every step gives every process the same answer, at the cost of one small
  collective per step, which waits for the step.

Ctrl-C once training steps run (train/interrupt.py) stops the run the same way, after the same step on every process
and with a checkpoint there: the watch answers True for it too, and with the sync manager it passes it on as a
SIGTERM to its own process, which JAX's handler tells every process. `ast_jax.main` then prints the Ctrl-C line and
exits with `interrupt.INTERRUPTED_EXIT_CODE` (130) instead of 75.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

from ast_jax.train import interrupt

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM once its checkpoint at the step where it stopped is complete: running
the same command again resumes there. 75 is sysexits.h's EX_TEMPFAIL ("temporary failure, try again"); the launch
scripts requeue a job that ends with it (launch/README.md)."""

SIGNAL, SYNC_POINT, AGREED_SIGNAL = "signal", "sync point", "agreed signal"


class PreemptionWatch:
  """Answers, once per train step, whether the run must stop now; every process of a run gets the same answers.
  `close()` puts back the SIGTERM handler it replaced (when it installed one)."""

  # JAX's sync manager is one per process and keeps the count of the last call, so the count is one per process
  # too: a second watch (a run restarted in the same process) goes on from where the first left off.
  _sync_calls = 0

  def __init__(self) -> None:
    self.received_at: float | None = None  # time.time() of the first SIGTERM, in the modes with a Python handler
    self._announced = False
    self._ctrl_c_passed_on = False
    self._previous_handler = None
    self._installed = False
    if jax.distributed.is_initialized() and _sync_manager_present():
      self.mode = SYNC_POINT
    else:
      self.mode = SIGNAL if jax.process_count() == 1 else AGREED_SIGNAL
      self._install()
    log.debug("preemption: SIGTERM handled by %s", self.mode)

  def _install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      # Python delivers signals to the main thread only; a run driven from another thread keeps SIGTERM's default.
      log.info("preemption: training runs outside the main thread, so SIGTERM ends it without a checkpoint")
      return
    self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True

  def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
    # Only the flag: a log line written here could land inside a write the main thread was making to the same
    # stream (io raises "reentrant call"), so `should_stop` reports it.
    if self.received_at is None:
      self.received_at = time.time()

  def should_stop(self, step: int) -> bool:
    """Called by every process after dispatching train step `step` (1-based count of steps done)."""
    interrupt.training(step)
    ctrl_c = interrupt.requested()
    if self.mode == SYNC_POINT:
      if ctrl_c and not self._ctrl_c_passed_on:
        self._ctrl_c_passed_on = True
        os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which sets the sync point of every process
      # Call counts, not steps: the manager's counts start at 0, so a notice that comes before the first call
      # (while compiling or restoring) sets the sync point at 1, which a resumed run's steps would never meet.
      PreemptionWatch._sync_calls += 1
      stop = multihost_utils.reached_preemption_sync_point(PreemptionWatch._sync_calls)
    elif self.mode == AGREED_SIGNAL:
      stop = bool(np.any(multihost_utils.process_allgather(np.asarray(self.received_at is not None or ctrl_c))))
    else:
      stop = self.received_at is not None or ctrl_c
    if stop and not self._announced and not ctrl_c:  # Ctrl-C's own line says where the run stopped
      self._announced = True
      who = "" if self.mode == SIGNAL else " by this process" if self.received_at is not None else " by a process"
      log.warning("SIGTERM received%s (preemption or time limit): the run stops after step %d, with a checkpoint "
                  "there", who, step)
    return stop

  def close(self) -> None:
    if self._installed:
      # None: the previous handler was not set from Python; none is expected there, so the default goes back.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous_handler is None else self._previous_handler)
      self._installed = False


def _sync_manager_present() -> bool:
  """Whether jax.distributed runs its preemption sync manager (it raises RuntimeError when it does not). The probe
  is call count 0, which is never a sync point (they start at 1)."""
  try:
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError:
    return False
  return True
