"""Diagnostics: quantization-error metrics of every GEMM (metrics.py), the fp4 probe callback that
computes them (collect.py), `fp4-ablate diagnose` (diagnose.py), the in-training hook writing
diagnostics.jsonl (training.py) and its summary in `fp4-ablate report` (summary.py)."""
