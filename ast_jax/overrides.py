"""`--config.a.b=value` overrides checked against the config before flags are parsed, so a misspelt or misplaced key
gets one line naming it and the nearest real keys instead of ml_collections' traceback."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections

# Command-line flags that are not config fields, with where they belong.
_NOT_CONFIG = {"workdir": "--workdir=DIR is a flag of its own, not a config field: drop the 'config.' prefix"}


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted key of `config`, nested sections included."""
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += config_keys(value, f"{prefix}{name}.")
  return keys


def load_config(argument: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:arg]` -> its `get_config(arg)`, as ml_collections' --config flag loads it."""
  path, _, arg = argument.partition(":")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def override_problems(argv: Sequence[str], flag: str = "config") -> list[str]:
  """What is wrong with the `--<flag>.key=value` arguments of `argv` (an empty list when they all name fields).
  Returns nothing when the config file itself cannot be loaded: the flag parser reports that."""
  argument = None
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      argument = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and index + 1 < len(argv):
      argument = argv[index + 1]
  overrides = [arg[len(flag) + 3:].split("=", 1)[0] for arg in argv if arg.startswith(f"--{flag}.")]
  if argument is None or not overrides:
    return []
  try:
    config = load_config(argument)
  except Exception:  # noqa: BLE001 - the --config flag reports a config file that does not load
    return []
  keys = config_keys(config)
  problems = []
  for key in overrides:
    if key in keys:
      continue
    section = key.rpartition(".")[0]
    if key in _NOT_CONFIG:
      problems.append(f"--{flag}.{key}: {_NOT_CONFIG[key]}")
      continue
    in_section = bool(section) and section in keys
    # Near keys: in the same section when it exists, else anywhere (a field put in the wrong section, too).
    candidates = [k for k in keys if k.startswith(section + ".")] if in_section else keys
    near = [k for k in keys if k.rpartition(".")[2] == key.rpartition(".")[2]]
    near = (near + [k for k in difflib.get_close_matches(key, candidates, n=3, cutoff=0.6) if k not in near])[:3]
    hint = f"; did you mean {', '.join('--' + flag + '.' + k for k in near)}?" if near else ""
    where = f"section '{section}'" if in_section else argument
    problems.append(f"--{flag}.{key}: no field '{key}' in {where}{hint}")
  return problems


def exit_on_unknown(argv: Sequence[str] = (), flag: str = "config") -> None:
  """Prints every unknown override and exits with status 2 (a usage error) before anything runs."""
  problems = override_problems(list(argv or sys.argv), flag)
  if problems:
    print("error: unknown config key(s):\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
    sys.exit(2)
