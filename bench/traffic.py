"""Bytes each kernel must move: the numerator of achieved GB/s.

These count the algorithmic minimum traffic to and from device memory, the same for every
implementation of a kernel, so that GB/s compares implementations on one scale:

- ``tree_attention``: read ``q``; read K and V for the ``prefix + T`` positions each KV head
  sees; write ``out``; read the ``(B, T, T)`` bool mask (one byte an element).
- ``cross_attention``: read ``q``; read K and V for ``kv_len`` positions per KV head; write
  ``out``.
- ``cape_topk``: read the logits; write ``k`` float32 probabilities and ``k`` int64 ids per row.
- ``compact_kv``: every accepted row is read once and written once (``x2``), for each stacked
  cache and KV head.

The small integer side inputs (``cache_seqlens``, ``kv_lens``, ``path_idx``) are left out: a
few bytes a sequence against kilobytes a head.
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "tree_attention_bytes",
    "cross_attention_bytes",
    "cape_topk_bytes",
    "compact_kv_bytes",
]


def _check_lens(name: str, lens: Sequence[int], batch: int) -> None:
    if len(lens) != batch:
        raise ValueError(f"{name} must hold one length per sequence ({batch}), got {len(lens)}")


def tree_attention_bytes(
    batch: int,
    tree_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    prefix_lens: Sequence[int],
    elem_size: int,
) -> int:
    """Bytes ``tree_attention`` must move.

    Parameters
    ----------
    batch, tree_len, num_q_heads, num_kv_heads, head_dim : int
        ``q`` is ``(batch, tree_len, num_q_heads, head_dim)``.
    prefix_lens : sequence of int, length batch
        ``cache_seqlens``: each sequence reads ``prefix_lens[b] + tree_len`` K/V positions.
    elem_size : int
        Bytes per element of ``q``, K, V and ``out``.
    """
    _check_lens("prefix_lens", prefix_lens, batch)
    q = batch * tree_len * num_q_heads * head_dim * elem_size
    kv_rows = sum(int(p) + tree_len for p in prefix_lens)
    kv = 2 * kv_rows * num_kv_heads * head_dim * elem_size
    mask = batch * tree_len * tree_len  # torch.bool is one byte
    return q + kv + q + mask  # out has the shape of q


def cross_attention_bytes(
    batch: int,
    q_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    kv_lens: Sequence[int],
    elem_size: int,
) -> int:
    """Bytes ``cross_attention`` must move: ``q``, K/V for ``kv_lens[b]`` positions, ``out``."""
    _check_lens("kv_lens", kv_lens, batch)
    q = batch * q_len * num_q_heads * head_dim * elem_size
    kv = 2 * sum(int(n) for n in kv_lens) * num_kv_heads * head_dim * elem_size
    return q + kv + q


def cape_topk_bytes(num_rows: int, vocab: int, k: int, elem_size: int) -> int:
    """Bytes ``cape_topk`` must move: the logits in, ``k`` float32 probs and int64 ids out."""
    return num_rows * vocab * elem_size + num_rows * k * (4 + 8)


def compact_kv_bytes(
    num_caches: int, num_kv_heads: int, head_dim: int, path_lens: Sequence[int], elem_size: int
) -> int:
    """Bytes ``compact_kv`` must move: each accepted row read once and written once."""
    rows = sum(int(n) for n in path_lens)
    return 2 * num_caches * rows * num_kv_heads * head_dim * elem_size
