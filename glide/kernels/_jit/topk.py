"""Device code for :func:`glide.kernels.cape_topk`: top-k of a tempered softmax in one pass.

The vocabulary of a row is split into chunks, one program each. A program streams its chunk
tile by tile and keeps three running quantities:

- ``m``: the largest scaled logit ``s = x / temperature`` seen so far;
- ``l = sum exp(s - m)``, rescaled by ``exp(m_old - m_new)`` whenever ``m`` grows;
- the ``K_PAD`` best entries, as packed 64-bit keys (below).

A merge program per row then combines the chunks by log-sum-exp,
``M = max_c m_c`` and ``L = sum_c l_c exp(m_c - M)``, picks the global top ``k`` from the
``num_chunks * K_PAD`` candidates and writes ``p = exp(x / temperature - M) / L`` for each.
The full softmax never exists in memory.

Packed keys: a float32 logit's bits ``b`` (as int32) become the order-preserving integer
``b`` for ``b >= 0`` and ``b ^ 0x7FFFFFFF`` otherwise. The key is that integer in the high 32
bits and ``0x7FFFFFFF - id`` in the low 32 bits, so one int64 max finds a value and its id
together, keys are unique, and equal logits rank the smaller id first. Temperature is positive, so
ranking raw logits ranks the scaled ones.
"""

import triton
import triton.language as tl

# Below the key of every float32 but a negative NaN: marks slots past the end of the vocab.
SENTINEL_KEY = tl.constexpr(-(2**63))


@triton.jit
def _pack_keys(x, ids):
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    hi = (keys >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    lo = keys - (hi.to(tl.int64) << 32)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - lo


@triton.jit
def _insert_top(best, keys, K_PAD: tl.constexpr):
    """Merge a tile's ``keys`` into the running ``best`` (``K_PAD`` unique keys, unsorted).

    Only keys above the current floor (``min(best)``) can enter, and at most ``K_PAD`` of them
    do, so once the running top-k has settled a tile costs a compare and a count. Each round
    moves the largest remaining candidate in place of the floor if it beats it.
    """
    above = keys > tl.min(best, axis=0)
    rounds = tl.minimum(tl.sum(above.to(tl.int32), axis=0), K_PAD)
    cand = tl.where(above, keys, SENTINEL_KEY)
    for _ in range(0, rounds):
        top = tl.max(cand, axis=0)
        floor = tl.min(best, axis=0)
        best = tl.where((best == floor) & (top > floor), top, best)
        cand = tl.where(cand == top, SENTINEL_KEY, cand)
    return best


@triton.jit
def topk_partial_kernel(
    logits_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_keys_ptr,
    vocab,
    temperature,
    tiles_per_chunk,
    stride_ln,
    stride_lv,
    stride_mn,
    stride_mc,
    stride_kn,
    stride_kc,
    stride_kk,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Running max, sum-exp and top ``K_PAD`` keys of one chunk of one row.

    Grid ``(num_rows, num_chunks)``; chunk ``c`` covers tiles
    ``[c * tiles_per_chunk, (c + 1) * tiles_per_chunk)`` of ``BLOCK_V`` logits each.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_V)
    row_ptr = logits_ptr + pid_n * stride_ln

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    # Distinct placeholders, all below any real key, so the floor of `best` is always unique.
    best = SENTINEL_KEY + tl.arange(0, K_PAD).to(tl.int64)
    for t in range(0, tiles_per_chunk):
        ids = (pid_c * tiles_per_chunk + t) * BLOCK_V + offs_v
        in_vocab = ids < vocab
        x = tl.load(row_ptr + ids * stride_lv, mask=in_vocab, other=float("-inf")).to(tl.float32)
        s = x / temperature
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # A chunk that has seen only -inf keeps l = 0; shifting by 0 avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
        m = m_new

        best = _insert_top(best, tl.where(in_vocab, _pack_keys(x, ids), SENTINEL_KEY), K_PAD)

    tl.store(part_max_ptr + pid_n * stride_mn + pid_c * stride_mc, m)
    tl.store(part_sum_ptr + pid_n * stride_mn + pid_c * stride_mc, l)
    offs_k = tl.arange(0, K_PAD)
    tl.store(part_keys_ptr + pid_n * stride_kn + pid_c * stride_kc + offs_k * stride_kk, best)


@triton.jit
def topk_merge_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_keys_ptr,
    probs_ptr,
    ids_ptr,
    num_chunks,
    k,
    temperature,
    stride_mn,
    stride_mc,
    stride_kn,
    stride_kc,
    stride_kk,
    stride_pn,
    stride_pk,
    stride_in,
    stride_ik,
    K_PAD: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    """Combine a row's chunks: ``M = max m_c``, ``L = sum l_c exp(m_c - M)``, global top-k.

    Grid ``(num_rows,)``. Writes ``probs[n, :k]`` (float32, descending) and ``ids[n, :k]``.
    """
    pid_n = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, CHUNKS_PAD)
    offs_k = tl.arange(0, K_PAD)
    live_c = offs_c < num_chunks

    stat_off = pid_n * stride_mn + offs_c * stride_mc
    m_c = tl.load(part_max_ptr + stat_off, mask=live_c, other=float("-inf"))
    l_c = tl.load(part_sum_ptr + stat_off, mask=live_c, other=0.0)
    m = tl.max(m_c, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(l_c * tl.exp(m_c - m_safe), axis=0)

    key_ptrs = (
        part_keys_ptr
        + pid_n * stride_kn
        + offs_c[:, None] * stride_kc
        + offs_k[None, :] * stride_kk
    )
    cand = tl.load(key_ptrs, mask=live_c[:, None], other=SENTINEL_KEY)
    # k rounds of max-and-remove emit the global top-k already sorted. There are at least k
    # real keys (k <= vocab), so no placeholder is ever picked.
    for r in range(0, k):
        top = tl.max(tl.max(cand, axis=1), axis=0)
        x, token = _unpack_keys(top)
        tl.store(probs_ptr + pid_n * stride_pn + r * stride_pk, tl.exp(x / temperature - m_safe) / l)
        tl.store(ids_ptr + pid_n * stride_in + r * stride_ik, token)
        cand = tl.where(cand == top, SENTINEL_KEY, cand)
