"""Decoding: integer and float formats, down-mix, resampling to 16 kHz, and errors that name the file."""

import os

import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio import AudioError, load_audio, remove_mean
from ast_jax.audio.io import FILE_KINDS

RECORDINGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fsdd", "recordings")


@pytest.mark.parametrize("subtype,scale", [("PCM_16", 2**15), ("PCM_24", 2**23), ("PCM_32", 2**31),
                                           ("FLOAT", None), ("DOUBLE", None)])
def test_integer_and_float_formats_scale_to_unit_range(tmp_path, subtype, scale):
  samples = np.array([0.0, 0.5, -0.5, 0.25, -1.0, 0.999], np.float64)
  path = str(tmp_path / f"x_{subtype}.wav")
  sf.write(path, np.tile(samples, 100), 16000, subtype=subtype)
  waveform = load_audio(path)
  assert waveform.dtype == np.float32
  tolerance = 1.0 / scale if scale else 1e-7
  np.testing.assert_allclose(waveform[:6], samples, atol=tolerance)


def test_stereo_is_averaged_to_mono(tmp_path):
  left = np.full(1600, 0.5, np.float32)
  right = np.full(1600, -0.1, np.float32)
  sf.write(str(tmp_path / "stereo.flac"), np.stack([left, right], axis=1), 16000, subtype="PCM_24")
  np.testing.assert_allclose(load_audio(str(tmp_path / "stereo.flac")), 0.2, atol=1e-5)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_is_resampled_to_16k_keeping_pitch_and_duration(tmp_path, rate):
  seconds, frequency = 1.0, 440.0
  time = np.arange(int(seconds * rate)) / rate
  sf.write(str(tmp_path / "tone.wav"), 0.5 * np.sin(2 * np.pi * frequency * time), rate)
  waveform = load_audio(str(tmp_path / "tone.wav"))
  assert abs(len(waveform) - 16000) <= 1
  spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
  assert abs(np.argmax(spectrum) * 16000 / len(waveform) - frequency) <= 1.0


def test_remove_mean():
  assert abs(remove_mean(np.array([1.0, 2.0, 3.0], np.float32)).mean()) < 1e-7


def test_errors_name_the_file_and_the_problem(tmp_path):
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(200)))
  sf.write(str(tmp_path / "silent.wav"), np.zeros(800, np.float32), 16000)
  sf.write(str(tmp_path / "nan.wav"), np.array([0.1, np.nan, 0.2] * 100, np.float32), 16000, subtype="FLOAT")
  sf.write(str(tmp_path / "stereo44k.wav"), np.zeros((441, 2), np.float32) + 0.1, 44100)
  sf.write(str(tmp_path / "no_samples.wav"), np.zeros(0, np.float32), 16000)
  cases = [
      ("missing.wav", {}, "not found", "file not found"),
      ("empty.wav", {}, "empty", "empty file"),
      ("corrupt.wav", {}, "cannot decode", "not audio"),
      ("no_samples.wav", {}, "no audio samples", "too short"),
      ("nan.wav", {}, "NaN", "non-finite samples"),
      ("silent.wav", {"reject_silent": True}, "silent", "silent"),
      ("stereo44k.wav", {"expected_sample_rate": 16000}, "44100 Hz, expected 16000", "sample rate"),
      ("stereo44k.wav", {"expected_channels": 1}, "2 channels, expected 1", "too many channels"),
  ]
  for name, options, problem, kind in cases:
    with pytest.raises(AudioError, match=problem) as error:
      load_audio(str(tmp_path / name), **options)
    assert name in str(error.value) and error.value.path.endswith(name)
    assert error.value.kind == kind and kind in FILE_KINDS
  assert len(load_audio(str(tmp_path / "silent.wav"))) == 800  # silence is audio unless the caller rejects it


@pytest.mark.skipif(not os.path.isdir(RECORDINGS), reason="FSDD not available")
def test_eight_bit_pcm_decodes_like_sixteen_bit(tmp_path):
  """8-bit WAV is unsigned (silence = 128): an 8-bit copy of a real recording decodes to its waveform within one
  8-bit step (a sample read without removing the offset would be off by about 1)."""
  original = os.path.join(RECORDINGS, "7_jackson_32.wav")
  samples, rate = sf.read(original, dtype="int16")
  path = str(tmp_path / "eight_bit.wav")
  sf.write(path, samples, rate, subtype="PCM_U8")
  assert sf.info(path).subtype == "PCM_U8"
  sixteen, eight = load_audio(original, rate), load_audio(path, rate)
  assert eight.shape == sixteen.shape and np.abs(sixteen).max() > 0.1
  np.testing.assert_allclose(eight, sixteen, rtol=0, atol=1 / 128)
