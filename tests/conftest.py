"""Test-session environment: Triton on the CPU runs under its interpreter.

Set here, before any test module is collected, because Triton reads TRITON_INTERPRET once, when it
is first imported, and importing fp4.linear imports torch._dynamo (the quantized linear's custom
ops), which imports Triton. With a CUDA GPU the kernels compile and run for real.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
