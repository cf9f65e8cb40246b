"""Writing a model bundle in each weight format `python -m ast_jax.convert --to=...` knows (WORKSPACE.md, Weight
formats); importable without the command's flags."""

from __future__ import annotations

FORMATS = ("hf", "original", "aum", "ast_jax", "torch")


def write(target_format: str, bundle, path: str, patch: int | None = None) -> None:
  """Writes `bundle` to `path` as `target_format` (`patch` P: Hugging Face at P x P patches); a format that does
  not hold the bundle's family raises ValueError naming the ones that do."""
  from ast_jax.convert import hf, model_dir, original
  from ast_jax.models import family_of

  family = family_of(bundle.config)
  if target_format not in family.weight_formats:
    raise ValueError(f"--to={target_format} does not hold {family.name!r} models; they export with "
                     + " or ".join(f"--to={f}" for f in family.weight_formats if f in FORMATS))
  if target_format == "ast_jax":
    model_dir.save_model_dir(path, bundle)
  elif target_format == "aum":
    from ast_jax.convert.aum import save_upstream

    save_upstream(path, bundle.params)
  elif target_format == "hf":
    hf.save_hf(path, bundle, patch=patch)
  elif target_format == "torch":
    from ast_jax.convert.torch_layout import require_torch

    require_torch(f"--to=torch ({path})")
    from ast_jax.convert.elastic_torch import save_pretrained

    save_pretrained(path, bundle)
  else:
    original.save_original(path, bundle.params)
