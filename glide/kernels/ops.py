"""The kernels as torch custom ops (namespace ``glide``), for ``torch.compile`` and CUDA graphs.

=====================================  =================================================
op                                     calls
=====================================  =================================================
``torch.ops.glide.tree_attention``     :func:`glide.kernels.tree_attention`, ``check_lens=False``
``torch.ops.glide.cross_attention``    :func:`glide.kernels.cross_attention`, ``check_lens=False``
``torch.ops.glide.cape_topk``          :func:`glide.kernels.cape_topk`
``torch.ops.glide.compact_kv``         :func:`glide.kernels.compact_kv`, ``check_values=False``
=====================================  =================================================

Importing this module registers the ops (``import glide.kernels.ops``; importing
``glide.kernels`` alone does not). Each op runs the public launcher on real tensors, without any host read of
the lengths, so nothing in it syncs or copies between host and device: a CUDA graph can
capture it. Each op also has a fake (meta) implementation that only allocates the outputs,
so ``torch.compile`` traces through it with ``fullgraph=True`` and keeps it as one opaque
call, where tracing into the launcher itself stops (Inductor cannot lower the launcher's
``tree_mask.view(torch.uint8)`` of a bool tensor: H100 run of commit ef05f09).

In a compiled decoder, call the op instead of the launcher::

    import glide.kernels.ops  # registers torch.ops.glide.*

    def attend(q, k_layer, v_layer, cache_seqlens, tree_mask, sm_scale):
        return torch.ops.glide.tree_attention(q, k_layer, v_layer, cache_seqlens, tree_mask,
                                              sm_scale)

    step = torch.compile(forward, fullgraph=True)                 # or mode="reduce-overhead"

The caller guarantees what ``check_lens=False`` does not check: ``0 <= cache_seqlens`` and
``cache_seqlens + tree_len <= max_seq`` (``kv_lens <= max_seq`` for cross attention); out of
range lengths read garbage. Shapes, dtypes and devices are still checked on every call.

Eager code should keep calling the launchers: an op call adds the dispatcher's round trip
(C++ dispatch, the autograd and dynamo-disable wrappers of ``torch.library.custom_op``, then
back into Python) to the launcher's own host work. ``python -m bench.launch_overhead``
measures both with the Triton launch stubbed out (SmolLM2 heads, batch 1, bf16). On the
2-core CPU dev machine (torch 2.13, CPU tensors) the launchers took 12-14 us a call (4.5 us
for compact_kv) and the ops 7-11 us more (12 us for compact_kv). On the H100 machine
(torch 2.11, CUDA tensors, a slower and noisier host; two runs) the launchers took 28-57 us
(7-12 us for compact_kv; 40-55 us and 8-10 us before the trim of the same commit series) and
the ops 20-50 us more. Under ``torch.compile`` with CUDA graphs
(``mode="reduce-overhead"``) none of this host time is paid per replay.

The ops have no autograd formula: they are for inference.
"""

from typing import Optional

import torch

from .attention import cross_attention as _cross_attention
from .attention import tree_attention as _tree_attention
from .compact import compact_kv as _compact_kv
from .topk import cape_topk as _cape_topk

__all__ = ["tree_attention", "cross_attention", "cape_topk", "compact_kv"]


@torch.library.custom_op("glide::tree_attention", mutates_args=())
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """:func:`glide.kernels.tree_attention` with ``check_lens=False``, as a custom op.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim)
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
    cache_seqlens : torch.Tensor, shape (batch,), integer
        The caller guarantees ``0 <= cache_seqlens <= max_seq - tree_len`` (not checked).
    tree_mask : torch.Tensor, shape (batch, tree_len, tree_len), bool
    sm_scale : float, optional
        Defaults to ``1 / sqrt(head_dim)``.
    num_splits : int, optional
        Force this many KV splits (benchmarks); ``None`` applies the heuristic.

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim), dtype of ``q``, contiguous
    """
    # The output is allocated here (contiguous, like the fake) so that the reference path,
    # whose result may have other strides, gives the same layout.
    out = q.new_empty(q.shape)
    return _tree_attention(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale, out=out,
                           num_splits=num_splits, check_lens=False)


@tree_attention.register_fake
def _tree_attention_fake(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale=None,
                         num_splits=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("glide::cross_attention", mutates_args=())
def cross_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_lens: torch.Tensor,
    sm_scale: Optional[float] = None,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """:func:`glide.kernels.cross_attention` with ``check_lens=False``, as a custom op.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, q_len, num_q_heads, head_dim)
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
    kv_lens : torch.Tensor, shape (batch,), integer
        The caller guarantees ``0 <= kv_lens <= max_seq`` (not checked).
    sm_scale : float, optional
    num_splits : int, optional

    Returns
    -------
    torch.Tensor, shape (batch, q_len, num_q_heads, head_dim), dtype of ``q``, contiguous
    """
    out = q.new_empty(q.shape)
    return _cross_attention(q, k_cache, v_cache, kv_lens, sm_scale, out=out,
                            num_splits=num_splits, check_lens=False)


@cross_attention.register_fake
def _cross_attention_fake(q, k_cache, v_cache, kv_lens, sm_scale=None, num_splits=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("glide::cape_topk", mutates_args=())
def cape_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`glide.kernels.cape_topk` as a custom op.

    Parameters
    ----------
    logits : torch.Tensor, shape (num_rows, vocab), float32, float16 or bfloat16
    k : int
    temperature : float

    Returns
    -------
    probs : torch.Tensor, shape (num_rows, k), float32
    ids : torch.Tensor, shape (num_rows, k), int64
    """
    return _cape_topk(logits, k, temperature)


@cape_topk.register_fake
def _cape_topk_fake(logits, k, temperature=1.0):
    rows = logits.shape[0]
    return (logits.new_empty((rows, k), dtype=torch.float32),
            logits.new_empty((rows, k), dtype=torch.int64))


@torch.library.custom_op("glide::compact_kv", mutates_args=("kv",))
def compact_kv(
    kv: torch.Tensor, cache_seqlens: torch.Tensor, path_idx: torch.Tensor, path_lens: torch.Tensor
) -> None:
    """:func:`glide.kernels.compact_kv` with ``check_values=False``, as a custom op that
    mutates ``kv`` in place and returns nothing.

    Parameters
    ----------
    kv : torch.Tensor, shape (num_caches, batch, num_kv_heads, max_seq, head_dim)
    cache_seqlens : torch.Tensor, shape (batch,), integer
    path_idx : torch.Tensor, shape (batch, max_path), integer
    path_lens : torch.Tensor, shape (batch,), integer
        The caller guarantees the ranges that ``check_values`` would check.
    """
    _compact_kv(kv, cache_seqlens, path_idx, path_lens, check_values=False)


@compact_kv.register_fake
def _compact_kv_fake(kv, cache_seqlens, path_idx, path_lens):
    return None
