"""Diagnostics: quantization-error metrics of every GEMM (metrics.py), the fp4 probe callback that
computes them (collect.py), which errors are comparable across steps and the windows that measure
their consistency (consistency.py), `fp4-ablate diagnose` (diagnose.py), the in-training hook writing
diagnostics.jsonl (training.py) and its summary in `fp4-ablate report` (summary.py)."""
