"""Compile the trainer's steps ahead of time for a TPU pod (or the local devices) and say whether they fit.

  pip install -r requirements-tpu.txt
  python -m ast_jax.compile --config=configs/audioset.py --topology=v5e:16x16 [--config.key=value ...]
  python -m ast_jax.compile --config=configs/audioset.py:elastic --topology=v5p:4x4x4 --search_mesh

No TPU is needed: libtpu describes the pod's chips and XLA builds the executable the pod would run (the train and
eval steps of `train/programs.py`, the trainer's own, with the config's mesh laid on the topology, the batch rule of
`train/batch_scaling.py` applied, and every platform-dependent choice made for TPU). Per chip it reports memory by
kind against the chip's HBM, analytic and XLA FLOPs, the collectives of the optimised program with their bytes,
compile seconds, and a roofline step time from the chip's published peak FLOP/s and HBM bandwidth (an estimate,
labelled so, never a measurement), plus the pod's projected clips/s from that estimate. `--json` writes it all.

Exit status: 0 when every program fits, 2 when one does not (the message names the fix: per-chip batch, `remat`,
`mesh.fsdp`), 1 for a bad config. `--search_mesh` compiles the train step under each data x fsdp x tensor split of
the chips and ranks the splits that fit by estimated step time, then collective bytes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file, optionally ':arg'.",
                                          lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice to compile for, <generation>:<chips per dimension> "
                                "(v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:8x8); empty: this machine's devices.")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "eval"], "Which steps to compile: train, eval.")
_SEARCH_MESH = flags.DEFINE_bool("search_mesh", False, "Compile the train step under every data x fsdp x tensor "
                                 "split of the chips and rank those that fit.")
_MAX_TENSOR = flags.DEFINE_integer("max_tensor", 8, "Largest tensor-parallel size --search_mesh tries.")
_JSON = flags.DEFINE_string("json", "", "Write the report as JSON to this path.")
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 1000, "Steps per epoch the schedule is built with (it "
                                        "does not change the compiled program's shapes).")
_EPOCH_CLIPS = flags.DEFINE_integer("epoch_clips", 0, "Clips per training epoch for the hours-per-epoch projection "
                                    "(0: none).")
flags.mark_flags_as_required(["config"])

log = logging.getLogger("ast_jax.compile")
DOES_NOT_FIT = 2


class Target:
  """Devices to compile for, the platform whose choices the trace makes, and the chip's figures."""

  def __init__(self, topology_name: str):
    import jax

    from ast_jax import target
    from ast_jax.parallel.topology import chip_of, parse_topology, topology_devices
    from ast_jax.train.throughput import peak_flops_per_device

    if topology_name:
      self.topology = parse_topology(topology_name)
      self.devices = topology_devices(self.topology)
      self.platform, self.name = "tpu", f"{self.topology.name} ({self.topology.slice_name})"
      self.process_count, chip = self.topology.num_hosts, self.topology.chip
    else:
      self.topology, self.devices = None, jax.devices()
      self.platform, self.name = target.platform(), f"local ({self.devices[0].device_kind})"
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
                   steps_per_epoch: int = 1000) -> dict[str, Any]:
  """Compiles `programs` of every phase of `config` for `target`; returns the report (see `print_report`)."""
  import jax

  from ast_jax import target as target_lib
  from ast_jax.data.inputs import batch_shapes
  from ast_jax.models import config_flops, family_of
  from ast_jax.parallel import logical_rules, make_mesh
  from ast_jax.train.aot import abstract_batch, compile_program
  from ast_jax.train.batch_scaling import batch_fields, scale_to_mesh
  from ast_jax.train.config_checks import validate_config
  from ast_jax.train.phases import plan_phases
  from ast_jax.train.programs import phase_programs
  from ast_jax.train.trainer import check_batch_divides

  validate_config(config)
  mesh = make_mesh(config.mesh, target.devices)
  rules = logical_rules(config.sharding_rules)
  config, note = scale_to_mesh(config, mesh, rules, target.process_count)
  check_batch_divides(config, mesh, rules, target.process_count)
  packed = family_of(config).packed_input
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
  from ast_jax.data.inputs import clips_per_packed_row

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
  from ast_jax.train.config_checks import ConfigError

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
      log.info("mesh %s: %s", row["mesh"], _row_text(row))
      rows.append(row)

  def rank(row: dict[str, Any]) -> tuple:
    fits = row.get("fits") is True
    return (not fits, row.get("step_seconds") or math.inf, row.get("collective_bytes", math.inf))

  return sorted(rows, key=rank)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _gib(value: float | None) -> str:
  return "n/a" if value is None else f"{value / 2**30:.2f}"


