"""Evaluation sweeps over length caps and time resolutions (ast_jax/train/eval_sweep.py).

Sweep a trained workdir (its exported model, `<workdir>/model`), with the config it was trained with:
  python -m ast_jax.sweep --config=configs/fsdd.py:elastic --workdir=W \
      --config.eval_sweep.lengths=64,100,150 --config.eval_sweep.resolutions=1,1.5,2,2.5
Compare the sweeps of several workdirs in one table and plot:
  python -m ast_jax.sweep --compare=W1,W2 --names=ElasticAST,AST --out=docs/bench/sweep.png
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config of the workdir.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained workdir (sweeps <workdir>/model).")
_COMPARE = flags.DEFINE_list("compare", None, "Workdirs whose sweep.csv to compare (instead of sweeping).")
_NAMES = flags.DEFINE_list("names", None, "Names of the compared runs (default: the workdirs' names).")
_METRIC = flags.DEFINE_string("metric", "accuracy", "Metric to tabulate and plot when comparing.")
_OUT = flags.DEFINE_string("out", "sweep.png", "Comparison plot (a .md table is written beside it).")


def sweep_workdir(config, workdir: str) -> list[dict]:
  """Loads `<workdir>/model` and sweeps it on one process's devices."""
  import jax
  import numpy as np

  from ast_jax import data as data_lib
  from ast_jax.convert.model_dir import load_model_dir
  from ast_jax.data.inputs import build_input
  from ast_jax.models import family_of
  from ast_jax.models.layers import to_layout
  from ast_jax.parallel import logical_rules, make_mesh
  from ast_jax.train.config_checks import ConfigError, validate_config
  from ast_jax.train.eval_sweep import run_sweep
  from ast_jax.train.trainer import param_shardings

  validate_config(config)
  if not (config.eval_sweep.lengths or config.eval_sweep.resolutions or config.get("eval_patch_sizes")):
    raise ConfigError("nothing to sweep: set config.eval_sweep.lengths, config.eval_sweep.resolutions or "
                      "config.eval_patch_sizes")
  mesh, rules = make_mesh(config.mesh), logical_rules(config.sharding_rules)
  inputs = build_input(config, data_lib.build_sources(config), packed=family_of(config).trains_packed(config))
  bundle = load_model_dir(os.path.join(workdir, "model"))
  params = to_layout(jax.tree.map(np.float32, bundle.params), config.model.scan_layers)
  return run_sweep(config, params, inputs, mesh, rules, param_shardings(config, mesh, rules), workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)
  from ast_jax.train.eval_sweep import plot_sweeps, read_sweep, sweep_table

  if _COMPARE.value:
    names = _NAMES.value or [os.path.basename(os.path.normpath(w)) for w in _COMPARE.value]
    if len(names) != len(_COMPARE.value):
      raise app.UsageError("--names needs one name per --compare workdir")
    runs = {name: read_sweep(workdir) for name, workdir in zip(names, _COMPARE.value)}
    plot_sweeps(runs, _METRIC.value, _OUT.value)
    table = sweep_table(runs, _METRIC.value)
    with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as handle:
      handle.write(table)
    print(table)
    return
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("give --config and --workdir (to sweep), or --compare (to compare sweeps)")
  from ast_jax.train.config_checks import ConfigError

  try:
    records = sweep_workdir(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps(records))


if __name__ == "__main__":
  from ast_jax import overrides, runtime

  overrides.exit_on_unknown(sys.argv)
  runtime.restart_with_tcmalloc()
  app.run(main)
