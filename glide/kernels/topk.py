"""Launcher for the fused CaPE top-k: top-k of ``softmax(logits / temperature)`` in one pass.

The kernels live in :mod:`glide.kernels._jit.topk`; this module validates, allocates and picks
the split of the vocabulary into chunks.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._checks import check_float_input
from ._dispatch import use_triton
from ._host import cdiv, next_power_of_2
from ._jit.topk import topk_merge_kernel, topk_partial_kernel
from .reference import cape_topk_ref

__all__ = ["cape_topk", "MAX_K"]

#: Largest supported ``k``: each program keeps ``next_pow2(k)`` int64 keys in registers and
#: the merge sorts ``num_chunks * next_pow2(k)`` of them; trees use far fewer.
MAX_K = 64

# Tile of logits a program reads per step. Not tuned on a GPU yet: 1024 keeps the bitonic
# top-k of one tile (10 stages of 1024 int64 keys) small next to its 4 KiB of loads.
_BLOCK_V = 1024
# Aim for about four programs per SM on a 132-SM H100 so that a single row of a 152k vocab
# still spreads over the whole card; the cap keeps the merge's candidate list <= 4096 keys.
_TARGET_PROGRAMS = 512
_MAX_CHUNKS = 64


def _chunking(num_rows: int, vocab: int, k_pad: int) -> tuple[int, int, int]:
    """Return ``(block_v, tiles_per_chunk, num_chunks)`` for a ``(num_rows, vocab)`` input."""
    block_v = max(min(_BLOCK_V, next_power_of_2(vocab)), k_pad)
    num_tiles = cdiv(vocab, block_v)
    wanted = max(1, min(_MAX_CHUNKS, cdiv(_TARGET_PROGRAMS, num_rows), num_tiles))
    tiles_per_chunk = cdiv(num_tiles, wanted)
    return block_v, tiles_per_chunk, cdiv(num_tiles, tiles_per_chunk)


def _check_out(out, num_rows: int, k: int, device: torch.device):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"out must be a (probs, ids) pair of tensors, got {type(out).__name__}")
    probs, ids = out
    for name, t, dtype in (("out[0] (probs)", probs, torch.float32), ("out[1] (ids)", ids, torch.int64)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (num_rows, k):
            raise ValueError(f"{name} must have shape {(num_rows, k)}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like logits, got {t.device}")
    return probs, ids


def cape_topk(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` probabilities of ``softmax(logits / temperature)`` and their token ids.

    One pass over the logits: every program keeps an online max, an online normaliser and a
    running top-k of its slice of the vocabulary, and a second small kernel merges the slices
    by log-sum-exp. The full softmax is never written.

    Parameters
    ----------
    logits : torch.Tensor, shape (num_rows, vocab), float32, float16 or bfloat16
        Any strides. ``-inf`` entries (a masked vocabulary) get probability 0; a row that is
        all ``-inf`` has no softmax and yields NaN probabilities. NaN logits are not supported.
    k : int
        ``1 <= k <= min(MAX_K, vocab)`` with ``MAX_K = 64``.
    temperature : float
        Finite and positive.
    out : tuple of torch.Tensor, optional
        ``(probs, ids)`` to write into, shapes ``(num_rows, k)``, float32 and int64, on the
        device of ``logits``.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.

    Returns
    -------
    probs : torch.Tensor, shape (num_rows, k), float32
        Sorted descending; ``probs[:, 0]`` is CaPE's confidence.
    ids : torch.Tensor, shape (num_rows, k), int64
        Token ids of ``probs``. Among equal logits the smaller id comes first.
    """
    check_float_input("logits", logits, 2, "(num_rows, vocab)")
    num_rows, vocab = logits.shape
    if vocab == 0 or vocab >= 2**31:
        raise ValueError(f"logits must have 1 <= vocab < 2**31 columns, got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= min(MAX_K, vocab):
        raise ValueError(f"k must be in [1, {min(MAX_K, vocab)}] (MAX_K={MAX_K}, vocab={vocab}), got {k}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")

    if out is None:
        probs = torch.empty((num_rows, k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((num_rows, k), dtype=torch.int64, device=logits.device)
    else:
        probs, ids = _check_out(out, num_rows, k, logits.device)

    if not use_triton(logits.device, backend):
        ref_probs, ref_ids = cape_topk_ref(logits, k, temperature)
        probs.copy_(ref_probs)
        ids.copy_(ref_ids)
        return probs, ids
    if num_rows == 0:
        return probs, ids

    k_pad = next_power_of_2(k)
    block_v, tiles_per_chunk, num_chunks = _chunking(num_rows, vocab, k_pad)
    dev = logits.device
    part_max = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=dev)
    part_sum = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=dev)
    part_keys = torch.empty((num_rows, num_chunks, k_pad), dtype=torch.int64, device=dev)

    topk_partial_kernel[(num_rows, num_chunks)](
        logits,
        part_max,
        part_sum,
        part_keys,
        vocab,
        temperature,
        tiles_per_chunk,
        logits.stride(0),
        logits.stride(1),
        part_max.stride(0),
        part_max.stride(1),
        part_keys.stride(0),
        part_keys.stride(1),
        part_keys.stride(2),
        K_PAD=k_pad,
        BLOCK_V=block_v,
    )
    topk_merge_kernel[(num_rows,)](
        part_max,
        part_sum,
        part_keys,
        probs,
        ids,
        num_chunks,
        k,
        temperature,
        part_max.stride(0),
        part_max.stride(1),
        part_keys.stride(0),
        part_keys.stride(1),
        part_keys.stride(2),
        probs.stride(0),
        probs.stride(1),
        ids.stride(0),
        ids.stride(1),
        K_PAD=k_pad,
        CHUNKS_PAD=next_power_of_2(num_chunks),
    )
    return probs, ids
