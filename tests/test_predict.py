"""predict for every model family (ast_jax/inference.py): each family's predictions on FSDD files equal the
evaluation path's (the trainer's eval step on the evaluation batches of the same files), patch tokens come with
their positions, and options a model cannot take are one clear error."""

import os

import jax
import numpy as np
import pytest

from ast_jax import inference
from ast_jax.convert import model_dir
from ast_jax.data.inputs import build_input
from ast_jax.data.sources import build_sources
from ast_jax.models import build_model, example_inputs, family_of, init_params
from ast_jax.train.phases import Phase, phase_config
from ast_jax.train.steps import make_eval_step
from ast_jax.train.trainer import export_model
from configs import fsdd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDINGS = os.path.join(ROOT, os.pardir, "shared", "data", "fsdd", "recordings")
needs_fsdd = pytest.mark.skipif(not os.path.isdir(RECORDINGS), reason=f"FSDD not found at {RECORDINGS}")

# Test takes (0-4 are the upstream split's test set) of two speakers and three digits; lengths 0.3-0.9 s.
FILES = [f"{digit}_{speaker}_{take}.wav" for digit in (0, 4, 7) for speaker in ("jackson", "theo") for take in (0, 1)]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fsdd") / "recordings"
  folder.mkdir()
  for name in FILES + [f"{digit}_jackson_10.wav" for digit in range(10)]:  # a training set of all ten labels
    os.symlink(os.path.join(RECORDINGS, name), folder / name)
  return folder


def small_config(arg: str, recordings, **model):
  config = fsdd.get_config(arg)
  config.data.update(path=str(recordings), scan="header", cache_audio=False, batch_size=2, eval_batch_size=4,
                     num_workers=0)
  config.model.update(variant="", width=32, depth=2, num_heads=2, **model)
  if "packing" in config:
    config.packing.update(eval_rows=2)
  return config


def model_directory(config, tmp_path):
  """A model directory of `config` with random weights, written as training writes it."""
  params = jax.tree.map(np.asarray, init_params(build_model(config), jax.random.key(1), *example_inputs(config)))
  export_model(str(tmp_path / "model"), params, config, [str(i) for i in range(config.num_classes)])
  return str(tmp_path / "model")


def evaluation_scores(config, patch=None):
  """Scores of the trainer's eval step on the evaluation batches, by file name."""
  sources = build_sources(config)
  family = family_of(config)
  params = model_dir.load_model_dir(config.workdir_model).params
  eval_step = jax.jit(make_eval_step(build_model(config), config, patch))
  by_name = {}
  for batch in build_input(config, sources, packed=family.trains_packed(config)).eval_batches():
    scores = np.asarray(eval_step(params, batch)["scores"]).reshape(-1, config.num_classes)
    for index, score in zip(batch["index"].reshape(-1), scores):
      if index >= 0:
        by_name[os.path.basename(sources.eval[index].audio)] = score
  return by_name


