"""Orbax checkpoints of the training state, the Grain iterator state and run metadata, saved together."""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """One Orbax CheckpointManager; a checkpoint holds `state`, `data` (iterator position) and `meta` (JSON).

  Saves are asynchronous and atomic: a run killed while writing leaves the previous checkpoint as the latest.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    # Orbax wants absolute paths; a relative --workdir is relative to where the command runs.
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict[str, Any]) -> None:
    """Every process calls this: each writes its shards of `state` and its own iterator position."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, state_template: Any, data_iterator: Any | None) -> tuple[Any, dict[str, Any]] | None:
    """Restores the latest checkpoint into `state_template`'s structure and shardings (which may come from another
    mesh than the one that saved it) and moves `data_iterator` to the saved position. Returns (state, meta), or
    None when there is no checkpoint."""
    step = self.manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = dict(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    log.info("restored checkpoint at step %d", step)
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
