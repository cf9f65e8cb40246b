"""The import contracts of .importlinter hold, and `lint-imports` fails when one is broken on purpose."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports") or pytest.skip("import-linter is not installed", allow_module_level=True)


def lint(root: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run([LINT, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": str(root)})


def copy_package(tmp_path: pathlib.Path) -> pathlib.Path:
  shutil.copytree(ROOT / "ast_jax", tmp_path / "ast_jax", ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
  return tmp_path


def test_the_contracts_hold():
  result = lint(ROOT)
  assert result.returncode == 0, result.stdout[-3000:]
  assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("models/vit.py", "from ast_jax.train import losses", "ast_jax.models is not allowed to import ast_jax.train"),
    ("models/aum.py", "from ast_jax.models import elastic", "Model families are independent"),
    ("audio/patches.py", "from ast_jax.data import batch", "ast_jax.audio is not allowed to import ast_jax.data"),
    ("train/evaluate.py", "from ast_jax.train import trainer", "No import circles"),
])
def test_a_crossed_layer_fails_the_lint(tmp_path, module, line, broken):
  root = copy_package(tmp_path)
  with open(root / "ast_jax" / module, "a") as handle:
    handle.write(f"\n{line}  # planted\n")
  result = lint(root)
  assert result.returncode != 0, result.stdout[-3000:]
  assert broken in result.stdout.replace("\n", " "), result.stdout[-3000:]
