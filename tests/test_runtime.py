"""The allocator restart: when it happens, and that a restarted command runs with tcmalloc."""

import importlib.util
import os
import subprocess
import sys

import pytest

from ast_jax import runtime


def test_restart_only_when_wanted_and_needed(tmp_path):
  library = "/lib/libtcmalloc_minimal.so.4"
  assert runtime.tcmalloc_environment({"PATH": "/bin"}, library) == {"PATH": "/bin", "LD_PRELOAD": library}
  assert runtime.tcmalloc_environment({"LD_PRELOAD": "/x/libother.so"}, library)["LD_PRELOAD"] == \
      f"{library} /x/libother.so"
  assert runtime.tcmalloc_environment({"LD_PRELOAD": library}, library) is None  # already restarted
  assert runtime.tcmalloc_environment({"AST_JAX_MALLOC": "system"}, library) is None  # opted out
  assert runtime.tcmalloc_environment({}, None) is None  # not installed
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert runtime.find_tcmalloc((str(tmp_path / "missing"), str(tmp_path))) == str(tmp_path / "libtcmalloc.so.4")


@pytest.mark.skipif(runtime.find_tcmalloc() is None or not sys.platform.startswith("linux"),
                    reason="tcmalloc is not installed")
def test_entry_point_restarts_with_tcmalloc():
  program = ("from ast_jax import runtime; runtime.restart_with_tcmalloc(); import os; "
             "print(open('/proc/self/maps').read().count('tcmalloc') > 0, os.environ['LD_PRELOAD'])")
  env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", "AST_JAX_MALLOC")}
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, check=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  loaded, preload = done.stdout.split()
  assert loaded == "True" and "tcmalloc" in preload


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_libtpu_installed_without_a_tpu_leaves_cpu_runs_quiet():
  """requirements-tpu.txt installs libtpu for pod compiles; on a machine without TPUs, importing ast_jax keeps JAX
  from starting it (which prints libtpu's start-up errors), and JAX_PLATFORMS set by the user is left alone."""
  env = {key: value for key, value in os.environ.items() if key not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
  program = "import ast_jax, jax; print(jax.default_backend(), len(jax.devices()))"
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, check=True,
                        timeout=120)
  assert done.stdout.split() == ["cpu", "1"]
  assert "TPU" not in done.stderr and "libtpu" not in done.stderr, done.stderr
