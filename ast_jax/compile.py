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
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "Also write each compiled program's optimised HLO text here.")
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 1000, "Steps per epoch the schedule is built with (it "
                                        "does not change the compiled program's shapes).")
_EPOCH_CLIPS = flags.DEFINE_integer("epoch_clips", 0, "Clips per training epoch for the hours-per-epoch projection "
                                    "(0: none).")
flags.mark_flags_as_required(["config"])

DOES_NOT_FIT = 2


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
  if not _PROGRAMS.value or set(_PROGRAMS.value) - {"train", "eval"}:
    raise app.UsageError(f"--programs takes train and/or eval, not {','.join(_PROGRAMS.value)!r}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)
  from ast_jax.parallel.topology import TopologyError
  from ast_jax.train.aot import Target, compile_config, search_mesh
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
      result = compile_config(_CONFIG.value, target, tuple(_PROGRAMS.value), _STEPS_PER_EPOCH.value, _HLO_DIR.value)
      print_report(result, _EPOCH_CLIPS.value)
      fits = result["fits"]
  except (ConfigError, ValueError, TopologyError) as error:  # a bad config or slice: the message, no traceback
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
