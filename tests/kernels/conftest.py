"""Kernel tests run the real Triton kernels: natively on a CUDA device, else through Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (``@triton.jit`` picks the interpreter at
decoration time), so it is set here, at collection, and only when no GPU is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
