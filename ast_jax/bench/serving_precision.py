"""What bfloat16 costs a trained model served in PyTorch on a CPU: accuracy and logit differences on a config's
evaluation set, ast_jax float32 against the Hugging Face export in float32 and under bfloat16 autocast.

  python -m ast_jax.bench.serving_precision --checkpoint=workdirs/fsdd/model --config=configs/fsdd.py

Every evaluation clip goes through ast_jax's front end (the model directory's settings, cut or padded to its
input) once; the same normalised spectrograms feed ast_jax's model and `ASTForAudioClassification` (exported by
`convert/hf.py:save_hf`). Prints one JSON line per backend: accuracy (top-1 against the clip's first label),
agreement of the top-1 class with ast_jax float32, and the largest absolute logit difference from it.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "ast_jax model directory (an AST) or training workdir.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The recipe whose evaluation set is read.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Clips per forward pass.")
flags.mark_flags_as_required(["checkpoint", "config"])


def spectrograms(bundle, config) -> tuple[np.ndarray, np.ndarray]:
  """(normalised spectrograms `[clips, frames, mel_bins]`, first labels `[clips]`) of the evaluation set."""
  import jax

  from ast_jax.audio import model_input
  from ast_jax.data import build_sources
  from ast_jax.data.reader import WaveformReader
  from ast_jax.inference import Predictor

  sources = build_sources(config)
  predictor = Predictor(bundle)
  reader = WaveformReader(sources.eval, predictor.sample_rate)
  front = jax.jit(lambda waveforms, lengths: model_input(waveforms, lengths, bundle.config.audio.to_dict()))
  features = []
  for first in range(0, len(sources.eval), _BATCH.value):
    waveforms = [reader.decode(index) for index in range(first, min(first + _BATCH.value, len(sources.eval)))]
    _, clips, lengths = zip(*(predictor.windows(w, predictor.input_samples, predictor.input_samples)
                              for w in waveforms))
    features.append(np.asarray(front(np.stack([c[0] for c in clips]), np.stack([n[0] for n in lengths]))))
  return np.concatenate(features), np.asarray([example.labels[0] for example in sources.eval])


def main(argv: list[str]) -> None:
  del argv
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import torch
  import transformers

  from ast_jax.convert import hf, model_dir
  from ast_jax.models import build_model

  bundle = model_dir.load_model_dir(_CHECKPOINT.value)
  inputs, labels = spectrograms(bundle, _CONFIG.value)
  model = build_model(bundle.config)
  apply = jax.jit(lambda x: model.apply({"params": bundle.params}, x)[0])
  reference = np.concatenate([np.asarray(apply(inputs[i:i + _BATCH.value]))
                              for i in range(0, len(inputs), _BATCH.value)])
  with tempfile.TemporaryDirectory() as directory:
    hf.save_hf(directory, bundle)
    torch_model = transformers.ASTForAudioClassification.from_pretrained(directory).eval()
  results = {"ast_jax float32": reference}
  for name, dtype in (("pytorch float32", None), ("pytorch bfloat16 autocast", torch.bfloat16)):
    outputs = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
      for i in range(0, len(inputs), _BATCH.value):
        outputs.append(torch_model(torch.from_numpy(inputs[i:i + _BATCH.value])).logits.float().numpy())
    results[name] = np.concatenate(outputs)
  for name, logits in results.items():
    print(json.dumps({"backend": name, "clips": len(labels),
                      "accuracy": float(np.mean(logits.argmax(-1) == labels)),
                      "top1_agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
                      "max_abs_logit_difference": float(np.abs(logits - reference).max())}))


if __name__ == "__main__":
  app.run(main)
