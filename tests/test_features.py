"""The model input: pad/cut before normalisation, SpecAugment masks, noise and roll, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

from ast_jax.audio import (add_noise_and_roll, clip_samples, frequency_time_mask, kaldi_fbank,  # noqa: E402
                           model_input)

AUDIO = dict(sample_rate=16000, num_mel_bins=128, frame_length=25.0, frame_shift=10.0, window_type="hanning",
             low_freq=20.0, high_freq=0.0, preemphasis_coefficient=0.97, remove_dc_offset=True, dither=0.0,
             target_length=100, mean=-6.6268077, std=5.358466)
PAD_VALUE = (0.0 - AUDIO["mean"]) / (2 * AUDIO["std"])
AST = dict(htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128)


def clips(lengths, seed=0):
  """A zero-padded batch `[batch, max(lengths)]` of mean-removed noise clips."""
  rng = np.random.default_rng(seed)
  batch = np.zeros((len(lengths), max(lengths)), np.float32)
  for row, n in zip(batch, lengths):
    row[:n] = rng.uniform(-0.5, 0.5, n)
    row[:n] -= row[:n].mean()
  return batch, np.asarray(lengths)


def test_clip_samples_gives_exact_frame_counts():
  assert clip_samples(1024) == 400 + 160 * 1023
  assert clip_samples(128) == 20720
  for target, shift in [(7, 10.0), (5, 13.3), (1024, 10.0)]:
    samples = clip_samples(target, frame_shift=shift)
    for n, frames in [(samples, target), (samples - 1, target - 1)]:
      shape = jax.eval_shape(lambda w: kaldi_fbank(w, frame_shift=shift), jax.ShapeDtypeStruct((n,), jnp.float32))
      assert shape.shape[0] == frames


def test_pads_before_normalising_and_matches_per_clip():
  batch, lengths = clips([12000, 5000, 300])  # 73, 29 and 0 frames, padded to 100
  features = np.asarray(model_input(batch, lengths, AUDIO))
  assert features.shape == (3, 100, 128) and features.dtype == np.float32
  for i, frames in enumerate([73, 29, 0]):
    if frames:
      expected = (np.asarray(kaldi_fbank(batch[i, :lengths[i]], **AST)) - AUDIO["mean"]) / (2 * AUDIO["std"])
      np.testing.assert_allclose(features[i, :frames], expected, atol=1e-5)
    np.testing.assert_allclose(features[i, frames:], PAD_VALUE, rtol=1e-6)


def test_cuts_long_clips():
  batch, lengths = clips([40000, 16240])  # 248 and exactly 100 frames
  features = np.asarray(model_input(batch, lengths, AUDIO))
  assert features.shape == (2, 100, 128)
  for i in range(2):
    expected = (np.asarray(kaldi_fbank(batch[i, :lengths[i]], **AST))[:100] - AUDIO["mean"]) / (2 * AUDIO["std"])
    np.testing.assert_allclose(features[i], expected, atol=1e-5)
  assert np.all(np.abs(features[1, -1] - PAD_VALUE).max() > 0.1)  # the last frame is real, not padding


def test_accepts_config_dict_and_rejects_missing_fields():
  ml_collections = pytest.importorskip("ml_collections")
  batch, lengths = clips([4000])
  from_dict = model_input(batch, lengths, AUDIO)
  np.testing.assert_array_equal(model_input(batch, lengths, ml_collections.ConfigDict(AUDIO)), from_dict)
  with pytest.raises(KeyError, match="target_length"):
    model_input(batch, lengths, {k: v for k, v in AUDIO.items() if k != "target_length"})
  with pytest.raises(ValueError, match="PRNG key"):
    model_input(batch, lengths, dict(AUDIO, dither=1.0))


def band_of(rows: np.ndarray) -> tuple[int, int]:
  """(start, width) of the single contiguous True run in `rows`, (0, 0) if none; fails if not contiguous."""
  where = np.flatnonzero(rows)
  if where.size == 0:
    return 0, 0
  assert np.all(np.diff(where) == 1), "mask is not one contiguous band"
  return int(where[0]), int(where.size)


def test_masks_zero_one_band_and_one_range_before_normalising():
  batch, lengths = clips([16240] * 6, seed=1)  # exactly 100 frames: no padding for a mask to hide in
  augment = dict(freq_mask=48, time_mask=30, noise=False, roll=0, mixup=0.0)
  clean = np.asarray(model_input(batch, lengths, AUDIO))
  masked = np.asarray(model_input(batch, lengths, AUDIO, augment=augment, rng=jax.random.key(3)))
  changed = masked != clean
  np.testing.assert_allclose(masked[changed], PAD_VALUE, rtol=1e-6)  # masked cells were 0 before normalising
  bands = []
  for example in changed:
    full_bins = example.all(axis=0)  # a frequency band spans every frame
    full_frames = example.all(axis=1)  # a time range spans every bin
    bin_start, bin_width = band_of(full_bins)
    frame_start, frame_width = band_of(full_frames)
    np.testing.assert_array_equal(example, full_bins[None, :] | full_frames[:, None])
    assert bin_width < 48 and bin_start + bin_width <= 128 and frame_width < 30 and frame_start + frame_width <= 100
    bands.append((bin_start, bin_width, frame_start, frame_width))
  assert len(set(bands)) == len(bands)  # drawn per example


def test_mask_widths_follow_torchaudio():
  fbank = jnp.ones((4000, 50, 20))
  mask = jax.jit(frequency_time_mask, static_argnames=("freq_mask", "time_mask"))
  masked = np.asarray(mask(jax.random.key(0), fbank, freq_mask=10, time_mask=0))
  assert np.all(masked.min(axis=1) == masked.max(axis=1))  # time untouched: the band covers every frame
  widths = (masked[:, 0, :] == 0).sum(axis=1)
  assert widths.max() == 9 and widths.min() == 0
  assert abs(widths.mean() - 4.5) < 0.2  # floor(U * 10): mean 4.5
  starts = np.array([band_of(row == 0)[0] for row in masked[:, 0, :] if (row == 0).any()])
  assert starts.min() == 0 and starts.max() >= 17  # start = floor(U * (20 - U' * 10)) reaches up to 19
  np.testing.assert_array_equal(frequency_time_mask(jax.random.key(0), fbank, 0, 0), fbank)


def test_noise_range_and_roll():
  batch, frames, mel_bins = 256, 40, 8
  ramp = jnp.broadcast_to(jnp.arange(frames, dtype=jnp.float32)[None, :, None], (batch, frames, mel_bins))
  augment = jax.jit(add_noise_and_roll, static_argnames="max_shift")
  noisy = np.asarray(augment(jax.random.key(1), jnp.zeros((batch, frames, mel_bins)), max_shift=0))
  assert noisy.shape == (batch, frames, mel_bins) and noisy.min() >= 0.0 and noisy.max() < 0.1
  scale = noisy.max(axis=(1, 2))
  assert scale.std() > 0.01  # one U(0,1) scale per example
  rolled = np.asarray(augment(jax.random.key(2), ramp, max_shift=10))
  source = np.floor(rolled).astype(int)  # noise < 0.1 never carries a frame index over
  shifts = (np.arange(frames)[None, :] - source[:, :, 0]) % frames
  assert np.all(shifts == shifts[:, :1])  # one circular shift per example
  assert np.all(source == source[:, :, :1])
  signed = np.where(shifts[:, 0] >= frames // 2, shifts[:, 0] - frames, shifts[:, 0])
  assert signed.min() == -10 and signed.max() == 9  # integers in [-10, 10)


def test_augment_needs_rng_and_is_deterministic():
  batch, lengths = clips([9000, 16000], seed=2)
  augment = dict(freq_mask=24, time_mask=20, noise=True, roll=10)
  clean = model_input(batch, lengths, AUDIO)
  np.testing.assert_array_equal(model_input(batch, lengths, AUDIO, augment=augment), clean)  # eval: no rng
  first = model_input(batch, lengths, AUDIO, augment=augment, rng=jax.random.key(5))
  again = model_input(batch, lengths, AUDIO, augment=augment, rng=jax.random.key(5))
  other = model_input(batch, lengths, AUDIO, augment=augment, rng=jax.random.key(6))
  np.testing.assert_array_equal(first, again)
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 0.05
  assert np.abs(np.asarray(first) - np.asarray(clean)).max() > 0.05


def test_model_input_jits_with_configs_closed_over():
  batch, lengths = clips([16000, 12000, 7000], seed=3)
  augment = dict(freq_mask=24, time_mask=20, noise=True, roll=10)
  step = jax.jit(lambda w, n, key: model_input(w, n, AUDIO, augment=augment, rng=key))
  jitted = step(jnp.asarray(batch), jnp.asarray(lengths), jax.random.key(7))
  eager = model_input(batch, lengths, AUDIO, augment=augment, rng=jax.random.key(7))
  assert jitted.shape == (3, 100, 128)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)


def test_roll_without_noise_is_a_circular_time_shift():
  batch, lengths = clips([16240] * 4, seed=5)
  clean = np.asarray(model_input(batch, lengths, AUDIO))
  rolled = np.asarray(model_input(batch, lengths, AUDIO, augment=dict(roll=5), rng=jax.random.key(7)))
  shifts = []
  for before, after in zip(clean, rolled):
    matches = [shift for shift in range(-5, 5) if np.array_equal(np.roll(before, shift, axis=0), after)]
    assert len(matches) == 1
    shifts.append(matches[0])
  assert len(set(shifts)) > 1  # drawn per example


def test_time_mask_width_scales_per_example():
  """ElasticAST: a clip framed at q times the shift gets a time mask 1/q as wide (the same stretch of audio)."""
  fbank = jnp.ones((4000, 60, 8))
  scale = np.tile(np.array([1.0, 0.25], np.float32), 2000)
  masked = np.asarray(jax.jit(frequency_time_mask, static_argnames=("freq_mask", "time_mask"))(
      jax.random.key(0), fbank, 0, 40, scale))
  widths = (masked[:, :, 0] == 0).sum(axis=1)
  assert widths[0::2].max() == 39 and widths[1::2].max() == 9  # floor(U * 40) and floor(U * 10)
  assert abs(widths[1::2].mean() - 4.5) < 0.3


def test_clips_framed_at_their_own_shift_match_fixed_framing_and_reject_roll():
  batch, lengths = clips([16240, 9000], seed=2)
  shifts = np.array([160, 320])  # q = 1 and q = 2
  features = np.asarray(model_input(batch, lengths, AUDIO, window_shifts=shifts, frames=100))
  assert features.shape == (2, 100, 128)
  coarse = dict(AUDIO, frame_shift=20.0)
  expected = np.asarray(model_input(batch[1:, :9000], lengths[1:], dict(coarse, target_length=100)))
  np.testing.assert_allclose(features[1], expected[0], atol=1e-4)  # 27 frames, then padding as the fixed framing's
  np.testing.assert_allclose(features[0], np.asarray(model_input(batch[:1], lengths[:1], AUDIO))[0], atol=1e-4)
  with pytest.raises(ValueError, match="roll"):
    model_input(batch, lengths, AUDIO, window_shifts=shifts, frames=100,
                augment=dict(freq_mask=0, time_mask=0, noise=False, roll=10), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="pass frames"):
    model_input(batch, lengths, AUDIO, window_shifts=shifts)
