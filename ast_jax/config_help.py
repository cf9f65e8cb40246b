"""The resolved config with each field's one-line meaning: `python -m ast_jax.main --config=... --print_config`.

The meanings are the comments the config files already carry (configs/common.py, then the recipe): a field's
trailing comment (`batch_size=12,  # ...` or `config.model.scan = "auto"  # ...`), else the comment block just above
it, first line. Fields without a comment print without one.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

import ml_collections

_SECTION = re.compile(r"^\s*config\.(\w+) = ml_collections\.ConfigDict\(")
_ITEM = re.compile(r"^\s+(\w+)=")
_ASSIGNMENT = re.compile(r"^\s*config\.([\w.]+) = ")
_COMMENT = re.compile(r"^\s*# ?(.*)$")


def _trailing_comment(line: str) -> str:
  code, hash_sign, comment = line.partition("  # ")
  return comment.strip() if hash_sign else ""


def field_meanings(paths: Iterable[str]) -> dict[str, str]:
  """Dotted config key -> its one-line meaning, read from the comments of the config files at `paths`."""
  meanings: dict[str, str] = {}
  for path in paths:
    section, above = None, []
    with open(path, encoding="utf-8") as handle:
      for line in handle:
        comment = _COMMENT.match(line)
        if comment:
          above.append(comment.group(1).strip())
          continue
        if (start := _SECTION.match(line)) is not None:
          section, above = start.group(1), []
          continue
        if section and line.strip().startswith("))"):
          section = None
        item = _ITEM.match(line) if section else None
        assignment = _ASSIGNMENT.match(line)
        key = f"{section}.{item.group(1)}" if item else assignment.group(1) if assignment else None
        meaning = _trailing_comment(line) or (above[0] if above else "")
        if key and meaning:
          meanings.setdefault(key, meaning)
        above = []
  return meanings


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  items = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      items += _leaves(value, f"{prefix}{name}.")
    else:
      items.append((prefix + name, value))
  return items


def describe(config: ml_collections.ConfigDict, config_argument: str) -> str:
  """Every field of `config` as `key = value  # meaning`, sections in the config's order."""
  recipe = config_argument.partition(":")[0]
  common = os.path.join(os.path.dirname(os.path.abspath(recipe)), "common.py")
  # The shared defaults define the fields; a recipe's comments say why it sets a value, so they come second.
  meanings = field_meanings([path for path in (common, recipe) if os.path.isfile(path)])
  lines = []
  for key, value in _leaves(config):
    meaning = meanings.get(key, "")
    lines.append(f"{key} = {value!r}" + (f"  # {meaning}" if meaning else ""))
  return "\n".join(lines)
