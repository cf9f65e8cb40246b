"""The PyTorch reference: transformers' `ASTForAudioClassification` train step on the same shapes.

torch and transformers are optional: they are imported only here, and only when a comparison is asked for.
"""

from __future__ import annotations

import gc
from typing import Any, Mapping

from ast_jax.bench.timing import measure


def require_torch() -> None:
  """Raises a clear error when the PyTorch comparison cannot run."""
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as error:
    raise RuntimeError("--compare=torch needs torch and transformers (pip install -r requirements-test.txt): "
                       f"{error}") from error


def build_torch_model(*, width: int, depth: int, num_heads: int, frames: int, mel_bins: int, fstride: int,
                      tstride: int, num_classes: int) -> Any:
  """transformers' AST with the given shape, SDPA attention, randomly initialised."""
  import transformers

  config = transformers.ASTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=num_heads,
                                  intermediate_size=4 * width, num_labels=num_classes, max_length=frames,
                                  num_mel_bins=mel_bins, frequency_stride=fstride, time_stride=tstride)
  return transformers.AutoModelForAudioClassification.from_config(config, attn_implementation="sdpa")


def time_torch_case(row: Mapping[str, Any], *, warmup: int, repeats: int,
                    num_classes: int = 527) -> dict[str, Any]:
  """Times the PyTorch train step (model.train(), BCE-with-logits, Adam; zero_grad, backward, step) with the
  shared protocol. Uses `row`'s width, depth, num_heads, frames, mel_bins, fstride, tstride, batch and dtype.

  On CUDA the model runs there and each call synchronises; bfloat16 runs under autocast (weights and Adam state
  stay float32, as in ast_jax).
  """
  import torch

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model = build_torch_model(width=row["width"], depth=row["depth"], num_heads=row["num_heads"], frames=row["frames"],
                            mel_bins=row["mel_bins"], fstride=row["fstride"], tstride=row["tstride"],
                            num_classes=num_classes).to(device)
  model.train()
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
  generator = torch.Generator().manual_seed(1)
  spectrogram = (0.5 * torch.randn(row["batch"], row["frames"], row["mel_bins"], generator=generator)).to(device)
  labels = (torch.rand(row["batch"], num_classes, generator=generator) < 0.01).float().to(device)
  autocast = row["dtype"] == "bfloat16"

  def train_call():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      logits = model(input_values=spectrogram).logits
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
      torch.cuda.synchronize()

  timing = measure(train_call, warmup=warmup, repeats=repeats)
  del model, optimizer
  gc.collect()
  if device.type == "cuda":
    torch.cuda.empty_cache()
  device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  return dict(torch_device=device_name, torch_ms_per_step=1e3 * timing.median_s, torch_version=torch.__version__)
