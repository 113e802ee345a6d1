"""Launcher for ``silu_mul``: SwiGLU's ``silu(gate) * up`` on the fused gate/up projection, in one
launch (the chunk, ``silu`` and the product were two kernels).

The kernel lives in :mod:`glide.kernels._jit.activation`.
"""

from __future__ import annotations

import torch

from ._checks import check_float_input, check_like
from ._dispatch import use_triton
from ._host import cdiv, next_power_of_2
from ._jit.activation import silu_mul_kernel
from .reference import silu_mul_ref

__all__ = ["silu_mul"]

# Columns of the output a program writes. Not timed on a GPU.
_BLOCK_I = 1024


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` with ``gate, up = gate_up.chunk(2, dim=-1)``.

    ``silu(gate)`` is rounded to the dtype before the product, as the model's
    ``F.silu(gate) * up`` (:func:`glide.kernels.reference.silu_mul_ref`).

    Parameters
    ----------
    gate_up : torch.Tensor, shape (rows, 2 * intermediate)
        float32, float16 or bfloat16, any strides.
    out : torch.Tensor, shape (rows, intermediate), optional
        Where to write, dtype and device of ``gate_up``, any strides.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.

    Returns
    -------
    torch.Tensor, shape (rows, intermediate)
        A new contiguous tensor, or ``out``; dtype of ``gate_up``.

    Raises
    ------
    TypeError
        On a non-tensor, a dtype outside the list above or an ``out`` dtype unlike it.
    ValueError
        On a shape that is not 2-D with an even, non-zero number of columns, or a bad ``out``
        shape or device.
    """
    shape_text = "(rows, 2 * intermediate) with intermediate >= 1"
    check_float_input("gate_up", gate_up, 2, shape_text)
    if gate_up.shape[1] == 0 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have shape {shape_text}, got {tuple(gate_up.shape)}")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is not None:
        check_like("out", out, (rows, inter), "gate_up", gate_up)
    if not use_triton(gate_up.device, backend):
        y = silu_mul_ref(gate_up)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    block_i = min(_BLOCK_I, next_power_of_2(inter))
    silu_mul_kernel[(rows, cdiv(inter, block_i))](
        gate_up,
        out,
        inter,
        *gate_up.stride(),
        *out.stride(),
        BLOCK_I=block_i,
    )
    return out
