"""Plain PyTorch references for every kernel in :mod:`glide.kernels`.

This is the only copy of each reference. The tests compare the Triton kernels against these
functions (with float64 inputs), the benchmarks time them as the baseline, and the launchers
call them as the fallback for CPU tensors when Triton's interpreter is off.

The references do no input validation: the public launchers own every check.
Arithmetic runs in float64 for float64 inputs and in float32 otherwise, except in the decoder's
elementwise references (:func:`rotate_half_rope`, :func:`rope_store_ref`, :func:`rms_norm_ref`,
:func:`add_rms_norm_ref`, :func:`silu_mul_ref`): they round where the model rounds, because
they are the runner's own CPU code (:mod:`glide.model.llama` calls them, and for
``rope_store_ref`` its two parts, :func:`rotate_half_rope` and :func:`store_kv`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "tree_visibility",
    "masked_attention",
    "visibility_bias",
    "tree_attention_ref",
    "cross_attention_ref",
    "cape_topk_ref",
    "compact_kv_ref",
    "rotate_half_rope",
    "rope_store_ref",
    "kv_slots",
    "store_kv",
    "rms_norm_ref",
    "add_rms_norm_ref",
    "silu_mul_ref",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention(q, k_cache, v_cache, allowed, sm_scale=None):
    """Attention of ``q`` over the first ``S`` cache positions, those ``allowed`` for each query.

    q: (B, T, Hq, D); k_cache, v_cache: (B, Hkv, S_max, D); allowed: (B, T, S) bool, from
    :func:`tree_visibility` for tree attention (a runner builds it once for all its layers), or
    an int ``S >= 1`` when every query sees all of the first ``S`` positions (a decode step over
    sequences of one length: no mask to build, apply or check for empty rows), or a (B, T, S)
    additive mask in the compute dtype (0 where allowed, -inf elsewhere) whose every row
    allows some key (:func:`visibility_bias`; no empty-row check, and SDPA takes it as is:
    ~20% faster than the bool mask for a 29-node tree over 400 positions, the same result).
    Query head ``h`` reads KV head ``h // (Hq // Hkv)``. A query row with no allowed key
    returns zeros. This is also the CPU fallback of the runner, hence SDPA (one fused call,
    ~9x faster than einsum + softmax at decode shapes on the 2-core CPU) rather than spelled-out
    matmuls; it runs in float64 for float64 inputs and in float32 otherwise.
    """
    D = q.shape[-1]
    dense = isinstance(allowed, torch.Tensor)
    S = allowed.shape[-1] if dense else allowed
    cdt = _compute_dtype(q.dtype)
    if dense and allowed.dtype != torch.bool and allowed.dtype != cdt:
        raise ValueError(f"allowed: an additive mask must be {cdt} for {q.dtype} queries, got {allowed.dtype}")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    k = k_cache[:, :, :S].to(cdt)
    v = v_cache[:, :, :S].to(cdt)
    out = F.scaled_dot_product_attention(
        q.to(cdt).transpose(1, 2), k, v, attn_mask=allowed[:, None] if dense else None,
        scale=scale, enable_gqa=True,
    )  # (B, Hq, T, D)
    if dense and allowed.dtype == torch.bool:
        seen = allowed.any(-1)[:, None, :, None]  # SDPA gives NaN for a row with no allowed key
        out = torch.where(seen, out, torch.zeros((), dtype=cdt, device=q.device))
    return out.transpose(1, 2).to(q.dtype)


def tree_attention_ref(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale=None):
    """Tree-masked verification attention (reference).

    Node ``i`` of sequence ``b`` attends to every prefix position ``s < cache_seqlens[b]`` and to
    tree position ``cache_seqlens[b] + j`` exactly when ``tree_mask[b, i, j]`` is true.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim)
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
        The K/V of tree node ``j`` sits at position ``cache_seqlens[b] + j``.
    cache_seqlens : torch.Tensor, shape (batch,), integer
    tree_mask : torch.Tensor, shape (batch, tree_len, tree_len), bool
    sm_scale : float, optional
        Defaults to ``1 / sqrt(head_dim)``.

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim), dtype of ``q``
    """
    return masked_attention(q, k_cache, v_cache, tree_visibility(cache_seqlens, tree_mask), sm_scale)


def visibility_bias(allowed: torch.Tensor, dtype: torch.dtype):
    """``allowed`` (bool, shape (B, T, S)) as :func:`masked_attention`'s additive mask, or
    ``None`` when some row allows no key (that row needs the bool mask's zero output).

    Parameters
    ----------
    allowed : torch.Tensor, shape (batch, tree_len, S), bool
    dtype : torch.dtype
        The attention's compute dtype (float32 for half inputs, see :func:`masked_attention`).

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, S), ``dtype``, or None
        0 where allowed, -inf elsewhere. Reads one flag on the host.
    """
    if not bool(allowed.any(-1).all()):
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def tree_visibility(cache_seqlens, tree_mask):
    """Which cache positions each tree node sees, as a dense mask (reference only).

    Parameters
    ----------
    cache_seqlens : torch.Tensor, shape (batch,), integer
    tree_mask : torch.Tensor, shape (batch, tree_len, tree_len), bool

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, max(cache_seqlens) + tree_len), bool
        ``[b, i, s]``: ``s < cache_seqlens[b]``, or ``s = cache_seqlens[b] + j`` with
        ``tree_mask[b, i, j]``.
    """
    B, T = tree_mask.shape[:2]
    dev = tree_mask.device
    lens = cache_seqlens.to(device=dev, dtype=torch.long)
    S = int(lens.max()) + T  # host sync: acceptable in a reference
    pos = torch.arange(S, device=dev)
    rel = pos[None, :] - lens[:, None]  # (B, S): tree index of each position
    in_prefix = rel < 0
    in_tree = (rel >= 0) & (rel < T)
    tm = torch.gather(tree_mask.to(torch.bool), 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return in_prefix[:, None, :] | (in_tree[:, None, :] & tm)


def cross_attention_ref(q, k_cache, v_cache, kv_lens, sm_scale=None):
    """Cross-attention from draft queries into a target KV cache (reference).

    Every query of sequence ``b`` attends to positions ``[0, kv_lens[b])``; a sequence with
    ``kv_lens[b] == 0`` gets zeros.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, q_len, num_q_heads, head_dim)
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
    kv_lens : torch.Tensor, shape (batch,), integer
    sm_scale : float, optional

    Returns
    -------
    torch.Tensor, shape (batch, q_len, num_q_heads, head_dim), dtype of ``q``
    """
    B, Tq = q.shape[:2]
    lens = kv_lens.to(device=q.device, dtype=torch.long)
    S = max(int(lens.max()), 1)
    pos = torch.arange(S, device=q.device)
    allowed = (pos[None, :] < lens[:, None])[:, None, :].expand(B, Tq, S)
    return masked_attention(q, k_cache, v_cache, allowed, sm_scale)


def cape_topk_ref(logits, k, temperature=1.0):
    """Top-k of ``softmax(logits / temperature)``, sorted descending (reference).

    Parameters
    ----------
    logits : torch.Tensor, shape (num_rows, vocab)
    k : int
    temperature : float

    Returns
    -------
    probs : torch.Tensor, shape (num_rows, k), float32 (float64 for float64 input)
        ``probs[:, 0]`` is CaPE's confidence.
    ids : torch.Tensor, shape (num_rows, k), int64
    """
    cdt = _compute_dtype(logits.dtype)
    probs = torch.softmax(logits.to(cdt) / float(temperature), dim=-1)
    top, ids = torch.topk(probs, k, dim=-1, largest=True, sorted=True)
    return top, ids.to(torch.int64)


def compact_kv_ref(kv, cache_seqlens, path_idx, path_lens):
    """Move each sequence's accepted tree slots right after its committed prefix (reference).

    For every stacked cache ``n``, sequence ``b``, head ``h`` and ``a < path_lens[b]``::

        kv[n, b, h, cache_seqlens[b] + a] <- kv[n, b, h, cache_seqlens[b] + path_idx[b, a]]

    All sources are read before any destination is written, so overlap is safe. Works in place
    and returns ``kv``. ``cache_seqlens`` is not changed.

    Parameters
    ----------
    kv : torch.Tensor, shape (num_caches, batch, num_kv_heads, max_seq, head_dim)
        Every layer's K and V stacked on the first axis, so one call moves them all.
    cache_seqlens : torch.Tensor, shape (batch,), integer
    path_idx : torch.Tensor, shape (batch, max_path), integer
        Tree slot indices of the accepted path, in order; entries past ``path_lens[b]`` are
        ignored.
    path_lens : torch.Tensor, shape (batch,), integer

    Returns
    -------
    torch.Tensor
        ``kv``, modified in place.
    """
    B, A = path_idx.shape
    dev = kv.device
    lens = cache_seqlens.to(device=dev, dtype=torch.long)
    n = path_lens.to(device=dev, dtype=torch.long)
    ar = torch.arange(A, device=dev)
    live = ar[None, :] < n[:, None]  # (B, A)
    src = lens[:, None] + path_idx.to(device=dev, dtype=torch.long)
    dst = lens[:, None] + ar[None, :]
    src = torch.where(live, src, dst)  # dead entries copy a slot onto itself
    b_idx = torch.arange(B, device=dev)[:, None].expand(B, A)
    moved = kv[:, b_idx, :, src]  # (N, B, A, H, D); advanced indexing copies
    kv[:, b_idx, :, dst] = moved
    return kv


def rotate_half_rope(x, cos, sin):
    """Rotate-half RoPE with a signed ``sin`` table, out of place (reference; the model's RoPE).

    ``sin`` has its first half negated, so that ``rotate_half(x) * sin`` (transformers) equals
    ``roll(x, D/2) * sin``: one ``addcmul`` instead of slice, negate and concatenate. Runs in
    the input dtype, as the model does: ``x * cos`` is rounded before the sum.

    Parameters
    ----------
    x : torch.Tensor, shape (..., head_dim)
    cos, sin : torch.Tensor
        Broadcast to ``x``.

    Returns
    -------
    torch.Tensor, shape of ``x``
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def rope_store_ref(qkv, cos, sin, kv_layer, lens):
    """RoPE on the query and key heads of a fused projection, K/V into the cache (reference).

    What the runner's decoder layer does with :func:`rotate_half_rope` and its indexed K/V
    write: query heads are rotated in place; for token ``t`` of sequence ``b`` the rotated key
    heads go to ``kv_layer[0, b, :, lens[b] + t]`` and the value heads, unrotated, to
    ``kv_layer[1, b, :, lens[b] + t]``. ``qkv``'s key and value heads are left as they are.

    Parameters
    ----------
    qkv : torch.Tensor, shape (batch, T, num_q_heads + 2 * num_kv_heads, head_dim)
    cos, sin : torch.Tensor, shape (batch, T, head_dim)
        The RoPE tables at each token's position, ``sin`` signed (:func:`rotate_half_rope`).
    kv_layer : torch.Tensor, shape (2, batch, num_kv_heads, max_seq, head_dim)
    lens : torch.Tensor, shape (batch,), integer

    Returns
    -------
    torch.Tensor
        ``qkv``, its query heads rotated in place.
    """
    B, T, H, _ = qkv.shape
    Hkv = kv_layer.shape[2]
    Hq = H - 2 * Hkv
    cos, sin = cos[:, :, None], sin[:, :, None]
    q = qkv[:, :, :Hq]
    q.copy_(rotate_half_rope(q, cos, sin))
    k = rotate_half_rope(qkv[:, :, Hq:Hq + Hkv], cos, sin)
    kv = torch.stack((k, qkv[:, :, Hq + Hkv:]), dim=2)  # (B, T, 2, Hkv, D)
    store_kv(kv_layer, kv, kv_slots(lens, B, T, kv_layer.device))
    return qkv


def kv_slots(lens, batch, T, device):
    """Where token ``j`` of sequence ``b`` goes in a cache: ``(b, lens[b] + j)``, as two
    (batch, T) index tensors for :func:`store_kv` (a runner makes them once per forward)."""
    write_pos = lens.to(device=device, dtype=torch.long)[:, None] + torch.arange(T, device=device)
    return torch.arange(batch, device=device)[:, None].expand(batch, T), write_pos


def store_kv(kv_layer, kv, slots):
    """Write ``kv`` (batch, T, 2, kv_heads, head_dim) into ``kv_layer`` (2, batch, kv_heads,
    max_seq, head_dim) at ``slots`` from :func:`kv_slots`: one indexed write, no host sync."""
    b_idx, write_pos = slots
    # Advanced indices on dims 1 and 3 put (B, T) first: the slot is (B, T, 2, Hkv, D).
    kv_layer[:, b_idx, :, write_pos] = kv


def rms_norm_ref(x, weight, eps):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis (reference; the model's RMSNorm).

    For float16 and bfloat16 ``x`` it normalises in float32, rounds to the dtype, then
    multiplies by ``weight`` in the dtype, as transformers' ``LlamaRMSNorm`` does
    (``F.rms_norm`` without a weight is bit-identical to its ``x.float() ... .to(dtype)``,
    without those two copies). Other dtypes normalise and scale in their own precision.

    Parameters
    ----------
    x : torch.Tensor, shape (..., hidden)
    weight : torch.Tensor, shape (hidden,)
    eps : float

    Returns
    -------
    torch.Tensor, shape and dtype of ``x``
    """
    if x.dtype in _HALF_DTYPES:
        return weight * F.rms_norm(x, weight.shape, eps=eps)
    return F.rms_norm(x, weight.shape, weight, eps=eps)


def add_rms_norm_ref(x, delta, weight, eps):
    """Residual add then RMSNorm (reference): ``h = x + delta``, ``y = rms_norm_ref(h)``.

    Parameters
    ----------
    x : torch.Tensor, shape (..., hidden)
        The residual stream.
    delta : torch.Tensor, shape of ``x``, or None
        The update to add; ``None`` normalises ``x`` itself (then ``h`` is ``x``).
    weight : torch.Tensor, shape (hidden,)
    eps : float

    Returns
    -------
    h : torch.Tensor, shape and dtype of ``x``
        ``x + delta``, rounded to the dtype (the new residual stream).
    y : torch.Tensor, shape and dtype of ``x``
        :func:`rms_norm_ref` of ``h``.
    """
    h = x if delta is None else x + delta
    return h, rms_norm_ref(h, weight, eps)


def silu_mul_ref(gate_up):
    """SwiGLU's activation ``silu(gate) * up`` of a fused gate/up projection (reference).

    ``silu(gate)`` is rounded to the input dtype before the product, as the model's
    ``F.silu(gate) * up`` does.

    Parameters
    ----------
    gate_up : torch.Tensor, shape (..., 2 * intermediate)
        ``gate`` is the first half of the last axis, ``up`` the second.

    Returns
    -------
    torch.Tensor, shape (..., intermediate), dtype of ``gate_up``
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
