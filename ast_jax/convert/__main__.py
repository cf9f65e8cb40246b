"""Convert weights: `python -m ast_jax.convert --from=hf|original|aum|ast_jax --to=hf|original|aum|ast_jax|torch SRC
DST`.

- ast_jax: a model directory (`model.safetensors` + `ast_jax.json`), as training writes to `workdir/model/`;
  a training workdir is accepted as SRC.
- hf: a Hugging Face `ASTForAudioClassification` directory (model.safetensors, config.json, preprocessor_config.json).
  `--patch_size=P` writes an AST (FlexiAST) at P x P patches, strides scaled with P (`convert/hf.py:at_patch`).
- original: an upstream `.pth` (YuanGongND/ast). It carries no config: reading one needs `--config=configs/X.py`
  (front end, strides, labels); writing one keeps only the weights.
- aum: an upstream Audio Mamba `.pth` (kaistmm/Audio-Mamba-AuM state-dict names), for ast_jax models with
  model.name='aum'. Reading one needs `--config` as for `original`; `ast_jax/convert/aum_torch.py` runs a written
  one in plain PyTorch (`AudioMamba.from_state_dict`).
- torch (write only): ElasticAST for plain PyTorch, `model.safetensors` + `config.json` (sizes, positions, pooling,
  labels, front end); `ast_jax/convert/elastic_torch.py` runs it (`ElasticAST.from_pretrained(DST)`).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ast_jax.convert.formats import FORMATS, write

_FROM = flags.DEFINE_enum("from", None, FORMATS, "Format of SRC.")
_TO = flags.DEFINE_enum("to", None, FORMATS, "Format of DST.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "With --from=original|aum: the recipe the weights belong "
                                          "to (model, front end, labels).")
_LABEL_CSV = flags.DEFINE_string("label_csv", None, "With --from=original|aum: label names (index,mid,display_name); "
                                 "default: the config's data.label_csv.")
_PATCH_SIZE = flags.DEFINE_string("patch_size", None, "With --to=hf: export at P x P patches (an AST whose family "
                                   "runs at any patch, FlexiAST): kernel PI-resized, strides scaled by P / the stored "
                                   "patch, positional table resized, as model.apply(..., patch=(P, P)) runs it.")
flags.mark_flags_as_required(["from", "to"])


def read(source_format: str, path: str):
  from ast_jax.convert import hf, model_dir

  if source_format == "ast_jax":
    return model_dir.load_model_dir(path)
  if source_format == "torch":
    raise ValueError("--from=torch: the plain-PyTorch ElasticAST export is written, not read; convert from the "
                     "ast_jax model directory it was exported from")
  if source_format == "hf":
    bundle, unused = hf.load_hf(path)
    if unused:
      logging.warning("tensors in %s not used: %s", path, unused)
    return bundle
  return read_with_config(path, source_format)


def read_with_config(path: str, source_format: str):
  """An upstream `.pth` (AST or AuM), which carries no config: the model, front end and labels come from --config."""
  import jax
  import jax.numpy as jnp

  from ast_jax.audio.patches import patch_grid, patch_of, strides_of
  from ast_jax.convert import model_dir, original
  from ast_jax.models import build_model, family_of, init_params

  if _CONFIG.value is None:
    raise app.UsageError(f"--from={source_format} needs --config=configs/X.py (the recipe the weights belong to)")
  config = _CONFIG.value
  family = family_of(config)
  if source_format not in family.weight_formats:
    raise app.UsageError(f"--from={source_format}: the config's {family.name!r} model reads "
                         f"{', '.join(family.weight_formats)}; give the config of the model the weights belong to")
  label_csv = _LABEL_CSV.value or config.data.label_csv
  names, ids = model_dir.label_names_from_csv(label_csv) if label_csv else ([], [])
  model = build_model(config)
  example = jnp.zeros((1, config.audio.target_length, config.audio.num_mel_bins))
  template = jax.tree.map(jax.device_get, init_params(model, jax.random.key(0), example))
  if source_format == "aum":
    from ast_jax.convert.aum import load_upstream

    grid = patch_grid(config.audio.num_mel_bins, config.audio.target_length, patch_of(config.model),
                      strides_of(config.model))
    params, report = load_upstream(path, template, grid)
  else:
    params, report = original.load_original(path, template, config.model, config.audio.num_mel_bins,
                                            config.audio.target_length)
  logging.info("%s: %s", path, report.summary())
  bundle_config = model_dir.bundle_config(config.model, config.audio, config.num_classes)
  return model_dir.ModelBundle(params, bundle_config, model_dir.default_label_names(config.num_classes, names), ids)


def export_patch() -> int | None:
  """--patch_size, checked before anything is read; None: the model's own patch."""
  if _PATCH_SIZE.value is None:
    return None
  if _TO.value != "hf":
    raise ValueError(f"--patch_size applies to --to=hf, not --to={_TO.value}")
  from ast_jax.convert.hf import square_patch_size

  return square_patch_size(_PATCH_SIZE.value)


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError("usage: python -m ast_jax.convert --from=FORMAT --to=FORMAT SRC DST")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", force=True)
  source, target = argv[1], argv[2]
  try:
    patch = export_patch()
    bundle = read(_FROM.value, source)
    write(_TO.value, bundle, target, patch)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"error: {error}")
  at_patch = f", {patch}x{patch} patches" if patch else ""
  print(f"{_FROM.value}:{source} -> {_TO.value}:{target} ({bundle.config.num_classes} classes{at_patch})")


if __name__ == "__main__":
  app.run(main)
