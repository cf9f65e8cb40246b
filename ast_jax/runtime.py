"""Process set-up: the memory allocator (entry points) and the TPU plugin on machines without TPUs (every import).

XLA on CPU allocates each step's temporary buffers afresh (about 1.4 GB for an AST-tiny train step at 1212 tokens,
batch 4). With glibc's malloc every large buffer is a new mmap, so every step pays a page fault per 4 KiB page of
it. tcmalloc keeps freed memory mapped, and a 2-core CPU train step takes 15-30 % less time with it
(docs/RESULTS.md). The entry points (`ast_jax.main`, `ast_jax.predict`, `ast_jax.bench`) therefore restart
themselves once with tcmalloc preloaded when it is installed (Debian/Ubuntu: `apt-get install
libtcmalloc-minimal4`), as JAX pod set-ups commonly do. `AST_JAX_MALLOC=system` keeps the system allocator.

`requirements-tpu.txt` installs libtpu so that `python -m ast_jax.compile` can build TPU pod executables on any
machine. Installed where there is no TPU chip, libtpu would still be started by JAX's first device query and print
a screen of start-up errors into every CPU run and test. Importing `ast_jax` therefore leaves the TPU backend out
(`jax_platforms=cpu`) when libtpu is installed, no TPU chip, NVIDIA or AMD GPU is visible, and `JAX_PLATFORMS` is
unset (`skip_absent_tpu`); compiling for a TPU topology does not need the backend, only the plugin.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping


TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(directories: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
  for directory in directories:
    for name in TCMALLOC_NAMES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def tcmalloc_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
  """The environment to restart with, or None when no restart is needed or wanted."""
  if environ.get("AST_JAX_MALLOC", "tcmalloc") == "system" or library is None:
    return None
  preloaded = environ.get("LD_PRELOAD", "")
  if "tcmalloc" in preloaded:
    return None
  return {**environ, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def restart_with_tcmalloc() -> None:
  """Re-executes this command with tcmalloc preloaded, once; does nothing off Linux, without tcmalloc, or when
  the command already runs with it. Call it before anything heavy is imported."""
  if not sys.platform.startswith("linux"):
    return
  environ = tcmalloc_environment(os.environ, find_tcmalloc())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def skip_absent_tpu() -> bool:
  """Runs JAX on the CPU alone when libtpu is installed but nothing besides the CPU could run (see the module
  docstring). Returns True when it did so. Does nothing once JAX's backends have started."""
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False
  try:  # JAX's own hardware probes (the ones it uses to pick backends); internal, so a change here disables this
    from jax._src import hardware_utils
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
      return False
    if (hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu()
        or hardware_utils.num_available_amd_gpus(stop_at=1)):
      return False
  except (ImportError, AttributeError, TypeError):
    return False
  import jax

  jax.config.update("jax_platforms", "cpu")
  return True
