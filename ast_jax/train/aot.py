"""Ahead-of-time compilation of the trainer's steps, and what the compiled programs say about memory, FLOPs and
communication. `python -m ast_jax.compile` is the command line; the programs come from `train/programs.py`, so they
are the ones the trainer runs.

Reports per program (train step, eval step), per chip:
- memory by kind from XLA's buffer assignment (`memory_analysis()`): arguments (parameters, optimiser state, the
  batch), outputs, outputs aliased to donated arguments (the updated state reuses the old state's buffers, counted
  once), temporaries (activations and workspace), generated code; their peak sum against the chip's HBM;
- FLOPs: the analytic count (`models/flops.py`) divided over the chips, and XLA's count of the program;
- collectives in the optimised HLO by kind (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute):
  how many run per step and the bytes of the arrays they reduce or gather, loop bodies counted once per trip (XLA's
  known trip count, else the bound its loop condition compares with: a scan over N layers counts N);
- a roofline step time: the larger of compute (analytic FLOPs per chip / the chip's peak) and memory traffic (XLA's
  bytes accessed / the chip's HBM bandwidth). An estimate from the vendor's peak figures, never a measurement; XLA's
  own `optimal_seconds` is left out (it has come back negative). XLA's cost analysis counts a loop's body once, so
  for a program with loops (scanned layers) its FLOPs fall short of the analytic count by about the trip count;
  the memory traffic is then scaled by analytic / XLA FLOPs (`loop_scale`), which slightly overstates the traffic
  outside the loop (the optimiser update): a conservative estimate.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


def _array_bytes(text: str) -> list[float]:
  return [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(text)]


def _group_size(attributes: str) -> int:
  """Devices per replica group of a collective, from `replica_groups={{0,1},{2,3}}` or the iota form
  `replica_groups=[2,2]<=[4]` (groups x size)."""
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", attributes)
  if listed:
    return len([x for x in listed.group(1).split(",") if x])
  return 1


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count': per step, 'bytes': per step}} for the collectives of an optimised HLO module's text.

  Bytes are the full arrays a collective works on, per chip (every array of a combined one): an all-reduce's or
  all-to-all's buffers, an all-gather's gathered results, a reduce-scatter's inputs, a permute's buffers. Async
  pairs count once (at `-start`). A while
  loop's body counts once per trip: XLA's `known_trip_count` where the HLO has it, else the largest s32 constant
  of the loop's condition (a counter from 0 compared with the trip count, as `lax.scan` lowers).
  """
  own: dict[str, dict[str, list[float]]] = {}
  loops: dict[str, list[tuple[str, int | None, str | None]]] = {}
  constants: dict[str, list[int]] = {}  # s32 scalar constants per computation: a loop condition's bound
  calls: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      own.setdefault(current, {})
      loops.setdefault(current, [])
      calls.setdefault(current, [])
      if line.startswith("ENTRY"):
        entry = current
      continue
    if current is None:
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    shape, opcode, rest = instruction.groups()
    if opcode == "constant" and re.fullmatch(r"s32\[\](\{.*\})?", shape.strip()):
      constants.setdefault(current, []).append(int(re.match(r"(-?\d+)", rest).group(1)))
      continue
    if opcode == "while":
      body = re.search(r"body=%?([\w.\-]+)", rest)
      condition = re.search(r"condition=%?([\w.\-]+)", rest)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      if body:
        loops[current].append((body.group(1), int(trips.group(1)) if trips else None,
                               condition.group(1) if condition else None))
      continue
    if opcode in ("call", "conditional", "async-start"):
      calls[current].extend(re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", rest))
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES or opcode.endswith("-done"):
      continue
    sizes = _array_bytes(shape)
    if not sizes:
      continue
    size = sum(sizes)  # a combined collective's result is a tuple: every array in it
    group = _group_size(rest)
    if opcode.endswith("-start") and kind == "all-gather":  # (operands, results): a result is `group` operands
      size *= group / (group + 1)
    elif opcode.endswith("-start") and kind in ("collective-permute", "all-to-all"):  # operands and results alike
      size /= 2
    elif kind == "reduce-scatter" and not opcode.endswith("-start"):
      size *= group
    own[current].setdefault(kind, []).append(size)

  def totals(name: str, seen: frozenset[str]) -> dict[str, list[float]]:
    if name in seen:
      return {}
    result = {kind: [float(len(sizes)), float(sum(sizes))] for kind, sizes in own.get(name, {}).items()}
    nested = [(body, trips if trips is not None else max(constants.get(condition, [1]) or [1]))
              for body, trips, condition in loops.get(name, [])] + [(callee, 1) for callee in calls.get(name, [])]
    for callee, trips in nested:
      for kind, (count, size) in totals(callee, seen | {name}).items():
        entry_total = result.setdefault(kind, [0.0, 0.0])
        entry_total[0] += trips * count
        entry_total[1] += trips * size
    return result

  if entry is None:
    return {}
  return {kind: {"count": count, "bytes": size} for kind, (count, size) in sorted(totals(entry, frozenset()).items())}


def memory_stats(compiled: Any) -> dict[str, float]:
  """Per-chip bytes by kind from XLA's buffer assignment, and their peak sum (aliased outputs counted once)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  stats = {kind: float(getattr(analysis, f"{kind}_size_in_bytes", 0) or 0)
           for kind in ("argument", "output", "alias", "temp", "generated_code")}
  stats["total"] = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"] + stats["generated_code"]
  return stats


def cost_stats(compiled: Any) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed of the (per-chip) program."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"xla_flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


@dataclasses.dataclass
class ProgramReport:
  name: str  # 'train' | 'eval'
  compile_seconds: float
  memory: dict[str, float]
  cost: dict[str, float]
  collectives: dict[str, dict[str, float]]
  analytic_flops_per_chip: float
  compiler_message: str = ""  # set when the compiler refused the program (out of HBM)
  has_loops: bool = False  # the optimised program has while loops (scanned layers)

  @property
  def loop_scale(self) -> float:
    """How much XLA's per-program counts fall short for looped programs (1 without loops)."""
    if not self.has_loops or not self.cost["xla_flops"]:
      return 1.0
    return max(1.0, self.analytic_flops_per_chip / self.cost["xla_flops"])

  @property
  def collective_bytes(self) -> float:
    return sum(stats["bytes"] for stats in self.collectives.values())

  def roofline(self, peak_flops: float | None, hbm_bandwidth: float | None) -> dict[str, float | None]:
    """Estimated seconds: compute-bound, memory-bound and their max (None without the chip's figures or, for the
    memory bound, a compiled program)."""
    compute = self.analytic_flops_per_chip / peak_flops if peak_flops else None
    traffic = self.cost["bytes_accessed"] * self.loop_scale
    memory = traffic / hbm_bandwidth if hbm_bandwidth and traffic else None
    bound = max((x for x in (compute, memory) if x is not None), default=None)
    return {"compute_seconds": compute, "memory_seconds": memory, "step_seconds": bound}

  def as_dict(self) -> dict[str, Any]:
    return {"name": self.name, "compile_seconds": self.compile_seconds, "memory": self.memory, "cost": self.cost,
            "collectives": self.collectives, "collective_bytes": self.collective_bytes,
            "analytic_flops_per_chip": self.analytic_flops_per_chip, "compiler_message": self.compiler_message,
            "loop_scale": self.loop_scale}


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], sharding: Any) -> dict[str, Any]:
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, (shape, dtype) in shapes.items()}


