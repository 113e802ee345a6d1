"""Which implementation a launcher runs: the Triton kernel or the PyTorch reference.

- CUDA tensors go to Triton.
- CPU tensors go to Triton only under ``TRITON_INTERPRET=1`` (how CI tests the kernels);
  otherwise they use the reference from :mod:`glide.kernels.reference`.

``backend`` lets a caller force one side: ``"auto"`` (the rule above), ``"triton"`` or
``"reference"``.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device, backend: str = "auto") -> bool:
    """Decide whether a launcher for tensors on ``device`` runs its Triton kernel.

    Raises
    ------
    ValueError
        If ``backend`` is not one of ``"auto"``, ``"triton"``, ``"reference"``, or if
        ``backend="triton"`` is asked for CPU tensors without the interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    runs_triton = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "triton" and not runs_triton:
        raise ValueError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; got tensors on {device}"
        )
    return runs_triton
