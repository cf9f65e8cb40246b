"""Benchmarks: step-time sweeps against PyTorch (`python -m ast_jax.bench`: cases.py, torch_ref.py), their figure
(plot.py) and ElasticAST packed rows against an AST padded to the longest clip (packed_vs_padded.py). FLOP counts
live with the models (models/flops.py), device peaks and MFU with the trainer's throughput (train/throughput.py)."""
