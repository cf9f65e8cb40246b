"""Ctrl-C (SIGINT): one line on stderr and exit status 130, never a traceback, a crash or a damaged checkpoint.

Python answers Ctrl-C with a KeyboardInterrupt raised wherever the main thread is. XLA's compiler polls for signals,
so a Ctrl-C while compiling abandons a compilation that XLA's threads go on with, and the interpreter then shuts
down under them, often with a segmentation fault; elsewhere it prints a traceback, and Grain's worker
processes, which get the terminal's Ctrl-C too, print theirs. Instead `install` (called by `ast_jax.main`):

- blocks SIGINT in the main thread before any other thread or process starts, so that the threads and Grain's
  worker processes inherit the block (the workers never see Ctrl-C), and a watcher thread, which alone unblocks it,
  learns of each Ctrl-C through Python's wakeup pipe: nothing is raised anywhere, and nothing has to reach the main
  thread, which may sit in C++ for minutes (a compilation, a step, a collective);
- the first Ctrl-C, once training steps run (`training`, from the first train step on), asks the trainer to stop
  after the step in progress as SIGTERM does (train/preemption.py: every process of a run after the same step, with
  a checkpoint there); the process then exits with the line `stopped by Ctrl-C at step N; last checkpoint: step N
  (WORKDIR/checkpoints); rerun the same command to resume`;
- before the first step (reading data, restoring, compiling) and after the last (`finishing`: the final evaluation,
  model export and sweep, which a rerun redoes) nothing would be lost, so the first Ctrl-C exits at once, after a
  checkpoint being written is committed;
- a second Ctrl-C exits at once, whatever the run is doing. Orbax writes a checkpoint into
  `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` once every file is written (train/checkpoint.py), so a
  save cut short is never read and is deleted on the next start; the line names the newest renamed checkpoint, the
  one a rerun resumes from.

Exiting is `os._exit` after ending this process's worker processes: no wait in jax.distributed's shutdown barrier,
and no library thread's report after the line.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker
from typing import NoReturn

log = logging.getLogger(__name__)

INTERRUPTED_EXIT_CODE = 130
"""Exit status after Ctrl-C: 128 + SIGINT, what shells report for a command that Ctrl-C ended."""

STARTING, TRAINING, FINISHING = "starting", "training", "finishing"
HINT_SECONDS = 2.0  # a stop that takes longer than this says what it waits for, and how to skip the wait
_POLL_SECONDS = 0.05
_TMP_MARK = ".orbax-checkpoint-tmp"
_TRACKER_WARNINGS = "ignore::UserWarning:multiprocessing.resource_tracker"


class _State:
  checkpoint_dir: str | None = None
  stage = STARTING
  last_step: int | None = None  # the latest train step done in this process
  presses = 0
  installed = False
  stale: set[str] = set()  # temporary directories of saves cut short before this process (Orbax deletes them)
  # Reentrant: without POSIX signal masks `_on_press` runs in a handler on the main thread, which may hold them. The
  # first caller of `exit_now` prints the line and exits; a later one waits on `exit_lock` for the end.
  lock, exit_lock = threading.RLock(), threading.RLock()


def install(checkpoint_dir: str) -> bool:
  """Takes over Ctrl-C for this process; `checkpoint_dir` is where the run's checkpoints are (named in the line).
  Call it from the main thread before any other thread or process is started. Returns False (nothing done) off the
  main thread."""
  if threading.current_thread() is not threading.main_thread():
    return False
  _State.checkpoint_dir = checkpoint_dir
  _State.stale = set(_saves_in_flight(checkpoint_dir))
  if _State.installed:
    return True
  _State.installed = True
  if not hasattr(signal, "pthread_sigmask"):  # not POSIX: the handler itself, on the main thread
    signal.signal(signal.SIGINT, lambda signum, frame: _on_press())
    return True
  # Exiting ends the worker processes with their prefetched batches, which multiprocessing's resource tracker then
  # frees, warning about each kind: noise after the line. The tracker reads this environment when it starts, and
  # it starts now because starting it unblocks SIGINT in the thread that does (CPython's `ensure_running`).
  os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), _TRACKER_WARNINGS]))
  resource_tracker.ensure_running()
  # Python's C-level handler writes the signal's number to the wakeup pipe in whichever thread the signal reaches
  # (the watcher, which unblocks it, or a library thread started without the block); the Python-level handler,
  # which runs later on the main thread, does nothing.
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  signal.signal(signal.SIGINT, lambda signum, frame: None)
  signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  threading.Thread(target=_watch, args=(read_end,), name="ctrl-c", daemon=True).start()
  return True


def requested() -> bool:
  """Whether Ctrl-C was pressed (asked once per train step by `PreemptionWatch.should_stop`)."""
  return _State.presses > 0


def training(step: int) -> None:
  """Called after every train step `step` (1-based count of steps done): from now on the first Ctrl-C stops the
  run after a step, with a checkpoint, instead of at once."""
  with _State.lock:
    _State.stage, _State.last_step = TRAINING, step


def finishing() -> None:
  """Called once the last train step is done: from now on the first Ctrl-C exits at once (a rerun redoes the final
  evaluation, export and sweep); exits here if Ctrl-C came after the last step's check."""
  with _State.lock:
    _State.stage = FINISHING
    pending = _State.presses > 0
  if pending:
    exit_now()