def _seconds(value: float | None) -> str:
  return "n/a" if value is None else f"{value * 1e3:.1f} ms"


def _row_text(row: dict[str, Any]) -> str:
  if "error" in row:
    return f"not possible: {row['error']}"
  return (f"{'fits' if row['fits'] else 'DOES NOT FIT'}, {row['memory_gib']:.2f} GiB per chip, roofline "
          f"{_seconds(row['step_seconds'])}, collectives {row['collective_bytes'] / 2**20:.1f} MiB per chip")


def print_report(report: dict[str, Any], epoch_clips: int = 0, out: Any = sys.stdout) -> None:
  def say(text: str = "") -> None:
    print(text, file=out)

  say(f"target {report['target']}: {report['chips']} devices ({report['device_kind']}), {report['hosts']} host(s); "
      f"mesh {report['mesh']}")
  say(f"model {report['model']} {report['variant'] or ''} ({report['dtype']}); {report['batch_field']}="
      f"{report['global_batch']} ({report['per_chip_batch']:g} per device)")
  if report["batch_note"]:
    say(f"batch rule: {report['batch_note']}")
  for phase in report["phases"]:
    say()
    say(f"phase {phase['phase']}")
    header = ("program", "args GiB", "out GiB", "alias GiB", "temp GiB", "code GiB", "total GiB", "HBM GiB", "fits",
              "compile s")
    say(" | ".join(header))
    for program in phase["programs"]:
      memory = program["memory"]
      say(" | ".join([program["name"], *(_gib(memory.get(kind)) for kind in ("argument", "output", "alias", "temp",
                                                                              "generated_code", "total")),
                      _gib(report["hbm_bytes"]), {True: "yes", False: "NO", None: "unknown"}[program["fits"]],
                      f"{program['compile_seconds']:.1f}"]))
    for program in phase["programs"]:
      roofline = program["roofline"]
      say(f"{program['name']}: analytic {program['analytic_flops_per_chip'] / 1e12:.3f} TFLOP per chip (XLA's count "
          f"{program['cost']['xla_flops'] / 1e12:.3f}, a loop's body once), HBM traffic "
          f"{program['hbm_traffic'] / 2**30:.2f} GiB; roofline estimate (not a measurement): compute "
          f"{_seconds(roofline['compute_seconds'])}, "
          f"memory {_seconds(roofline['memory_seconds'])}, step {_seconds(roofline['step_seconds'])}")
      collectives = ", ".join(f"{kind} x{stats['count']:g} {stats['bytes'] / 2**20:.1f} MiB"
                              for kind, stats in program["collectives"].items()) or "none"
      say(f"{program['name']} collectives per step per chip: {collectives}")
  if "projected_clips_per_second" in report:
    rate = report["projected_clips_per_second"]
    line = (f"projected from the roofline estimate (every chip at its peak FLOP/s or HBM bandwidth: an upper bound): "
            f"{rate:,.0f} clips/s for the {report['chips']} chips")
    if epoch_clips:
      line += f", {epoch_clips / rate / 3600:.3g} h per epoch of {epoch_clips:,} clips"
    say(line)
  say()
  say("fits" if report["fits"] else f"DOES NOT FIT: {report['fix']}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)
  from ast_jax.train.config_checks import ConfigError

  try:
    target = Target(_TOPOLOGY.value)
    if _SEARCH_MESH.value:
      rows = search_mesh(_CONFIG.value, target, _MAX_TENSOR.value, _STEPS_PER_EPOCH.value)
      for row in rows:
        print(f"{row['mesh']}: {_row_text(row)}")
      result: Any = {"target": target.name, "search": rows}
      fits = any(row.get("fits") for row in rows)
    else:
      result = compile_config(_CONFIG.value, target, tuple(_PROGRAMS.value), _STEPS_PER_EPOCH.value)
      print_report(result, _EPOCH_CLIPS.value)
      fits = result["fits"]
  except (ConfigError, ValueError, RuntimeError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  if _JSON.value:
    with open(_JSON.value, "w") as file:
      json.dump(result, file, indent=1, default=str)
  sys.exit(0 if fits else DOES_NOT_FIT)


if __name__ == "__main__":
  from ast_jax import overrides

  overrides.exit_on_unknown(sys.argv)
  app.run(main)
