"""Where metrics go: `metrics.jsonl` (one JSON object per evaluation), TensorBoard scalars, a progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


def _json_value(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN; null says "undefined" (e.g. mAP without positives)
  return value


class MetricsWriter:
  """Appends evaluation records to `workdir/metrics.jsonl` and scalars to TensorBoard (process 0 only).

  On resume from step `resume_step`, records written after that step by the interrupted run are dropped first,
  so the file reads as if the run had never stopped.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step or None)

  def _records(self) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line cut short (a kill or a full disk while appending) is dropped."""
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as handle:
      for number, line in enumerate(handle, 1):
        if not line.strip():
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          log.warning("%s line %d is incomplete (the run was stopped while writing it); dropped", self.path, number)
    return records

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    kept = [record for record in self._records() if record.get("step", 0) <= step]
    with open(self.path + ".tmp", "w") as handle:
      handle.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(self.path + ".tmp", self.path)

  def last_record(self) -> dict[str, Any] | None:
    """The last evaluation record in metrics.jsonl, or None."""
    records = self._records()
    return records[-1] if records else None

  def write_record(self, record: dict[str, Any]) -> None:
    """One evaluation: appended to metrics.jsonl and mirrored to TensorBoard under `eval/`."""
    if not self.enabled:
      return
    record = {key: _json_value(value) for key, value in record.items()}
    with open(self.path, "a") as handle:
      handle.write(json.dumps(record) + "\n")
    prefix = "eval_averaged" if record.get("weights") == "averaged" else "eval"
    self.write_scalars(record["step"], {f"{prefix}/{k}": v for k, v in record.items()
                                        if isinstance(v, (int, float)) and k not in ("step", "epoch")})

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._tb is None:
      return
    for name, value in scalars.items():
      value = _json_value(value)
      if value is not None:
        self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A tqdm bar on a terminal; plain log lines every `log_every` steps otherwise (CI, files, pods)."""

  def __init__(self, total: int, initial: int, log_every: int, enabled: bool = True):
    self.log_every = max(1, log_every)
    self.total = total
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, step: int, epoch: int, loss: float | None, examples_per_sec: float) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if loss is not None:
        self._bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", ex_per_s=f"{examples_per_sec:.1f}", refresh=False)
    elif loss is not None and (step % self.log_every == 0 or step == self.total):
      log.info("step %d/%d epoch %d loss %.4f %.1f examples/s", step, self.total, epoch, loss, examples_per_sec)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