def committed_steps(checkpoint_dir: str) -> list[int]:
  """The steps of the checkpoints Orbax has committed (renamed from their temporary directory), oldest first."""
  try:
    names = os.listdir(checkpoint_dir)
  except OSError:
    return []
  return sorted(int(name) for name in names if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name)))


def stop_line(step: int | None, checkpoint_dir: str) -> str:
  """`stopped by Ctrl-C at step N; ...` naming the checkpoint a rerun resumes from; `step` None: the last one."""
  steps = committed_steps(checkpoint_dir)
  step = step if step is not None else steps[-1] if steps else 0
  if not steps:
    return f"stopped by Ctrl-C at step {step}; no checkpoint yet; rerunning starts from the beginning"
  return (f"stopped by Ctrl-C at step {step}; last checkpoint: step {steps[-1]} ({checkpoint_dir}); rerun the same "
          "command to resume")


def exit_now(step: int | None = None, wait_for_save: bool = True) -> NoReturn:
  """Prints the line (for train step `step`, default the last one done) and exits with INTERRUPTED_EXIT_CODE, after
  the checkpoint being written is committed (`wait_for_save`; a second Ctrl-C cuts the wait short)."""
  directory = _State.checkpoint_dir or "checkpoints"
  if wait_for_save:
    _wait_for_saves(directory)
  with _State.exit_lock:
    line = stop_line(step if step is not None else _State.last_step, directory)
    try:  # nothing may keep the process from exiting
      # os.write, not print: the main thread may be inside a write to sys.stderr (a log line, the progress bar,
      # which a line of its own then follows on a terminal).
      cut_short = sys.stderr.isatty() and threading.current_thread() is not threading.main_thread()
      os.write(2, (("\n" if cut_short else "") + line + "\n").encode())
      for child in multiprocessing.active_children():  # Grain's workers, which os._exit would leave running
        child.terminate()
    except Exception:  # noqa: BLE001 - a closed stderr, a worker starting on the main thread
      pass
    os._exit(INTERRUPTED_EXIT_CODE)


def _watch(read_end: int) -> None:
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # so that some thread always takes the signal
  while True:
    for _ in range(os.read(read_end, 64).count(signal.SIGINT)):  # other signals' numbers (SIGTERM) are skipped
      _on_press()


def _on_press() -> None:
  with _State.lock:
    _State.presses += 1
    presses, stage = _State.presses, _State.stage
  if presses > 1:
    exit_now(wait_for_save=False)
  if stage == TRAINING:  # the trainer stops after the step in progress (PreemptionWatch.should_stop)
    _hint_later("Ctrl-C: the run stops after the step in progress (an evaluation or a compilation in progress "
                "finishes first) and saves a checkpoint there; press Ctrl-C again to quit now")
  else:  # nothing to lose: exit from another thread, so that this one still takes a second Ctrl-C
    threading.Thread(target=exit_now, name="ctrl-c exit", daemon=True).start()


def _wait_for_saves(directory: str) -> None:
  """Returns once no checkpoint of `directory` is being written, or at a second Ctrl-C."""
  start = time.monotonic()
  hinted = False
  while _State.presses < 2:
    writing = [name for name in _saves_in_flight(directory) if name not in _State.stale]
    if not writing:
      return
    if not hinted and time.monotonic() - start > HINT_SECONDS:
      hinted = True
      log.warning("Ctrl-C: waiting for the checkpoint being written (%s) to be complete; press Ctrl-C again to quit "
                  "now without it", writing[0])
    time.sleep(_POLL_SECONDS)


def _saves_in_flight(directory: str) -> list[str]:
  try:
    return [name for name in os.listdir(directory) if _TMP_MARK in name]
  except OSError:
    return []


def _hint_later(text: str) -> None:
  """Logs `text` if the process is still there in HINT_SECONDS (a quick stop prints its line alone)."""
  timer = threading.Timer(HINT_SECONDS, log.warning, args=(text,))
  timer.daemon = True
  timer.start()
