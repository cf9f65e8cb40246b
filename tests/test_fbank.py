"""Parity of the JAX Kaldi filterbank with the NumPy Kaldi reference in transformers (AST's fallback path)."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

from ast_jax.audio import fbank_batch, kaldi_fbank, load_audio, remove_mean  # noqa: E402
from ast_jax.audio.fbank import FbankOptions, batch_features, feature_window, mel_banks  # noqa: E402

audio_utils = pytest.importorskip("transformers.audio_utils")

FSDD = Path(__file__).parents[1].parent / "shared/data/fsdd"
EPS = float(np.finfo(np.float32).eps)
LOG_EPS = float(np.log(np.float32(EPS)))
AST = dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
WINDOW_NAMES = {"hanning": "hann", "hamming": "hamming", "povey": "povey", "rectangular": "boxcar"}


def reference(waveform, sample_rate=16000, num_mel_bins=128, window_type="hanning", frame_shift=10.0,
              low_freq=20.0, high_freq=0.0, fft_length=None, power=2.0, preemphasis=0.97, remove_dc_offset=True):
  """transformers' ASTFeatureExtractor NumPy fallback call, generalised over the options under test."""
  frame_length = int(sample_rate * 25.0 * 0.001)
  hop_length = int(sample_rate * frame_shift * 0.001)
  fft_length = fft_length or 1 << (frame_length - 1).bit_length()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # narrow low-frequency filters hold no FFT bin; Kaldi keeps them too
    filters = audio_utils.mel_filter_bank(
        num_frequency_bins=fft_length // 2 + 1, num_mel_filters=num_mel_bins, min_frequency=low_freq,
        max_frequency=high_freq if high_freq > 0 else sample_rate / 2 + high_freq, sampling_rate=sample_rate,
        norm=None, mel_scale="kaldi", triangularize_in_mel_space=True)
  window = audio_utils.window_function(frame_length, WINDOW_NAMES[window_type], periodic=False)
  return audio_utils.spectrogram(
      np.asarray(waveform, np.float32), window, frame_length=frame_length, hop_length=hop_length,
      fft_length=fft_length, power=power, center=False, preemphasis=preemphasis, mel_filters=filters,
      log_mel="log", mel_floor=1.192092955078125e-07, remove_dc_offset=remove_dc_offset).T


def assert_parity(ours, ref, tol=1e-3, strict_db=40.0, strict_tol=1e-4):
  """All cells within `tol`; cells within `strict_db` of their frame's peak (clear of float32 rounding noise)
  within `strict_tol`."""
  ours = np.asarray(ours)
  assert ours.shape == ref.shape
  difference = np.abs(ours - ref)
  worst = np.unravel_index(difference.argmax(), ref.shape)
  assert difference.max() <= tol, f"max |diff| {difference.max():.3g} at (frame, bin) {worst}"
  loud = ref > ref.max(axis=1, keepdims=True) - strict_db / 10 * np.log(10)
  assert difference[loud].max() <= strict_tol


def fsdd_files(step: int) -> list[Path]:
  if not (FSDD / "recordings").is_dir():
    pytest.skip(f"FSDD recordings not found at {FSDD / 'recordings'}")
  return sorted((FSDD / "recordings").glob("*.wav"))[::step]


