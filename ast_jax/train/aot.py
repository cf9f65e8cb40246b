"""Ahead-of-time compilation of the trainer's steps, and what the compiled programs say about memory, FLOPs and
communication. `Target` (a TPU topology's devices, or the local ones), `compile_config` (every phase's train and
eval step, with the trainer's batch rule, mesh and platform choices) and `search_mesh` are what
`python -m ast_jax.compile` runs and prints; the programs come from `train/programs.py`, so they are the ones the
trainer runs.

Reports per program (train step, eval step), per chip:
- memory by kind from XLA's buffer assignment (`memory_analysis()`): arguments (parameters, optimiser state, the
  batch), outputs, outputs aliased to donated arguments (the updated state reuses the old state's buffers, counted
  once), temporaries (activations and workspace), generated code; their peak sum against the chip's HBM;
- FLOPs: the analytic count (`models/flops.py`) divided over the chips, and XLA's count of the program;
- collectives in the optimised HLO by kind (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute):
  how many run per step and the bytes of the arrays they reduce or gather, loop bodies counted once per trip (XLA's
  known trip count, else the bound its loop condition compares with: a scan over N layers counts N);
- a roofline step time: the larger of compute (analytic FLOPs per chip / the chip's peak) and memory traffic
  (`hbm_traffic`: each top-level instruction of the optimised program reading its operands and writing its result
  once, buffers in on-chip memory left out, loops once per trip / the chip's HBM bandwidth). An estimate from the
  vendor's peak figures, never a measurement. XLA's own `optimal_seconds` is left out (it has come back negative), and its FLOPs and bytes
  accessed are reported as they are: they count a loop's body once (scanned layers: about 1/depth of the program).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from ast_jax import target as target_lib
from ast_jax.data.inputs import batch_shapes, clips_per_packed_row
from ast_jax.models import config_flops, family_of
from ast_jax.parallel import logical_rules, make_mesh
from ast_jax.parallel.topology import chip_of, parse_topology, topology_devices
from ast_jax.train.batch_scaling import batch_fields
from ast_jax.train.config_checks import ConfigError, batch_for_mesh, validate_config
from ast_jax.train.phases import plan_phases
from ast_jax.train.programs import phase_programs
from ast_jax.train.throughput import peak_flops_per_device

log = logging.getLogger(__name__)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")


_ARRAY_LAYOUT = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")


def _array_bytes(text: str) -> list[float]:
  return [_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(text)]


def _hbm_bytes(text: str) -> float:
  """Bytes of the arrays in `text` that live in HBM: a layout's `S(1)` marks the alternate memory space (on-chip
  VMEM on TPU, where XLA's memory-space assignment keeps buffers it can), whose reads and writes cost no HBM."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims, layout in _ARRAY_LAYOUT.findall(text) if "S(1)" not in (layout or ""))


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


@dataclasses.dataclass
class _Module:
  """What the analyses need from an optimised HLO module's text, per computation: its collectives, the HBM bytes
  of its top-level instructions, the loops and calls it runs."""
  entry: str | None = None
  collectives: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
  traffic: dict[str, float] = dataclasses.field(default_factory=dict)
  loops: dict[str, list[tuple[str, int | None, str | None]]] = dataclasses.field(default_factory=dict)
  calls: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  constants: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # s32 scalars: a loop condition's bound

  def trips(self, trips: int | None, condition: str | None) -> int:
    return trips if trips is not None else max(self.constants.get(condition or "", []) or [1])

  def runs(self, name: str | None = None, times: float = 1.0, seen: frozenset[str] = frozenset()):
    """(computation, times it runs per execution of the program), from the entry through loops and calls."""
    name = self.entry if name is None else name
    if name is None or name in seen:
      return
    yield name, times
    for body, trips, condition in self.loops.get(name, []):
      yield from self.runs(body, times * self.trips(trips, condition), seen | {name})
    for callee in self.calls.get(name, []):
      yield from self.runs(callee, times, seen | {name})


# Instructions that move no HBM bytes of their own: views, tuples, the loop itself (its body is counted).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier"}