def predictions(checkpoint, recordings, **options):
  from ast_jax.audio import load_audio, remove_mean

  bundle = model_dir.load_model_dir(checkpoint)
  predictor = inference.make_predictor(bundle, **options)
  waveforms = [remove_mean(load_audio(str(recordings / name), predictor.sample_rate)) for name in FILES]
  window = predictor.default_window()
  return bundle, predictor, predictor.predict(waveforms, window, window // 2)


CASES = {
    "AST": ("smoke", {}, {}),
    "FlexiAST at patch 8": ("flexi", {}, {"patch_size": 8}),
    "AuM": ("aum_smoke", {}, {}),
    "ElasticAST": ("elastic_smoke", {}, {}),
    "ElasticAST at q = 2": pytest.param(("elastic_smoke", {}, {"resolution": 2.0}), marks=pytest.mark.slow),
    "packed AuM": ("aum_packed_smoke", {}, {}),
}


@needs_fsdd
@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_predict_equals_the_evaluation_path_for_every_family(case, recordings, tmp_path):
  arg, model, options = case
  config = small_config(arg, recordings, **model)
  config.workdir_model = model_directory(config, tmp_path)
  patch = (options["patch_size"],) * 2 if "patch_size" in options else None
  if "resolution" in options:
    config.packing.resolutions = (options["resolution"],)
  expected = evaluation_scores(config, patch)
  bundle, predictor, results = predictions(config.workdir_model, recordings, **options)
  assert predictor.packed == family_of(config).trains_packed(config)
  assert sorted(expected) == sorted(FILES)
  for name, result in zip(FILES, results):
    # Whole-clip models: the evaluation batch cuts each file to the model's input, which is predict's first window.
    np.testing.assert_allclose(inference.scores(bundle, result.logits[0]), expected[name], atol=2e-5,
                               err_msg=f"{arg} {options}: {name}")
    if predictor.packed:
      assert len(result.starts) == 1  # every file whole


@needs_fsdd
@pytest.mark.parametrize("method", ["max_pool", pytest.param("patch", marks=pytest.mark.slow)])
def test_predict_runs_models_of_a_coarse_phase(method, recordings, tmp_path):
  """A model trained in a coarse phase (time pooled 2x, or 2x longer patches) predicts as its phase evaluated it."""
  config = phase_config(small_config("smoke", recordings), Phase(method, 2, 1))
  config.workdir_model = model_directory(config, tmp_path)
  expected = evaluation_scores(config, tuple(config.model.run_patch) if method == "patch" else None)
  bundle, _, results = predictions(config.workdir_model, recordings)
  for name, result in zip(FILES, results):
    np.testing.assert_allclose(inference.scores(bundle, result.logits[0]), expected[name], atol=2e-5)


@needs_fsdd
@pytest.mark.parametrize("arg", ["smoke", "elastic_smoke", pytest.param("aum_packed_smoke", marks=pytest.mark.slow)])
def test_token_embeddings_cover_each_window_grid_with_positions(arg, recordings, tmp_path):
  from ast_jax.audio import load_audio, remove_mean

  config = small_config(arg, recordings)
  checkpoint = model_directory(config, tmp_path)
  _, predictor, results = predictions(checkpoint, recordings, tokens=True)
  for name, result in zip(FILES, results):
    for window, start in enumerate(result.starts):
      freq, time = result.freq_index[window], result.time_index[window]
      if predictor.packed:  # every patch of the clip's own grid at its length, once
        samples = len(remove_mean(load_audio(str(recordings / name), predictor.sample_rate)))
        grid = predictor.spec.grid(min(samples - start, predictor.default_window()), predictor.resolution)
      else:
        grid = predictor.grid
      assert sorted(zip(freq, time)) == [(f, t) for f in range(grid[0]) for t in range(grid[1])]
      assert result.tokens[window].shape == (len(freq), 32) and np.all(np.isfinite(result.tokens[window]))
      # Each patch's first frame, in seconds from the start of the file.
      assert np.isclose(result.seconds[window].min(), start / predictor.sample_rate)
  table = inference.token_table(FILES, results)
  assert table["features"].shape[0] == sum(len(t) for r in results for t in r.tokens)
  assert set(table["file_index"]) == set(range(len(FILES)))


@needs_fsdd
def test_packed_tokens_do_not_depend_on_the_other_clips_in_the_row(recordings, tmp_path):
  """A file's tokens are the same predicted alone as packed with five others (attention masked to each clip)."""
  from ast_jax.audio import load_audio, remove_mean

  config = small_config("elastic_smoke", recordings)
  bundle = model_dir.load_model_dir(model_directory(config, tmp_path))
  predictor = inference.make_predictor(bundle, tokens=True)
  waveforms = [remove_mean(load_audio(str(recordings / name), 8000)) for name in FILES]
  window = predictor.default_window()
  together = predictor.predict(waveforms, window, window)
  alone = predictor.predict(waveforms[2:3], window, window)[0]
  np.testing.assert_allclose(together[2].tokens[0], alone.tokens[0], atol=1e-5)
  np.testing.assert_allclose(together[2].logits, alone.logits, atol=1e-5)
  np.testing.assert_array_equal(together[2].time_index[0], alone.time_index[0])


@needs_fsdd
def test_options_a_model_cannot_take_are_one_clear_error(recordings, tmp_path):
  ast = model_dir.load_model_dir(model_directory(small_config("flexi", recordings), tmp_path / "flexi"))
  aum = model_dir.load_model_dir(model_directory(small_config("aum_smoke", recordings), tmp_path / "aum"))
  with pytest.raises(ValueError, match="runs at its own patch size only"):
    inference.make_predictor(aum, patch_size=8)
  with pytest.raises(ValueError, match="--patch_size=128: this model cannot run at"):
    inference.make_predictor(ast, patch_size=128)
  with pytest.raises(ValueError, match="--resolution: this 'ast' model was trained on whole-clip rows"):
    inference.make_predictor(ast, resolution=2.0)


@needs_fsdd
def test_predict_command_on_an_elastic_model_saves_token_embeddings(recordings, tmp_path):
  import subprocess
  import sys

  checkpoint = model_directory(small_config("elastic_smoke", recordings), tmp_path)
  files = [str(recordings / name) for name in FILES[:3]]
  tokens, logits = tmp_path / "tokens.npz", tmp_path / "logits.npy"
  command = [sys.executable, "-m", "ast_jax.predict", f"--checkpoint={checkpoint}", f"--logits={logits}",
             f"--token_embeddings={tokens}", *files]
  result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  assert len([line for line in result.stdout.splitlines() if line.startswith(str(recordings))]) == 3
  table = np.load(tokens)
  assert list(table["paths"]) == files and np.load(logits).shape == (3, 10)
  assert table["features"].shape == (len(table["file_index"]), 32) and set(table["file_index"]) == {0, 1, 2}
  refused = subprocess.run(command[:4] + ["--patch_size=16", *files], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert refused.stderr.strip().splitlines()[-1] == ("error: --patch_size: this 'elastic' model runs at its own "
                                                     "patch size only; models of the families ast run at any")
