"""Shared test setup.

Triton's interpreter is chosen when ``@triton.jit`` runs, so ``TRITON_INTERPRET`` must be set
before anything imports :mod:`glide.kernels`. On a machine with CUDA the tests exercise the
compiled kernels instead (set ``GLIDE_TEST_COMPILED=1``).
"""

import os
import tempfile

import torch

if not (torch.cuda.is_available() and os.environ.get("GLIDE_TEST_COMPILED") == "1"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# measured device facts (the dynamic tree's verify-cost curve) go to a scratch folder, not ~/.cache
os.environ.setdefault("GLIDE_CACHE_DIR", tempfile.mkdtemp(prefix="glide-test-cache-"))
