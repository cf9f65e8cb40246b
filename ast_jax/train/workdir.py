"""The work directory checked before any compute: writable, and with room for the checkpoints the run will write."""

from __future__ import annotations

import errno
import os
import shutil
import uuid

import jax
import ml_collections
import numpy as np

from ast_jax.train.config_checks import ConfigError

_MARGIN = 1.25  # file-format overhead, metadata, TensorBoard and metrics files


def checkpoint_bytes(config: ml_collections.ConfigDict) -> int:
  """Bytes one checkpoint of `config` takes, from the parameter shapes (nothing is computed): float32 parameters,
  Adam's two moments, and the weight-average sum when averaging is on."""
  from ast_jax.models import build_model, example_inputs

  model = build_model(config)
  shapes = jax.eval_shape(lambda rng: model.init(rng, *example_inputs(config))["params"], jax.random.key(0))
  params = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(shapes))
  return params * (4 if config.train.average_weights[0] > 0 else 3)


def check_workdir(workdir: str, checkpoint_size: int) -> None:
  """Raises `ConfigError`, naming the fix, when `workdir` cannot be created or written, or when its file system
  lacks room for one more checkpoint plus the exported model (Orbax writes a new checkpoint before it deletes the
  oldest)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex}")
    with open(probe, "wb") as handle:
      handle.write(b"\0" * 4096)
      handle.flush()
      os.fsync(handle.fileno())
    os.remove(probe)
  except OSError as error:
    if error.errno == errno.ENOSPC:
      raise ConfigError(f"workdir {workdir!r}: the file system is full ({error.strerror}); free space there or "
                        "choose another --workdir") from None
    raise ConfigError(f"workdir {workdir!r} is not writable ({error.strerror or error}); fix its permissions or "
                      "choose another --workdir") from None
  needed = int(_MARGIN * (checkpoint_size + checkpoint_size / 3))  # a checkpoint and the exported float32 model
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise ConfigError(f"workdir {workdir!r} has {free / 2**20:.1f} MiB free, but a checkpoint and the exported "
                      f"model need about {needed / 2**20:.1f} MiB; free space there or choose another --workdir")
