"""Shared test setup.

Triton's interpreter is chosen when ``@triton.jit`` runs, so ``TRITON_INTERPRET`` must be set
before anything imports :mod:`glide.kernels`. On a machine with CUDA the tests exercise the
compiled kernels instead (set ``GLIDE_TEST_COMPILED=1``).
"""

import atexit
import os
import shutil
import tempfile

import torch

if not (torch.cuda.is_available() and os.environ.get("GLIDE_TEST_COMPILED") == "1"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# converted model weights and measured device facts (the dynamic tree's verify-cost curve) go to
# a scratch folder shared by this session's tests and their subprocesses, not ~/.cache; it is
# removed at exit (the converted embedded model alone takes 260 MB a dtype)
if "GLIDE_CACHE_DIR" not in os.environ:
    _scratch = tempfile.mkdtemp(prefix="glide-test-cache-")
    os.environ["GLIDE_CACHE_DIR"] = _scratch
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
