"""Runs N copies of a command on this machine as one multi-process JAX run (jax.distributed over localhost).

  python launch/local.py --num_processes=2 [--devices_per_process=K] -- \\
      python -m ast_jax.main --config=configs/demo.py --workdir=/tmp/demo_2p
  python launch/local.py --num_processes=2 -- -m ast_jax.main ...      # '-m ...': this Python interpreter

Process i gets AST_JAX_COORDINATOR=127.0.0.1:<free port>, AST_JAX_NUM_PROCESSES=N and AST_JAX_PROCESS_ID=i (read by
ast_jax.parallel.distributed.initialize), `--distributed` is added to an `ast_jax.main` command that lacks it, and
`--devices_per_process=K > 1` gives each process K CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K).
Output lines are prefixed `[p0]`, `[p1]`, ...; when one process fails the others are stopped, and the launcher
exits with the first non-zero exit code. Ctrl-C is passed on to every process (they run in sessions of their own, out
of the terminal's reach), which then stop by themselves: `ast_jax.main` after the same step, with a checkpoint, exit
status 130 (ast_jax/train/interrupt.py); a second Ctrl-C is passed on too, a third kills them. `launch(...)` is the
same, importable (tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping the other processes
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass
class LaunchResult:
  returncode: int  # the first non-zero exit code (128 + signal for a signal), else 0
  outputs: list[list[str]]  # each process's output lines (stdout and stderr), without the prefix


def free_port() -> int:
  """A TCP port that nothing listens on now (the coordinator binds it moments later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_command(command: Sequence[str]) -> list[str]:
  """`-m module ...` runs under this interpreter; `-m ast_jax.main` gets `--distributed` if it lacks it."""
  command = list(command)
  if not command:
    raise ValueError("no command to launch")
  if command[0] == "-m":
    command.insert(0, sys.executable)
  if "--distributed" not in command:
    for i in range(len(command) - 1):
      if command[i] == "-m" and command[i + 1] == "ast_jax.main":
        command.insert(i + 2, "--distributed")
        break
  return command


def process_env(base: dict[str, str], coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`: the AST_JAX_* variables and, for K > 1, K host-platform devices."""
  env = dict(base, AST_JAX_COORDINATOR=coordinator, AST_JAX_NUM_PROCESSES=str(num_processes),
             AST_JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if devices_per_process > 1:
    flags = [flag for flag in env.get("XLA_FLAGS", "").split() if not flag.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
           env: dict[str, str] | None = None, cwd: str | None = None, stream: TextIO | None = None,
           timeout: float | None = None) -> LaunchResult:
  """Starts `num_processes` copies of `command`, streams their prefixed output to `stream`, waits for all."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("num_processes and devices_per_process must be at least 1")
  command = process_command(command)
  stream = stream if stream is not None else sys.stdout
  coordinator = f"127.0.0.1:{free_port()}"
  base_env = dict(os.environ if env is None else env)
  outputs: list[list[str]] = [[] for _ in range(num_processes)]
  lock = threading.Lock()
  processes, readers = [], []
  ctrl_c = _CtrlC(processes)
  try:
    for process_id in range(num_processes):
      # Own session per process: stopping one also stops whatever it started.
      process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", bufsize=1, start_new_session=True,
                                 env=process_env(base_env, coordinator, num_processes, process_id,
                                                 devices_per_process))
      processes.append(process)
      reader = threading.Thread(target=_relay, args=(process, f"[p{process_id}] ", outputs[process_id], stream, lock),
                                daemon=True)
      reader.start()
      readers.append(reader)
    returncode = _wait(processes, timeout, stream, lock, ctrl_c)
  except BaseException:
    _stop(processes)  # a failed start, SIGTERM or SIGHUP: leave nothing running
    raise
  finally:
    ctrl_c.close()
  for reader in readers:
    reader.join()
  return LaunchResult(returncode, outputs)


def _relay(process: subprocess.Popen, prefix: str, lines: list[str], stream: TextIO, lock: threading.Lock) -> None:
  for line in process.stdout:
    line = line.rstrip("\n")
    lines.append(line)
    with lock:
      stream.write(prefix + line + "\n")
      stream.flush()


def _wait(processes: list[subprocess.Popen], timeout: float | None, stream: TextIO, lock: threading.Lock,
          ctrl_c: _CtrlC) -> int:
  """Waits for every process; on the first failure (or the timeout) stops the rest, unless Ctrl-C was passed on:
  then each stops by itself. Returns the exit code."""
  deadline = None if timeout is None else time.monotonic() + timeout
  first_failure = 0
  while True:
    codes = [process.poll() for process in processes]
    for process_id, code in enumerate(codes):
      if code and not first_failure:
        first_failure = 128 - code if code < 0 else code
        if not ctrl_c.presses:
          _note(stream, lock, f"process {process_id} exited with {code}; stopping the others")
          _stop(processes)
    if all(code is not None for code in codes):
      return first_failure
    if deadline is not None and time.monotonic() > deadline:
      _note(stream, lock, f"timed out after {timeout:.0f} s; stopping every process")
      _stop(processes)
      return first_failure or 124
    time.sleep(0.1)


def _stop(processes: list[subprocess.Popen]) -> None:
  """SIGTERM to every running process group, SIGKILL to those still there after a grace period."""
  running = [process for process in processes if process.poll() is None]
  for process in running:
    _signal_group(process, signal.SIGTERM)
  deadline = time.monotonic() + _GRACE_SECONDS
  for process in running:
    try:
      process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(process, signal.SIGKILL)
      process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
  try:
    os.killpg(process.pid, sig)
  except ProcessLookupError:
    pass  # already gone


class _CtrlC:
  """While installed (main thread only), Ctrl-C goes to every running process's group instead of raising
  KeyboardInterrupt here; the third one kills them."""

  def __init__(self, processes: list[subprocess.Popen]):
    self.processes, self.presses = processes, 0
    self.installed = threading.current_thread() is threading.main_thread()
    if self.installed:
      self.previous = signal.signal(signal.SIGINT, self._on_sigint)

  def _on_sigint(self, signum: int, frame: object) -> None:
    self.presses += 1
    for process in self.processes:
      if process.poll() is None:
        _signal_group(process, signal.SIGKILL if self.presses >= 3 else signal.SIGINT)

  def close(self) -> None:
    if self.installed:  # None: set outside Python, so the default goes back
      signal.signal(signal.SIGINT, signal.default_int_handler if self.previous is None else self.previous)
      self.installed = False


def _note(stream: TextIO, lock: threading.Lock, message: str) -> None:
  with lock:
    stream.write(f"[launch] {message}\n")
    stream.flush()


def _exit_on_signal(signum: int, frame: object) -> None:
  raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print(__doc__, file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(description="Run N copies of a command as one multi-process JAX run.",
                                   usage="%(prog)s --num_processes=N [--devices_per_process=K] -- COMMAND ...")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--timeout", type=float, default=None, help="seconds; then every process is stopped")
  args = parser.parse_args(argv[:split])
  for sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, _exit_on_signal)  # so that `launch` stops the processes (they run in their own sessions)
  result = launch(argv[split + 1:], args.num_processes, args.devices_per_process, timeout=args.timeout)
  return result.returncode


if __name__ == "__main__":
  sys.exit(main())
