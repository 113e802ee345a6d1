"""Argument checks shared by several launchers."""

from __future__ import annotations

import torch


def check_lens(name, lens, batch, device, max_seq, extra, read_values, ref="q", extra_name="tree_len"):
    """Check a (batch,) integer length tensor on ``device`` (the device of argument ``ref``) and,
    if ``read_values``, that ``0 <= lens <= max_seq - extra`` (one host sync), where ``extra``
    is the count of new tokens (``extra_name``) written after each length.

    Returns
    -------
    int
        ``max(lens)``, or ``max_seq - extra`` when the values are not read (0 for batch 0).

    Raises
    ------
    TypeError, ValueError
        Naming ``name``.
    """
    if not isinstance(lens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lens).__name__}")
    if lens.dtype == torch.bool or lens.is_floating_point() or lens.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device}, expected {ref}'s device {device}")
    if batch == 0:
        return 0
    if not read_values:
        return max_seq - extra
    lo, hi = torch.stack([lens.min(), lens.max()]).tolist()  # one host sync
    if lo < 0:
        raise ValueError(f"{name} must be non-negative, got a minimum of {lo}")
    if hi + extra > max_seq:
        what = f"{name} + {extra_name} ({hi} + {extra})" if extra else f"{name} ({hi})"
        raise ValueError(f"{what} exceeds the caches' max_seq={max_seq}")
    return int(hi)


# The dtypes the elementwise and top-k kernels take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_input(name, t, ndim, shape_text):
    """``t`` is a tensor with ``ndim`` dims (``shape_text`` describes them) of a dtype in
    :data:`FLOAT_DTYPES`.

    Raises
    ------
    TypeError, ValueError
        Naming ``name``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_like(name, t, shape, like_name, like):
    """``t`` is a tensor of ``shape`` with the dtype and device of the tensor ``like`` (the
    argument ``like_name``): an output buffer or a companion input.

    Raises
    ------
    TypeError, ValueError
        Naming ``name``.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} like {like_name}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like_name}'s device {like.device}")