def _parse(hlo_text: str) -> _Module:
  module, current = _Module(), None
  sizes: dict[str, float] = {}  # instruction name (unique in a module) -> bytes of its result
  hbm: dict[str, float] = {}  # the same, counting only arrays in HBM (`_hbm_bytes`)
  parameters: dict[str, dict[str, int]] = {}  # computation -> {parameter's name: its index}
  sliced: dict[str, dict[int, float]] = {}  # fused computation -> {parameter index: bytes of the slice it reads}
  updated: dict[str, dict[int, float]] = {}  # fused computation -> {parameter index: bytes written in place}
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      for table in (module.collectives, module.loops, module.calls):
        table.setdefault(current, {} if table is module.collectives else [])
      module.traffic.setdefault(current, 0.0)
      if line.startswith("ENTRY"):
        module.entry = current
      continue
    instruction = _INSTRUCTION.match(line) if current is not None else None
    if not instruction:
      continue
    name, shape, opcode, rest = instruction.groups()
    result, in_hbm = sum(_array_bytes(shape)), _hbm_bytes(shape)
    sizes[name], hbm[name] = result, in_hbm
    operands = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
    own_parameters = parameters.setdefault(current, {})
    if opcode == "parameter":
      own_parameters[name] = int(re.match(r"(\d+)", rest).group(1))
    elif opcode == "bitcast" and operands and operands[0] in own_parameters:  # the same buffer, another shape
      own_parameters[name] = own_parameters[operands[0]]
    elif opcode == "dynamic-slice" and operands and operands[0] in own_parameters:
      sliced.setdefault(current, {})[own_parameters[operands[0]]] = result
    elif opcode == "dynamic-update-slice" and len(operands) > 1 and operands[0] in own_parameters:
      updated.setdefault(current, {})[own_parameters[operands[0]]] = sizes.get(operands[1], 0.0)
    elif opcode == "fusion":  # a nested fusion that slices or updates one of this computation's parameters
      inner = re.search(r"calls=%?([\w.\-]+)", rest)
      for index, operand in enumerate(operands):
        if inner and operand in own_parameters:
          for table in (sliced, updated):
            if index in table.get(inner.group(1), {}):
              table.setdefault(current, {})[own_parameters[operand]] = table[inner.group(1)][index]
    if opcode == "constant" and re.fullmatch(r"s32\[\](\{.*\})?", shape.strip()):
      module.constants.setdefault(current, []).append(int(re.match(r"(-?\d+)", rest).group(1)))
    if opcode == "while":
      body, condition = re.search(r"body=%?([\w.\-]+)", rest), re.search(r"condition=%?([\w.\-]+)", rest)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
      if body:
        module.loops[current].append((body.group(1), int(trips.group(1)) if trips else None,
                                      condition.group(1) if condition else None))
    if opcode in ("call", "conditional", "async-start"):
      module.calls[current].extend(re.findall(r"(?:to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", rest))
    if opcode not in _NO_TRAFFIC and not opcode.endswith("-done"):
      module.traffic[current] += _instruction_traffic(in_hbm, [hbm.get(operand, 0.0) for operand in operands],
                                                      opcode, rest, sliced, updated)
    kind = opcode.removesuffix("-start")
    if kind not in COLLECTIVES or opcode.endswith("-done") or not result:
      continue
    size = result  # a combined collective's result is a tuple: every array in it
    group = _group_size(rest)
    if opcode.endswith("-start") and kind == "all-gather":  # (operands, results): a result is `group` operands
      size *= group / (group + 1)
    elif opcode.endswith("-start") and kind in ("collective-permute", "all-to-all"):  # operands and results alike
      size /= 2
    elif kind == "reduce-scatter" and not opcode.endswith("-start"):
      size *= group
    module.collectives[current].setdefault(kind, []).append(size)
  return module


