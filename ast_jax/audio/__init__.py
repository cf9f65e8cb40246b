"""Audio front end: decoding, resampling, the Kaldi filterbank and the model input."""

from ast_jax.audio.augment import add_noise, add_noise_and_roll, frequency_time_mask, roll_time
from ast_jax.audio.fbank import FbankOptions, fbank_batch, kaldi_fbank
from ast_jax.audio.features import AugmentSpec, FrontEnd, clip_samples, model_input
from ast_jax.audio.io import AudioError, load_audio, remove_mean, resample

__all__ = [
    "AudioError",
    "AugmentSpec",
    "FbankOptions",
    "FrontEnd",
    "add_noise",
    "add_noise_and_roll",
    "clip_samples",
    "fbank_batch",
    "frequency_time_mask",
    "kaldi_fbank",
    "load_audio",
    "model_input",
    "remove_mean",
    "resample",
    "roll_time",
]
