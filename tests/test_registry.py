"""The model-family registry: built-in families, a family added from outside in a few lines, and no comparison of
a model's name anywhere but the registry."""

from __future__ import annotations

import ast as python_ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ast_jax.models import build_model, config_flops, example_inputs, family_of, init_params
from ast_jax.models.family import FAMILIES
from ast_jax.train.config_checks import ConfigError, validate_config
from configs import demo, fsdd

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("arg", ["smoke", "elastic_smoke"])
def test_builtin_families_build_count_and_initialise(arg):
  config = demo.get_config(arg)
  family = family_of(config)
  assert family.name == config.model.name and family.packed_input == (arg == "elastic_smoke")
  params = init_params(build_model(config), jax.random.key(0), *example_inputs(config))
  assert jax.tree.leaves(params)
  counts = config_flops(config)
  assert counts["train_flops"] == pytest.approx(3 * counts["forward_flops"]) and counts["tokens_per_step"] > 0


def test_every_builtin_family_declares_formats_and_options():
  for name in FAMILIES:
    family = family_of(name)
    assert family.name == name and "ast_jax" in family.weight_formats
  assert family_of("ast").weight_formats == ("ast_jax", "hf", "original", "imagenet")


def test_unknown_family_is_a_config_error_naming_the_families():
  config = fsdd.get_config()
  config.model.name = "vit22b"
  with pytest.raises(ConfigError, match="'ast', 'elastic', 'aum'"):
    validate_config(config)


def test_an_option_a_family_lacks_is_refused_naming_who_has_it():
  config = fsdd.get_config("aum_tiny")
  config.model.flexi_patch_sizes = (8, 16)
  with pytest.raises(ConfigError, match=r"any patch size \(ast\); model.name='aum' does not"):
    validate_config(config)


def test_a_family_from_outside_trains_one_step_through_main(tmp_path):
  """tests/toy_family.py is all it takes: `--config.model.name` names its module."""
  workdir = tmp_path / "toy"
  command = [sys.executable, "-m", "ast_jax.main", "--config=configs/demo.py:smoke", f"--workdir={workdir}",
             "--config.model.name=tests.toy_family", "--config.model.fstride=16", "--config.model.tstride=16",
             "--config.train.max_steps=1", "--config.data.num_train_examples=8", "--config.data.num_eval_examples=4"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["step"] == 1 and record["num_examples"] == 4
  written = json.loads((workdir / "model" / "ast_jax.json").read_text())
  assert written["model"]["name"] == "tests.toy_family"
  kept = list((workdir / "configs").glob("*.json"))  # the resolved config of the run, overrides applied
  assert len(kept) == 1 and json.loads(kept[0].read_text())["model"]["name"] == "tests.toy_family"
  # Its model directory predicts; it returns no patch tokens, so --token_embeddings is one clear error.
  from ast_jax.convert.model_dir import load_model_dir
  from ast_jax.inference import make_predictor

  bundle = load_model_dir(str(workdir / "model"))
  waveform = np.random.default_rng(0).normal(size=8000).astype(np.float32)
  assert make_predictor(bundle).predict([waveform], 8000, 4000)[0].logits.shape == (1, bundle.config.num_classes)
  with pytest.raises(ValueError, match="'tests.toy_family' models return no 'patch_tokens'"):
    make_predictor(bundle, tokens=True).predict([waveform], 8000, 4000)


def test_print_config_shows_the_resolved_fields_with_their_meaning_and_trains_nothing(tmp_path):
  result = subprocess.run([sys.executable, "-m", "ast_jax.main", "--config=configs/fsdd.py:aum_packed",
                           "--config.model.scan=chunked", "--print_config", f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert "model.scan = 'chunked'  # Selective scan implementation (models/ssm.py): auto (recompute on CPU, pallas on " \
         "TPU, chunked on GPU) |" in lines
  assert "data.batch_size = 32" in lines and "packing.row_tokens = 160" in lines
  assert any(line.startswith("packing.max_clips = 32  # clips per row at most") for line in lines)
  assert not (tmp_path / "run").exists()


def _name_comparisons(source: str, where: str) -> list[str]:
  """Comparisons of something called `name` with a built-in family's name, e.g. `config.model.name == 'aum'`."""
  tree = python_ast.parse(source)
  found = []
  for node in python_ast.walk(tree):
    if not isinstance(node, python_ast.Compare):
      continue
    operands = [node.left, *node.comparators]
    texts = [python_ast.unparse(operand) for operand in operands]
    constants = [operand.value for operand in operands if isinstance(operand, python_ast.Constant)]
    constants += [element.value for operand in operands if isinstance(operand, (python_ast.Tuple, python_ast.List))
                  for element in operand.elts if isinstance(element, python_ast.Constant)]
    if any(value in FAMILIES for value in constants) and any("name" in text for text in texts):
      found.append(f"{where}:{node.lineno}: {python_ast.unparse(node)}")
  return found


def test_no_model_name_is_compared_outside_the_registry():
  sources = [path for path in (ROOT / "ast_jax").rglob("*.py") if path.name != "family.py"]
  found = [hit for path in sources for hit in _name_comparisons(path.read_text(), str(path.relative_to(ROOT)))]
  assert not found, "ask the family instead (ast_jax/models/family.py):\n" + "\n".join(found)
  # the scan finds the comparisons the registry replaced
  for planted in ("if config.model.get('name', 'ast') == 'aum': pass", "ok = config.model.name in ('ast', 'aum')",
                  "elastic = bundle.config.model.name != 'elastic'"):
    assert _name_comparisons(planted, "planted"), planted
