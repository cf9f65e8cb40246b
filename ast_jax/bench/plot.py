"""bench.png: train time per step against tokens (ast_jax and, when measured, PyTorch), and throughput or memory.

matplotlib is optional: without it the sweep still writes its CSV and skips the figure with a warning.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence


def _series(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Rows grouped into lines: one per model, batch and switches, ordered by tokens."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    label = f"{row.get('backbone', 'ast')}-{row['variant']} D={row['width']} b{row['batch']} {row['dtype']}"
    if row.get("attention"):
      label += f" {row['attention']}"
    if row.get("remat", "none") != "none":
      label += f" remat={row['remat']}"
    if row.get("scan_layers"):
      label += " scan"
    groups.setdefault(label, []).append(row)
  return {label: sorted(group, key=lambda row: row["tokens"]) for label, group in groups.items()}


def plot_rows(rows: Sequence[dict[str, Any]], path: str) -> str | None:
  """Writes the two-panel figure to `path`; returns the path, or None when matplotlib is missing."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    logging.warning("matplotlib is not installed: %s not written (the CSV has every number)", path)
    return None
  has_memory = all(row.get("peak_memory_mb") is not None for row in rows)
  figure, (time_axis, other_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
  for index, (label, group) in enumerate(_series(rows).items()):
    color = f"C{index % 10}"
    tokens = [row["tokens"] for row in group]
    time_axis.plot(tokens, [row["ms_per_step"] for row in group], "o-", color=color, label=f"ast_jax {label}")
    torch_points = [(row["tokens"], row["torch_ms_per_step"]) for row in group
                    if row.get("torch_ms_per_step") is not None]
    if torch_points:
      # transformers' AST uses PyTorch's SDPA whatever our attention switch is
      torch_label = f"transformers {label.split(' ' + group[0]['attention'])[0]} sdpa"
      time_axis.plot(*zip(*torch_points), "s--", color=color, label=torch_label)
    if has_memory:
      other_axis.plot(tokens, [row["peak_memory_mb"] for row in group], "o-", color=color, label=label)
    else:
      other_axis.plot(tokens, [row["examples_per_sec"] for row in group], "o-", color=color, label=label)
  time_axis.set(xlabel="tokens per example", ylabel="train ms / step", title="Train step time", xscale="log",
                yscale="log")
  if has_memory:
    sources = sorted({row["memory_source"] for row in rows})
    other_axis.set(xlabel="tokens per example", ylabel="MiB", title=f"Peak memory ({', '.join(sources)})",
                   xscale="log", yscale="log")  # linear growth is a slope-1 line
  else:
    other_axis.set(xlabel="tokens per example", ylabel="examples / s", title="Train throughput", xscale="log")
  for axis in (time_axis, other_axis):
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
  device = rows[0]["device"] if rows else ""
  names = {"ast": "AST", "aum": "AuM"}
  backbones = sorted({names.get(str(row.get("backbone", "ast")), str(row.get("backbone"))) for row in rows})
  figure.suptitle(f"{' vs '.join(backbones)} train step on {device}")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path
