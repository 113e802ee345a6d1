"""Launcher for ``compact_kv``: after verification, move the accepted tree slots of every layer's
K and V right behind each sequence's committed prefix, in one launch.

The kernel lives in :mod:`glide.kernels._jit.compact`.
"""

from __future__ import annotations

import torch

from ._dispatch import use_triton
from ._host import next_power_of_2
from ._jit.compact import compact_kv_kernel
from .reference import compact_kv_ref

__all__ = ["compact_kv"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Columns moved per step; a head_dim of 80 pads to 128 and 256 takes two steps.
_MAX_BLOCK_D = 128


def _check_index(name: str, t, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like kv, got {t.device}")


def _check_values(cache_seqlens, path_idx, path_lens, max_seq: int) -> None:
    """Range checks on the index values (one host sync)."""
    lens = cache_seqlens.long()
    n = path_lens.long()
    max_path = path_idx.shape[1]
    if bool((lens < 0).any()):
        raise ValueError("cache_seqlens must be >= 0")
    if bool(((n < 0) | (n > max_path)).any()):
        raise ValueError(f"path_lens must lie in [0, max_path={max_path}]")
    if bool((lens + n > max_seq).any()):
        raise ValueError(f"cache_seqlens + path_lens must be <= max_seq={max_seq}")
    live = torch.arange(max_path, device=path_idx.device)[None, :] < n[:, None]
    idx = path_idx.long()
    bad = live & ((idx < 0) | (lens[:, None] + idx >= max_seq))
    if bool(bad.any()):
        raise ValueError(
            f"path_idx entries before path_lens must lie in [0, max_seq - cache_seqlens) with "
            f"max_seq={max_seq}; {int(bad.sum())} do not"
        )


def compact_kv(
    kv: torch.Tensor,
    cache_seqlens: torch.Tensor,
    path_idx: torch.Tensor,
    path_lens: torch.Tensor,
    *,
    check_values: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Move each sequence's accepted tree slots right after its committed prefix, in place.

    For every stacked cache ``n``, sequence ``b``, head ``h`` and ``a < path_lens[b]``::

        kv[n, b, h, cache_seqlens[b] + a] <- kv[n, b, h, cache_seqlens[b] + path_idx[b, a]]

    All sources of a row are read before any of its slots is written, so overlapping source
    and destination slots are safe, in any order of ``path_idx``. Slots outside
    ``[cache_seqlens[b], cache_seqlens[b] + path_lens[b])`` are not touched and
    ``cache_seqlens`` is not changed.

    Parameters
    ----------
    kv : torch.Tensor, shape (num_caches, batch, num_kv_heads, max_seq, head_dim)
        float32, float16, bfloat16 or float64, any strides. Every layer's K and V stacked on
        the first axis (``cache.kv.view(L * 2, B, H, S, D)``), so one launch moves them all.
    cache_seqlens : torch.Tensor, shape (batch,), integer
    path_idx : torch.Tensor, shape (batch, max_path), integer
        Tree slots of the accepted path, in order; entries at ``a >= path_lens[b]`` are
        ignored and need not be valid.
    path_lens : torch.Tensor, shape (batch,), integer
        In ``[0, max_path]``.
    check_values : bool
        Range-check the index values (costs a host sync on CUDA). Shapes, dtypes and devices
        are always checked.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.

    Returns
    -------
    torch.Tensor
        ``kv``, modified in place.

    Raises
    ------
    ValueError
        On a bad shape or device, or (with ``check_values``) when ``path_lens > max_path``,
        ``cache_seqlens + path_lens > max_seq`` or a live ``path_idx`` entry falls outside
        ``[0, max_seq - cache_seqlens)``.
    TypeError
        On a non-tensor argument, a ``kv`` dtype outside the list above or a non-integer index.
    """
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5:
        raise ValueError(
            f"kv must have shape (num_caches, batch, num_kv_heads, max_seq, head_dim), "
            f"got {tuple(kv.shape)}"
        )
    if kv.dtype not in _DTYPES:
        raise TypeError(f"kv must be float32, float16, bfloat16 or float64, got {kv.dtype}")
    num_caches, batch, num_heads, max_seq, head_dim = kv.shape
    _check_index("cache_seqlens", cache_seqlens, (batch,), kv.device)
    _check_index("path_lens", path_lens, (batch,), kv.device)
    if not isinstance(path_idx, torch.Tensor):
        raise TypeError(f"path_idx must be a torch.Tensor, got {type(path_idx).__name__}")
    if path_idx.dim() != 2:
        raise ValueError(f"path_idx must have shape (batch={batch}, max_path), got {tuple(path_idx.shape)}")
    _check_index("path_idx", path_idx, (batch, path_idx.shape[1]), kv.device)
    if check_values:
        _check_values(cache_seqlens, path_idx, path_lens, max_seq)

    if not use_triton(kv.device, backend):
        return compact_kv_ref(kv, cache_seqlens, path_idx, path_lens)
    max_path = path_idx.shape[1]
    if kv.numel() == 0 or max_path == 0:
        return kv

    compact_kv_kernel[(num_caches * batch * num_heads,)](
        kv,
        cache_seqlens,
        path_idx,
        path_lens,
        batch,
        num_heads,
        max_path,
        *kv.stride(),
        cache_seqlens.stride(0),
        path_idx.stride(0),
        path_idx.stride(1),
        path_lens.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_A=next_power_of_2(max_path),
        BLOCK_D=min(next_power_of_2(head_dim), _MAX_BLOCK_D),
    )
    return kv
