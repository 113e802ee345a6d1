"""Launcher for ``add_rms_norm``: the decoder's residual add and the RMSNorm after it, in one launch
(the model's add, norm and, in a half dtype, weight multiply: two or three kernels).

The kernel lives in :mod:`glide.kernels._jit.norm`.
"""

from __future__ import annotations

import numbers

import torch

from ._checks import check_float_input, check_like
from ._dispatch import use_triton
from ._host import next_power_of_2
from ._jit.norm import add_rms_norm_kernel
from .reference import add_rms_norm_ref

__all__ = ["add_rms_norm", "MAX_HIDDEN"]

#: Widest row: one program keeps a whole row in registers.
MAX_HIDDEN = 32768



def _num_warps(block_n: int) -> int:
    # About 8 to 16 elements a thread, so a 4096-wide row is not one warp's serial loop and a
    # 576-wide one does not idle most of a block. A heuristic; not timed on a GPU.
    return 4 if block_n <= 2048 else 8 if block_n <= 8192 else 16


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    out: tuple[torch.Tensor | None, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: ``h = x + delta`` and ``y = weight * h / sqrt(mean(h^2) + eps)``.

    Rounds where the model's :class:`~glide.model.llama.RMSNorm` does: ``h`` is rounded to the
    dtype, and for float16/bfloat16 the normalised row is rounded before the weight multiplies
    it in the dtype (:func:`glide.kernels.reference.add_rms_norm_ref`).

    Parameters
    ----------
    x : torch.Tensor, shape (rows, hidden)
        float32, float16 or bfloat16, any strides. The residual stream.
    delta : torch.Tensor, shape (rows, hidden), or None
        Dtype and device of ``x``, any strides. ``None`` normalises ``x`` alone.
    weight : torch.Tensor, shape (hidden,)
        Dtype of ``x``.
    eps : float
    out : tuple of (torch.Tensor or None, torch.Tensor), optional
        ``(h, y)`` to write into, each (rows, hidden), dtype and device of ``x``, any strides;
        ``h`` is not used (may be ``None``) when ``delta`` is ``None``.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.

    Returns
    -------
    h : torch.Tensor, shape (rows, hidden)
        ``x + delta`` (a new contiguous tensor, or ``out[0]``); ``x`` itself when ``delta`` is
        ``None``.
    y : torch.Tensor, shape (rows, hidden)
        The normalised ``h`` (a new contiguous tensor, or ``out[1]``), dtype of ``x``.

    Raises
    ------
    TypeError
        On a non-tensor argument, a dtype outside the list above or unlike ``x``'s (``out``
        included), or a non-real ``eps``.
    ValueError
        On a bad shape or device (``out`` included), ``hidden > MAX_HIDDEN`` (32768), or a
        negative ``eps``.
    """
    check_float_input("x", x, 2, "(rows, hidden)")
    rows, hidden = x.shape
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"x must have 1 <= hidden <= {MAX_HIDDEN} columns, got shape {tuple(x.shape)}")
    checks = [("weight", weight, (hidden,))]
    if delta is not None:
        checks.append(("delta", delta, (rows, hidden)))
    if out is not None:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"out must be an (h, y) pair of tensors, got {type(out).__name__}")
        checks.append(("out[1] (y)", out[1], (rows, hidden)))
        if delta is not None:
            checks.append(("out[0] (h)", out[0], (rows, hidden)))
    for name, t, shape in checks:
        check_like(name, t, shape, "x", x)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    if not use_triton(x.device, backend):
        h, y = add_rms_norm_ref(x, delta, weight, eps)
        if out is None:
            return h, y
        if delta is not None:
            out[0].copy_(h)
            h = out[0]
        return h, out[1].copy_(y)
    if out is None:
        y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
        h = x if delta is None else torch.empty_like(y)
    else:
        h, y = (x if delta is None else out[0]), out[1]
    if rows == 0:
        return h, y
    d = x if delta is None else delta  # a placeholder pointer when HAS_DELTA is off
    block_n = next_power_of_2(hidden)
    add_rms_norm_kernel[(rows,)](
        x,
        d,
        weight,
        h,
        y,
        hidden,
        float(eps),
        *x.stride(),
        *d.stride(),
        weight.stride(0),
        *h.stride(),
        *y.stride(),
        HAS_DELTA=delta is not None,
        HALF=x.dtype != torch.float32,
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    return h, y
