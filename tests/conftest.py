"""Shared test setup.

Triton's interpreter is chosen when ``@triton.jit`` runs, so ``TRITON_INTERPRET`` must be set
before anything imports :mod:`glide.kernels`. On a machine with CUDA the tests exercise the
compiled kernels instead (set ``GLIDE_TEST_COMPILED=1``).
"""

import os

import torch

if not (torch.cuda.is_available() and os.environ.get("GLIDE_TEST_COMPILED") == "1"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