def _instruction_traffic(result: float, operands: list[float], opcode: str, rest: str,
                         sliced: dict[str, dict[int, float]], updated: dict[str, dict[int, float]]) -> float:
  """HBM bytes of one top-level instruction: its operands read and its result written, except that a slice read
  from a buffer (dynamic-slice) costs the slice, and a slice written into a buffer in place (dynamic-update-slice,
  as a scan stores each layer's activations) costs the slice, not the whole buffer."""
  if opcode == "custom-call" and not operands:  # a buffer allocated for a loop's outputs: nothing moves
    return 0.0
  if opcode == "dynamic-slice":
    return 2 * result
  if opcode == "dynamic-update-slice":
    return 2 * (operands[1] if len(operands) > 1 else result)
  if opcode == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    callee = called.group(1) if called else ""
    reads, writes = sliced.get(callee, {}), updated.get(callee, {})
    total = result
    for index, size in enumerate(operands):
      if index in writes:  # read and written in place: the update only, and the result is the same buffer
        total += writes[index] - size
      else:  # a sliced operand costs its slice (nothing when the operand is on chip)
        total += min(reads.get(index, size), size)
    return max(total, 0.0)
  return result + sum(operands)


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count': per step, 'bytes': per step}} for the collectives of an optimised HLO module's text.

  Bytes are the full arrays a collective works on, per chip (every array of a combined one): an all-reduce's or
  all-to-all's buffers, an all-gather's gathered results, a reduce-scatter's inputs, a permute's buffers. Async
  pairs count once (at `-start`). A while loop's body counts once per trip: XLA's `known_trip_count` where the HLO
  has it, else the largest s32 constant of the loop's condition (a counter from 0 compared with the trip count, as
  `lax.scan` lowers).
  """
  module, totals = _parse(hlo_text), {}
  for name, times in module.runs():
    for kind, sizes in module.collectives.get(name, {}).items():
      count, size = totals.get(kind, (0.0, 0.0))
      totals[kind] = (count + times * len(sizes), size + times * sum(sizes))
  return {kind: {"count": count, "bytes": size} for kind, (count, size) in sorted(totals.items())}


def hbm_traffic(hlo_text: str) -> float:
  """Bytes one execution reads from and writes to HBM, per chip, in the roofline model of a fused program: every
  top-level instruction (a fusion, a matmul, a gather, a copy, a collective) reads each operand once and writes its
  result once; what happens inside a fusion stays on chip, and so do buffers XLA assigned to on-chip memory
  (layout `S(1)`). Loop bodies count once per trip (as `collective_stats`).
  XLA's own `bytes accessed` is not used for this: it counts a loop's body once and a gather's whole table per
  gathered row."""
  module = _parse(hlo_text)
  return float(sum(times * module.traffic.get(name, 0.0) for name, times in module.runs()))


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
  hbm_traffic: float = 0.0  # bytes per execution, per chip (`hbm_traffic`; arrays in on-chip memory excluded)
  hlo_text: str = ""  # the optimised program (not in `as_dict`: megabytes)

  @property
  def collective_bytes(self) -> float:
    return sum(stats["bytes"] for stats in self.collectives.values())

  def roofline(self, peak_flops: float | None, hbm_bandwidth: float | None) -> dict[str, float | None]:
    """Estimated seconds: compute-bound, memory-bound and their max (None without the chip's figures or, for the
    memory bound, a compiled program)."""
    compute = self.analytic_flops_per_chip / peak_flops if peak_flops else None
    memory = self.hbm_traffic / hbm_bandwidth if hbm_bandwidth and self.hbm_traffic else None
    bound = max((x for x in (compute, memory) if x is not None), default=None)
    return {"compute_seconds": compute, "memory_seconds": memory, "step_seconds": bound}

  def as_dict(self) -> dict[str, Any]:
    return {"name": self.name, "compile_seconds": self.compile_seconds, "memory": self.memory, "cost": self.cost,
            "collectives": self.collectives, "collective_bytes": self.collective_bytes,
            "analytic_flops_per_chip": self.analytic_flops_per_chip, "compiler_message": self.compiler_message,
            "hbm_traffic": self.hbm_traffic}


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
                       analytic_flops_per_chip, hbm_traffic=hbm_traffic(text), hlo_text=text)


class Target:
  """Devices to compile for, the platform whose choices the trace makes, and the chip's figures."""

  def __init__(self, topology_name: str):
    if topology_name:
      self.topology = parse_topology(topology_name)
      self.devices = topology_devices(self.topology)
      self.platform, self.name = "tpu", f"{self.topology.name} ({self.topology.slice_name})"
      self.process_count, chip = self.topology.num_hosts, self.topology.chip
    else:
      self.topology, self.devices = None, jax.devices()
      self.platform, self.name = target_lib.platform(), f"local ({self.devices[0].device_kind})"
      self.process_count, chip = jax.process_count(), chip_of(self.devices[0].device_kind)
    self.device_kind = self.devices[0].device_kind
    self.hbm_bytes = chip.hbm_bytes if chip else _local_memory_limit(self.devices[0])
    self.hbm_bandwidth = chip.hbm_bandwidth if chip else None
    self.peak_flops = chip.peak_flops if chip else peak_flops_per_device(self.devices[0], "bfloat16")


