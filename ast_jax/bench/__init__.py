"""Benchmarks: the analytic FLOP count and MFU (flops.py), step-time sweeps against PyTorch (sweep.py,
torch_ref.py, `python -m ast_jax.bench`), and their figure (plot.py)."""

from ast_jax.bench.flops import (PEAK_FLOPS, config_flops, forward_flops, mfu, peak_flops_per_device,
                                 train_flops_per_example)

__all__ = ["PEAK_FLOPS", "config_flops", "forward_flops", "mfu", "peak_flops_per_device", "train_flops_per_example"]