_OUT_OF_MEMORY = re.compile(r"memory required for (?:HLO )?(\w+) \(([\d.]+)([KMGT])\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_program(name: str, jitted: Any, args: tuple[Any, ...], analytic_flops_per_chip: float) -> ProgramReport:
  """Lowers and compiles `jitted` (a `sharded_jit` function) at the abstract `args`, and reads its analyses.

  The TPU compiler itself refuses a program whose buffers exceed the chip's HBM (RESOURCE_EXHAUSTED); that comes
  back as a report too, with `memory` holding what the compiler said it needed (`compiler_limit`: the HBM it had).
  """
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as error:  # noqa: BLE001 - jaxlib's runtime error type differs between releases
    found = _OUT_OF_MEMORY.search(str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or not found:
      raise
    kind, needed, unit, limit, limit_unit = found.groups()
    needed_bytes = float(needed) * _UNITS[unit]
    memory = {"argument": 0.0, "output": 0.0, "alias": 0.0, "temp": needed_bytes if kind == "temporaries" else 0.0,
              "generated_code": 0.0, "total": needed_bytes, "compiler_limit": float(limit) * _UNITS[limit_unit]}
    return ProgramReport(name, time.perf_counter() - start, memory, {"xla_flops": 0.0, "bytes_accessed": 0.0}, {},
                         analytic_flops_per_chip, compiler_message=str(error).splitlines()[0])
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  return ProgramReport(name, seconds, memory_stats(compiled), cost_stats(compiled), collective_stats(text),
                       analytic_flops_per_chip, has_loops=" while(" in text)