def _local_memory_limit(device: Any) -> float | None:
  try:
    return float((device.memory_stats() or {}).get("bytes_limit")) or None
  except (AttributeError, TypeError, ValueError, RuntimeError):
    return None


def compile_config(config: Any, target: Target, programs: tuple[str, ...] = ("train", "eval"),
                   steps_per_epoch: int = 1000, hlo_dir: str = "") -> dict[str, Any]:
  """Compiles `programs` of every phase of `config` for `target`; returns the report (printed by
  `python -m ast_jax.compile`). `hlo_dir`: also write each optimised program's HLO text there."""
  validate_config(config)
  mesh = make_mesh(config.mesh, target.devices)
  rules = logical_rules(config.sharding_rules)
  config, note = batch_for_mesh(config, mesh, rules, target.process_count)
  packed = family_of(config).trains_packed(config)
  chips = len(target.devices)
  train_field, eval_field = batch_fields(config)
  global_batch = config[train_field.split(".")[0]][train_field.split(".")[1]]
  report: dict[str, Any] = {
      "target": target.name, "device_kind": target.device_kind, "chips": chips, "hosts": target.process_count,
      "platform": target.platform, "mesh": dict(mesh.shape), "batch_note": note, "batch_field": train_field,
      "global_batch": global_batch, "per_chip_batch": global_batch / chips, "hbm_bytes": target.hbm_bytes,
      "peak_flops": target.peak_flops, "hbm_bandwidth": target.hbm_bandwidth, "model": config.model.name,
      "variant": config.model.get("variant"), "dtype": config.model.dtype, "phases": []}
  for plan in plan_phases(config, steps_per_epoch):
    phase_config = plan.config
    flops = config_flops(phase_config)
    with target_lib.compiling_for(target.platform):
      built = phase_programs(phase_config, mesh, rules, jax.random.key(0), steps_per_epoch, plan.steps,
                             plan.first_step)
      results = []
      if "train" in programs:
        batch = abstract_batch(batch_shapes(phase_config, packed=packed), built.data_sharding)
        results.append(compile_program("train", built.train_step(), (built.abstract_state, batch),
                                       flops["train_flops_per_step"] / chips))
      if "eval" in programs:
        batch = abstract_batch(batch_shapes(phase_config, packed=packed, train=False), built.data_sharding)
        eval_rows = batch["clip_mask"].shape[0]
        results.append(compile_program("eval", built.eval_step, (built.abstract_state.params, batch),
                                       flops["forward_flops"] * eval_rows / chips))
    phase = {"phase": plan.phase.name, "examples_per_step": _examples_per_step(phase_config, packed),
             "programs": []}
    for result in results:
      entry = result.as_dict()
      if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        entry["hlo_file"] = os.path.join(hlo_dir, f"{plan.phase.name}_{result.name}.hlo.txt")
        with open(entry["hlo_file"], "w") as file:
          file.write(result.hlo_text)
      entry["roofline"] = result.roofline(target.peak_flops, target.hbm_bandwidth)
      limit = entry["memory"].get("compiler_limit") or target.hbm_bytes
      entry["fits"] = False if result.compiler_message else None if limit is None else entry["memory"]["total"] <= limit
      phase["programs"].append(entry)
    report["phases"].append(phase)
  train = [p for phase in report["phases"] for p in phase["programs"] if p["name"] == "train"]
  report["fits"] = all(p["fits"] is not False for phase in report["phases"] for p in phase["programs"])
  if train and train[-1]["roofline"]["step_seconds"]:
    seconds = train[-1]["roofline"]["step_seconds"]
    report["projected_clips_per_second"] = report["phases"][-1]["examples_per_step"] / seconds
  if not report["fits"]:
    report["fix"] = fix_message(config, report, eval_field)
  return report


