"""The platform the step programs are built for: the local backend, or the one an ahead-of-time compile targets.

Some choices depend on the hardware a program runs on: the attention implementation (`attention=auto`), the AuM
selective-scan method (`scan=auto`) and whether the front end loops over clips (fast on CPU caches, slow on
accelerators). They are made while a step is traced, and must follow the device the program is compiled for:
`python -m ast_jax.compile --topology=v5e:16x16` traces on a CPU host for a TPU pod, and a TPU executable with the
CPU's choices inside would be a different program from the one the pod runs. Code that chooses asks
`platform()`; the compile command traces under `compiling_for('tpu')`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("ast_jax_target_platform", default=None)


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform being compiled for (`compiling_for`), else JAX's default backend."""
  target = _TARGET.get()
  if target is not None:
    return target
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm") else backend


@contextlib.contextmanager
def compiling_for(target: str) -> Iterator[None]:
  """Traces inside this context make the choices of `target` ('cpu', 'gpu' or 'tpu')."""
  if target not in PLATFORMS:
    raise ValueError(f"unknown platform {target!r}; expected one of {PLATFORMS}")
  token = _TARGET.set(target)
  try:
    yield
  finally:
    _TARGET.reset(token)