def speechlike(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
  """A chirp with harmonics over a noise floor about 20 dB down, so every mel band holds real energy.

  Bands more than about 80 dB under a frame's peak hold only float32 rounding noise (in Kaldi and torchaudio
  too), so a pure-tone test signal could not pin 1e-3 against the float64 reference.
  """
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  phase = 2 * np.pi * (100 * t + 400 * t**2)
  tone = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
  return (0.3 * tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# Filters and windows.
@pytest.mark.parametrize("num_mel_bins, low_freq, high_freq",
                         [(128, 20.0, 0.0), (64, 20.0, 0.0), (80, 60.0, -400.0), (40, 0.0, 7000.0)])
def test_mel_banks_match_reference(num_mel_bins, low_freq, high_freq):
  options = FbankOptions.create(num_mel_bins=num_mel_bins, low_freq=low_freq, high_freq=high_freq)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    expected = audio_utils.mel_filter_bank(
        num_frequency_bins=257, num_mel_filters=num_mel_bins, min_frequency=low_freq,
        max_frequency=high_freq if high_freq > 0 else 8000 + high_freq, sampling_rate=16000, norm=None,
        mel_scale="kaldi", triangularize_in_mel_space=True)
  np.testing.assert_allclose(mel_banks(options), expected, atol=1e-12)
  assert mel_banks(options)[-1].max() == 0.0  # Nyquist bin unused, as torchaudio's zero column


@pytest.mark.parametrize("window_type", ["hanning", "hamming", "povey", "rectangular"])
def test_windows_match_reference(window_type):
  window = feature_window(FbankOptions.create(window_type=window_type))
  np.testing.assert_allclose(window, audio_utils.window_function(400, WINDOW_NAMES[window_type], periodic=False),
                             atol=1e-12)


def test_blackman_window_matches_numpy():
  window = feature_window(FbankOptions.create(window_type="blackman"))  # blackman_coeff 0.42: numpy's Blackman
  np.testing.assert_allclose(window, np.blackman(400), atol=1e-12)


# Parity on real and synthetic audio.
@pytest.mark.parametrize("index", [0, 1, 2])
def test_fsdd_parity_per_clip(index):
  path = fsdd_files(step=997)[index]
  waveform = remove_mean(load_audio(str(path)))  # 8 kHz files, resampled to 16 kHz
  ref = reference(waveform)
  ours = kaldi_fbank(waveform, sample_rate=16000, **AST)
  assert ours.shape == (1 + (len(waveform) - 400) // 160, 128)
  assert_parity(ours, ref)


def test_fsdd_parity_batched_jit():
  waveforms = [remove_mean(load_audio(str(path))) for path in fsdd_files(step=60)]
  lengths = np.array([len(w) for w in waveforms])
  batch = np.zeros((len(waveforms), lengths.max()), np.float32)
  for row, waveform in zip(batch, waveforms):
    row[:len(waveform)] = waveform
  fbank, num_frames = jax.jit(lambda w, n: fbank_batch(w, n, 16000, **AST))(batch, lengths)
  fbank, num_frames = np.asarray(fbank), np.asarray(num_frames)
  assert fbank.shape == (len(waveforms), 1 + (lengths.max() - 400) // 160, 128)
  for i, waveform in enumerate(waveforms):
    ref = reference(waveform)
    assert num_frames[i] == ref.shape[0]
    assert_parity(fbank[i, :num_frames[i]], ref)


def test_fsdd_native_8khz():
  waveform = remove_mean(load_audio(str(fsdd_files(step=500)[2]), sample_rate=8000))
  options = dict(AST, num_mel_bins=64)
  assert_parity(kaldi_fbank(waveform, sample_rate=8000, **options), reference(waveform, 8000, num_mel_bins=64))


def test_white_noise_ten_seconds():
  waveform = np.random.default_rng(0).uniform(-1, 1, 160000).astype(np.float32)
  ours = kaldi_fbank(waveform, **AST)
  assert ours.shape == (998, 128)
  assert_parity(ours, reference(waveform))


def test_speechlike_ten_seconds():
  waveform = speechlike(10.0)
  assert_parity(kaldi_fbank(waveform, **AST), reference(waveform))


def test_silence_is_log_epsilon():
  waveform = np.zeros(16000, np.float32)
  ours = np.asarray(kaldi_fbank(waveform, **AST))
  assert ours.shape == (98, 128)
  np.testing.assert_array_equal(ours, np.full_like(ours, LOG_EPS))
  assert_parity(ours, reference(waveform), tol=1e-6)


@pytest.mark.parametrize("options", [
    dict(window_type="hamming"),
    dict(window_type="povey"),
    dict(window_type="rectangular", num_mel_bins=64),
    dict(num_mel_bins=64, low_freq=100.0, high_freq=-500.0),
    dict(low_freq=0.0, high_freq=6000.0),
    dict(frame_shift=13.3),  # 212 samples: not a divisor-friendly shift (gather path)
    dict(frame_shift=12.0),
    dict(use_power=False),
    dict(preemphasis_coefficient=0.0, remove_dc_offset=False),
])
def test_option_variants_match_reference(options):
  waveform = speechlike(2.0, seed=1)
  ours = kaldi_fbank(waveform, **dict(AST, **options))
  ref = reference(waveform, num_mel_bins=options.get("num_mel_bins", 128),
                  window_type=options.get("window_type", "hanning"), frame_shift=options.get("frame_shift", 10.0),
                  low_freq=options.get("low_freq", 20.0), high_freq=options.get("high_freq", 0.0),
                  power=1.0 if options.get("use_power") is False else 2.0,
                  preemphasis=options.get("preemphasis_coefficient", 0.97),
                  remove_dc_offset=options.get("remove_dc_offset", True))
  shift = int(16000 * options.get("frame_shift", 10.0) * 0.001)
  assert ours.shape[0] == 1 + (len(waveform) - 400) // shift
  magnitude = options.get("use_power") is False  # log-magnitude spans half the log-power range
  assert_parity(ours, ref, strict_db=20.0 if magnitude else 40.0)


def test_no_power_of_two_rounding():
  waveform = speechlike(1.0, seed=2)
  ours = kaldi_fbank(waveform, **AST, round_to_power_of_two=False)
  assert_parity(ours, reference(waveform, fft_length=400))


def test_torchaudio_defaults():
  options = FbankOptions.create()
  assert (options.num_mel_bins, options.window_type, options.window_size, options.padded_window_size) == (
      23, "povey", 400, 512)
  waveform = speechlike(1.0, seed=3)
  assert_parity(kaldi_fbank(waveform), reference(waveform, num_mel_bins=23, window_type="povey"))


def kaldi_frames(waveform: np.ndarray, shift: int = 160, size: int = 400, snip_edges: bool = True) -> np.ndarray:
  """Frames by Kaldi's ExtractWindow index rule (mirror with the edge sample repeated when not snipping)."""
  n = len(waveform)
  count = 1 + (n - size) // shift if snip_edges else (n + shift // 2) // shift
  start = np.arange(count) * shift - (0 if snip_edges else size // 2 - shift // 2)
  index = start[:, None] + np.arange(size)[None, :]
  index = np.where(index < 0, -index - 1, index)
  index = np.where(index >= n, 2 * n - 1 - index, index)
  return waveform.astype(np.float64)[index]


def test_snip_edges_false_frames_and_values():
  waveform = speechlike(1.013, seed=4)  # 16208 samples: not a whole number of shifts
  ours = kaldi_fbank(waveform, **AST, snip_edges=False)
  frames = kaldi_frames(waveform, snip_edges=False)
  assert ours.shape == ((16208 + 80) // 160, 128) == (frames.shape[0], 128)
  # Laying the mirrored frames end to end at hop 400 lets the reference (snip_edges only) recompute each one.
  ref = reference(frames.reshape(-1), frame_shift=25.0)
  assert_parity(ours, ref)


@pytest.mark.parametrize("raw_energy, htk_compat, energy_floor", [(True, False, 1.0), (False, True, 0.0),
                                                                  (True, True, 0.0)])
def test_energy_column(raw_energy, htk_compat, energy_floor):
  waveform = speechlike(1.0, seed=5) * np.float32(0.01)  # quiet, so the energy floor matters
  options = dict(AST, use_energy=True, raw_energy=raw_energy, htk_compat=htk_compat, energy_floor=energy_floor)
  ours = np.asarray(kaldi_fbank(waveform, **options))
  assert ours.shape == (98, 129)
  energy, mel = (ours[:, -1], ours[:, :-1]) if htk_compat else (ours[:, 0], ours[:, 1:])
  np.testing.assert_allclose(mel, np.asarray(kaldi_fbank(waveform, **AST)), atol=1e-6)
  frames = kaldi_frames(waveform)
  frames = frames - frames.mean(axis=1, keepdims=True)
  if not raw_energy:
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * previous) * np.hanning(400)
  expected = np.log(np.maximum((frames**2).sum(axis=1), EPS))
  if energy_floor > 0:
    expected = np.maximum(expected, np.log(energy_floor))
  np.testing.assert_allclose(energy, expected, atol=1e-4)
  assert (energy_floor == 0.0) == bool(np.any(expected < 0.0))


def test_linear_fbank_without_log():
  waveform = speechlike(1.0, seed=6)
  ours = np.asarray(kaldi_fbank(waveform, **AST, use_log_fbank=False))
  assert ours.min() >= 0.0
  assert_parity(np.log(np.maximum(ours, EPS)), reference(waveform))


def test_dither_needs_a_key_and_is_deterministic():
  waveform = np.zeros(8000, np.float32)
  with pytest.raises(ValueError, match="PRNG key"):
    kaldi_fbank(waveform, dither=1.0)
  with pytest.raises(ValueError, match="PRNG key"):
    fbank_batch(waveform[None], None, dither=1.0)
  first = np.asarray(kaldi_fbank(waveform, dither=1.0, rng=jax.random.key(0)))
  again = np.asarray(kaldi_fbank(waveform, dither=1.0, rng=jax.random.key(0)))
  other = np.asarray(kaldi_fbank(waveform, dither=1.0, rng=jax.random.key(1)))
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 0.1
  assert first.min() > LOG_EPS + 5.0  # unit-variance noise lifts silence far above the log floor
  batched, _ = fbank_batch(np.zeros((2, 8000), np.float32), None, dither=1.0, rng=jax.random.key(0))
  assert np.abs(np.asarray(batched[0] - batched[1])).max() > 0.1  # each clip draws its own noise


def test_jit_equals_eager():
  waveform = speechlike(1.5, seed=7)
  jitted = jax.jit(lambda w: kaldi_fbank(w, **AST))(jnp.asarray(waveform))
  np.testing.assert_allclose(jitted, kaldi_fbank(waveform, **AST), atol=1e-6)


@pytest.mark.parametrize("options", [AST, dict(AST, frame_shift=13.3), dict(AST, snip_edges=False),
                                     dict(AST, use_energy=True, subtract_mean=True, min_duration=0.7)])
def test_batched_jit_equals_per_clip(options):
  lengths = np.array([16000, 9001, 399, 400, 12345])
  batch = np.stack([speechlike(1.0, seed=10 + i) for i in range(len(lengths))])
  batch[np.arange(16000)[None, :] >= lengths[:, None]] = 0.0
  fbank, num_frames = jax.jit(lambda w, n: fbank_batch(w, n, **options))(batch, lengths)
  opts = FbankOptions.create(**options)
  shift = opts.window_shift
  expected = [1 + (n - 400) // shift if n >= 400 else 0 for n in lengths] if opts.snip_edges else [
      (n + shift // 2) // shift for n in lengths]
  expected = [0 if n < opts.min_duration * 16000 else count for n, count in zip(lengths, expected)]
  assert fbank.shape == (5, expected[0], opts.num_features)
  assert num_frames.dtype == jnp.int32
  np.testing.assert_array_equal(num_frames, expected)
  for i in (0, 1):
    clip = kaldi_fbank(batch[i, :lengths[i]], **options)
    assert clip.shape[0] == num_frames[i]
    # Without snip_edges, the last frames mirror each clip's own end, so only frames clear of it must agree.
    inside = clip.shape[0] if opts.snip_edges else (lengths[i] - 400 + 120) // shift + 1
    np.testing.assert_allclose(fbank[i, :inside], clip[:inside], atol=1e-5)


def test_looped_and_vectorised_batches_agree():
  batch = np.stack([speechlike(0.6, seed=20), speechlike(0.6, seed=21)])
  lengths = jnp.asarray([9600, 7000])
  options = FbankOptions.create(**AST)
  looped = jax.jit(lambda w: batch_features(w, lengths, options, per_clip=True))(batch)
  vectorised = jax.jit(lambda w: batch_features(w, lengths, options, per_clip=False))(batch)
  np.testing.assert_allclose(looped[0], vectorised[0], atol=1e-5)
  np.testing.assert_array_equal(looped[1], vectorised[1])


def test_sample_frequency_alias_and_min_duration():
  waveform = speechlike(0.5, seed=8)
  np.testing.assert_array_equal(kaldi_fbank(waveform, sample_frequency=16000.0, **AST),
                                kaldi_fbank(waveform, 16000, **AST))
  assert kaldi_fbank(waveform, min_duration=0.6).shape == (0, 23)


# Bad input.
@pytest.mark.parametrize("waveform, options, error, match", [
    (np.zeros((1, 16000), np.float32), {}, ValueError, "1-D waveform"),
    (np.zeros(399, np.float32), {}, ValueError, "fewer than one"),
    (np.array([0.0, np.nan] * 400, np.float32), {}, ValueError, "NaN"),
    (np.zeros(16000, np.float32), dict(vtln_warp=0.9), ValueError, "vtln_warp"),
    (np.zeros(16000, np.float32), dict(window_type="hann"), ValueError, "window_type"),
    (np.zeros(16000, np.float32), dict(low_freq=5000.0, high_freq=4000.0), ValueError, "mel range"),
    (np.zeros(16000, np.float32), dict(num_mel_bins=3), ValueError, "num_mel_bins"),
    (np.zeros(16000, np.float32), dict(frame_lenght=25.0), TypeError, "frame_lenght"),
])
def test_bad_input_is_rejected(waveform, options, error, match):
  with pytest.raises(error, match=match):
    kaldi_fbank(waveform, **options)


def test_bad_batch_input_is_rejected():
  with pytest.raises(ValueError, match=r"\[batch, samples\]"):
    fbank_batch(np.zeros(16000, np.float32))
  with pytest.raises(ValueError, match="fewer than one frame"):
    fbank_batch(np.zeros((2, 300), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    fbank_batch(np.full((2, 1000), np.inf, np.float32))


@pytest.mark.parametrize("per_clip", [True, False])
def test_per_clip_frame_shifts_match_reference(per_clip):
  """ElasticAST's variable resolution: each clip framed at its own shift (10 q ms) in one traced program."""
  from ast_jax.audio.fbank import batch_features_at

  waveforms = [remove_mean(load_audio(str(path))) for path in fsdd_files(step=300)[:4]]
  resolutions = [1.0, 1.5, 2.2, 4.0]
  shifts = np.array([FbankOptions.create(16000, frame_shift=10 * q).window_shift for q in resolutions])
  lengths = np.array([len(w) for w in waveforms])
  batch = np.zeros((len(waveforms), lengths.max()), np.float32)
  for row, waveform in zip(batch, waveforms):
    row[:len(waveform)] = waveform
  options = FbankOptions.create(16000, **AST)
  frames = 1 + (lengths.max() - 400) // 160
  run = jax.jit(batch_features_at, static_argnames=("options", "frames", "per_clip"))
  fbank, num_frames = run(batch, lengths, shifts, options, frames, per_clip=per_clip)
  for i, (waveform, q) in enumerate(zip(waveforms, resolutions)):
    ref = reference(waveform, frame_shift=10 * q)
    assert num_frames[i] == ref.shape[0]
    assert_parity(np.asarray(fbank[i, :num_frames[i]]), ref)