def _examples_per_step(config: Any, packed: bool) -> float:
  """Clips per train step: the batch, or for packed rows the rows times the clips a row holds on average when
  every clip lasts 10 s (AudioSet), as the trainer's packer plans them."""
  if not packed:
    return float(config.data.batch_size)
  return config.packing.rows * clips_per_packed_row(config)


def fix_message(config: Any, report: dict[str, Any], eval_field: str) -> str:
  """What to change when a program does not fit, largest memory kind first."""
  worst = max((p for phase in report["phases"] for p in phase["programs"] if p["fits"] is False),
              key=lambda p: p["memory"]["total"])
  memory, hbm = worst["memory"], report["hbm_bytes"]
  per_chip = report["per_chip_batch"]
  state = memory["argument"]  # parameters, optimiser state and the batch
  hbm = memory.get("compiler_limit") or hbm
  lines = [f"the {worst['name']} step needs {memory['total'] / 2**30:.2f} GiB per chip, more than the "
           f"{hbm / 2**30:.2f} GiB of HBM of {report['device_kind']}"
           + (f" (the compiler: {worst['compiler_message']})" if worst["compiler_message"] else "") + ". To fit:"]
  batch_fix = (f"a smaller batch per chip (now {per_chip:g}): --config.batch_scaling.per_device="
               f"{max(1, int(per_chip // 2))}" + (f" (or --config.{report['batch_field']}=...)"))
  if worst["name"] == "eval":
    batch_fix += f"; for the eval step, --config.{eval_field}=..."
  fixes = [(memory["temp"], batch_fix + (", or recompute activations in the backward pass: --config.model.remat=full"
                                         if config.model.remat == "none" else "")),
           (state, f"shard parameters and optimiser state over more chips: --config.mesh.fsdp="
                   f"{2 * config.mesh.fsdp if config.mesh.fsdp > 1 else 4} (now {config.mesh.fsdp}; "
                   "data-parallel devices = data x fsdp)")]
  if config.train.grad_accum_steps == 1:
    fixes.append((memory["temp"] / 2, "or split each batch into micro-batches: --config.train.grad_accum_steps=2"))
  lines += [f"  - {text}" for _, text in sorted(fixes, key=lambda item: -item[0])]
  return "\n".join(lines)


def search_mesh(config: Any, target: Target, max_tensor: int = 8, steps_per_epoch: int = 1000
                ) -> list[dict[str, Any]]:
  """Compiles the train step under each (data, fsdp, tensor) split of the chips (tensor up to `max_tensor`); returns
  one row per split, the fitting ones first, by estimated step time, then collective bytes. A split the config
  checks refuse (e.g. heads that do not divide over `tensor`) is a row with its reason, compiled never."""
  chips = len(target.devices)
  rows = []
  for tensor in [t for t in _divisors(chips) if t <= max_tensor]:
    for fsdp in _divisors(chips // tensor):
      data = chips // tensor // fsdp
      trial = config.copy_and_resolve_references()
      trial.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
      row: dict[str, Any] = {"mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}}
      try:
        report = compile_config(trial, target, ("train",), steps_per_epoch)
      except (ConfigError, ValueError) as error:
        row["error"] = str(error).splitlines()[0]
        rows.append(row)
        continue
      program = report["phases"][-1]["programs"][0]
      row.update(fits=program["fits"], memory_gib=program["memory"]["total"] / 2**30,
                 step_seconds=program["roofline"]["step_seconds"], collective_bytes=program["collective_bytes"],
                 per_chip_batch=report["per_chip_batch"], compile_seconds=program["compile_seconds"])
      log.info("mesh %s: fits %s, %.2f GiB per chip, roofline %s s", row["mesh"], row["fits"], row["memory_gib"],
               row["step_seconds"])
      rows.append(row)

  def rank(row: dict[str, Any]) -> tuple:
    fits = row.get("fits") is True
    return (not fits, row.get("step_seconds") or math.inf, row.get("collective_bytes", math.inf))

  return sorted(rows, key=rank)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]
