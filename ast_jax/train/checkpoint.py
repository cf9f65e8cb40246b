"""Orbax checkpoints of the training state, the Grain iterator state and run metadata, saved together.

What protects a run's checkpoints:
- Saves are asynchronous and atomic: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when every
  file is written, so a run killed while saving leaves the previous checkpoint as the latest; the temporary
  directory is deleted when the run starts again.
- Every checkpoint's metadata holds a digest of the state (one 32-bit sum per leaf over the raw bits, each
  element weighted by its position, so any single flipped bit or moved element changes it). A restore recomputes
  it; a checkpoint that fails to read or whose digest differs is moved to `<workdir>/corrupt_checkpoints/` with a
  warning, and the previous one is used (`CorruptCheckpoint` tells the trainer to start over from it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ast_jax.train import faults

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
  """The latest checkpoint is intact but holds a state of other shapes than the run's model: it was written for
  another model config or by an earlier parameter layout. It is left where it is."""


class CorruptCheckpoint(RuntimeError):
  """The latest checkpoint could not be restored and has been moved aside; the run restarts from the previous one."""


class CheckpointWriteError(RuntimeError):
  """An asynchronous save failed (a full disk, lost permissions); the checkpoints committed before it are intact."""


@jax.jit
def state_digest(tree: Any) -> list[jax.Array]:
  """One uint32 per leaf: sum over elements of (raw bits) * (2 * linear index + 1), modulo 2^32. Computed on the
  global (possibly sharded) arrays with iotas, without reshaping them."""

  def digest(leaf: jax.Array) -> jax.Array:
    leaf = jnp.asarray(leaf)
    if leaf.dtype.itemsize == 8:  # two 32-bit words per element
      bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[leaf.dtype.itemsize]
      bits = leaf if leaf.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(leaf, unsigned)
      bits = bits.astype(jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    for axis in range(bits.ndim):
      stride = int(np.prod(bits.shape[axis + 1:], dtype=np.int64)) & 0xFFFFFFFF
      index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)

  return [digest(leaf) for leaf in jax.tree.leaves(tree)]


def digest_of(state: Any) -> list[int]:
  return [int(value) for value in jax.device_get(state_digest(state))]


class Checkpointer:
  """One Orbax CheckpointManager; a checkpoint holds `state`, `data` (iterator position) and `meta` (JSON, with the
  state's digest)."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    # Orbax wants absolute paths; a relative --workdir is relative to where the command runs.
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._writing: int | None = None  # the step of the save in flight

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict[str, Any]) -> None:
    """Every process calls this: each writes its shards of `state` and its own iterator position."""
    meta = {**meta, "digest": digest_of(state)}
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    faults.during_save(self.directory, step)
    with self._write_errors():  # the previous save's error, if any, surfaces here
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._writing = step

  @contextlib.contextmanager
  def _write_errors(self):
    try:
      yield
    except Exception as error:  # noqa: BLE001 - TensorStore reports a full disk as ValueError, the OS as OSError
      committed = self.manager.all_steps()
      last = f"the last complete checkpoint is step {max(committed)}" if committed else "no checkpoint is complete"
      text = str(error) or type(error).__name__
      reason = re.search(r"No space left on device|Permission denied|Read-only file system|Disk quota exceeded", text)
      detail = reason.group(0) if reason else text.splitlines()[0][:300]
      raise CheckpointWriteError(
          f"writing the checkpoint of step {self._writing} in {self.directory} failed ({detail}); {last}. "
          "Free space there (or fix its permissions) and run the same command again to resume.") from None

  def restore(self, state_template: Any, data_iterator: Any | None) -> tuple[Any, dict[str, Any]] | None:
    """Restores the latest checkpoint into `state_template`'s structure and shardings (which may come from another
    mesh than the one that saved it) and moves `data_iterator` to the saved position. Returns (state, meta), or
    None when there is no checkpoint.

    Raises `CorruptCheckpoint` after moving an unreadable or corrupt latest checkpoint aside: the caller starts
    again, from the previous one (from the beginning when it was the only one).
    """
    step = self.manager.latest_step()
    if step is None:
      return None
    mismatch = _agree(self._shape_mismatch(step, state_template))
    if mismatch is not None:
      raise CheckpointMismatch(
          f"checkpoint {step} in {self.directory} holds a state of other shapes than this run's model ({mismatch}): "
          "it was written for another model config, or by an earlier ast_jax whose attention kernels were stored "
          "fused. It is left as it is. Train in a new workdir, starting from its weights with "
          f"--config.init_from=ast_jax:{os.path.dirname(self.directory)} (the optimiser state starts afresh), or "
          "run the config that wrote it.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    problem = None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      problem = _digest_problem(restored["state"], restored["meta"])
    except Exception as error:  # noqa: BLE001 - Orbax, TensorStore and JSON raise many types for damaged files
      problem = f"{type(error).__name__}: {str(error).splitlines()[0].rstrip('.') if str(error) else ''}"
    # Every process must take the same branch: a problem anywhere is a problem everywhere.
    problem = _agree(problem)
    if problem is None:
      log.info("restored checkpoint at step %d", step)
      return restored["state"], restored["meta"]
    self._move_aside(step, problem)
    raise CorruptCheckpoint(f"checkpoint {step} in {self.directory} is unusable ({problem}); moved to "
                            f"{self.corrupt_directory}")

  def _shape_mismatch(self, step: int, state_template: Any) -> str | None:
    """The first array whose saved shape (from the checkpoint's metadata) differs from the template's, or that one
    side lacks; None when they agree or the metadata cannot be read (then the restore itself judges the files)."""
    try:
      metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
      metadata = getattr(metadata, "item_metadata", metadata)
      saved = _shapes(getattr(metadata, "tree", metadata))
    except Exception:  # noqa: BLE001 - damaged metadata is the corrupt-checkpoint path's to report
      return None
    expected = _shapes(state_template)
    for path in sorted(set(saved) | set(expected)):
      if saved.get(path) != expected.get(path):
        return (f"{path}: saved {list(saved[path]) if path in saved else 'absent'}, model "
                f"{list(expected[path]) if path in expected else 'absent'}")
    return None

  def _move_aside(self, step: int, problem: str) -> None:
    previous = [s for s in self.manager.all_steps() if s < step]
    log.warning("checkpoint %d is unusable: %s. Moving it to %s; %s", step, problem, self.corrupt_directory,
                f"resuming from checkpoint {max(previous)}" if previous else "no earlier checkpoint is left: the "
                "run starts from the beginning")
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      target = os.path.join(self.corrupt_directory, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
      shutil.move(os.path.join(self.directory, str(step)), target)
    multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()

  def wait(self) -> None:
    with self._write_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every array of a state (or of a checkpoint's metadata tree)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda leaf: hasattr(leaf, "shape"))[0]
  return {"/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path):
          tuple(int(size) for size in leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _digest_problem(state: Any, meta: dict[str, Any]) -> str | None:
  expected = meta.get("digest")
  if expected is None:
    return None  # written before digests existed
  actual = digest_of(state)
  if len(actual) != len(expected):
    return f"the state has {len(actual)} arrays, its digest {len(expected)}"
  bad = [path for (path, _), a, e in zip(jax.tree_util.tree_leaves_with_path(state), actual, expected) if a != e]
  if bad:
    names = ", ".join(jax.tree_util.keystr(path) for path in bad[:3])
    return f"{len(bad)} array(s) differ from the digest written with them ({names}{', ...' if len(bad) > 3 else ''})"
  return None


def _agree(problem: str | None) -> str | None:
  """The first process's problem if any process has one (single-process runs: `problem`)."""
  if jax.process_count() == 1:
    return problem
  flags = multihost_utils.process_allgather(np.asarray(problem is not None))
  if not np.any(flags):
    return None
  return problem or "unusable on another process"
