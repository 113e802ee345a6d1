"""Device code for tree-masked and cross attention (see :mod:`glide.kernels.attention`).

One program owns one ``(batch, kv_head)`` pair, one ``BLOCK_M`` tile of the flattened
``(tree_len * GROUP)`` query rows and one split of the key range. Row ``r`` of the flattened
tile is tree node ``r // GROUP`` of query head ``kv_head * GROUP + r % GROUP``, so every query
head that shares a KV head reads each K/V tile once (decode and verification are bound by the
bandwidth of that read). Past ``BLOCK_M`` rows, every M tile of a ``(batch, kv_head, split)``
reads the same K/V tiles again; with ``(batch * kv_head)`` as the fastest program id those
programs are ``batch * num_kv_heads`` apart in launch order. An order with the M tile fastest
(so that the repeated reads come from L2) measured no gain on an H100 at batch 1 (bf16, 32k
context, the same split count): 2-4% slower with Llama-8B heads at T=17-64, 0-3% faster with
SmolLM2 heads at T=24-64; so this order stays. Large batches are unmeasured.

Mask rule, for node ``i`` of sequence ``b`` with ``P = prefix_lens[b]``::

    key s is visible  <=>  s < P                                  (committed prefix)
                       or  HAS_TREE and 0 <= s - P < T and tree_mask[b, i, s - P]

The key range ``[0, P + T)`` (``[0, P)`` without a tree) is cut into ``NUM_SPLITS`` chunks
of whole ``BLOCK_N`` tiles. Each chunk runs two loops: prefix tiles check bounds only, tree
tiles also read the ``(T, T)`` mask, so no dense ``(T, S)`` mask exists anywhere.

Softmax runs online in base 2 (``qk * sm_scale * log2(e)``). A split with ``NUM_SPLITS > 1``
stores its normalised partial ``o_s`` and ``lse_s = m_s + log2(l_s)``; the merge kernel forms

    out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s

and a row whose splits are all empty (``lse_s = -inf`` everywhere) gets zeros.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, k_base, v_base, offs_n, n_valid, offs_d, d_valid, visible,
    stride_ks, stride_kd, stride_vs, stride_vd,
    QK_SCALE, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One online-softmax step over the key tile at positions ``offs_n`` (int64).

    ``n_valid`` (BLOCK_N,) bounds the K/V loads; ``visible`` (BLOCK_M, BLOCK_N) is the mask.
    """
    k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
    k = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    if DOT_UPCAST:
        k = k.to(tl.float32)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION) * QK_SCALE
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no visible key keeps m = -inf; shift it by 0 so that exp2 gives 0,
    # not NaN from (-inf) - (-inf).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
    p = p.to(v.dtype)  # the tensor cores' input type, also when DOT_UPCAST widens it again
    if DOT_UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, mask_ptr, out_ptr, opart_ptr, lse_ptr,
    T, NUM_KV_HEADS, QK_SCALE,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mi, stride_mj,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_ps, stride_pb, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lb, stride_lt, stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_TREE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Tree attention (``HAS_TREE=True``) or cross attention (``HAS_TREE=False``).

    Cross attention is this kernel with the tree loop compiled out: ``lens`` are then the
    ``kv_lens`` and ``mask_ptr`` is never read. Grid: ``(B * NUM_KV_HEADS,
    cdiv(T * GROUP, BLOCK_M), NUM_SPLITS)``. With ``NUM_SPLITS == 1`` the output is written directly;
    otherwise ``opart``/``lse`` receive the split's partial for :func:`attention_merge_kernel`.
    ``DOT_UPCAST`` feeds ``tl.dot`` float32 copies of its (already rounded) operands; the
    launcher sets it only for bfloat16 under Triton's interpreter, whose ``dot`` multiplies
    bfloat16's raw uint16 storage (Triton 3.9).
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    b = pid_bh // NUM_KV_HEADS
    kvh = pid_bh % NUM_KV_HEADS

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (node, head-in-group) rows
    r_valid = offs_r < T * GROUP
    node = offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    rd_valid = r_valid[:, None] & d_valid[None, :]

    q_ptrs = (q_ptr + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=rd_valid, other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)

    prefix_len = tl.load(lens_ptr + b).to(tl.int64)
    if HAS_TREE:
        n_keys = prefix_len + T
    else:
        n_keys = prefix_len
    # This split's chunk of whole BLOCK_N tiles; trailing splits may be empty.
    tiles_per_split = tl.cdiv(tl.cdiv(n_keys, BLOCK_N), NUM_SPLITS)
    split_start = pid_s * tiles_per_split * BLOCK_N
    split_end = tl.minimum(split_start + tiles_per_split * BLOCK_N, n_keys)

    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)

    # Prefix tiles: every row sees every key below prefix_end, so only bounds are checked.
    prefix_end = tl.minimum(split_end, prefix_len)
    for start_n in range(split_start, prefix_end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_valid = offs_n < prefix_end
        visible = r_valid[:, None] & n_valid[None, :]
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_base, v_base, offs_n, n_valid, offs_d, d_valid, visible,
            stride_ks, stride_kd, stride_vs, stride_vd, QK_SCALE, DOT_PRECISION, DOT_UPCAST,
        )

    if HAS_TREE:
        # Tree tiles start at the first tree key of this split (not BLOCK_N aligned) and read
        # the (T, T) mask row of each node.
        tree_start = tl.maximum(split_start, prefix_len)
        mask_base = mask_ptr + b * stride_mb + node[:, None] * stride_mi
        for start_n in range(tree_start, split_end, BLOCK_N):
            offs_n = start_n + offs_n0
            offs_j = offs_n - prefix_len
            n_valid = offs_n < split_end
            in_tree = r_valid[:, None] & n_valid[None, :]
            allowed = tl.load(mask_base + offs_j[None, :] * stride_mj, mask=in_tree, other=0)
            visible = in_tree & (allowed != 0)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, offs_n, n_valid, offs_d, d_valid, visible,
                stride_ks, stride_kd, stride_vs, stride_vd, QK_SCALE, DOT_PRECISION, DOT_UPCAST,
            )

    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows with no visible key: zeros
    if NUM_SPLITS == 1:
        out_ptrs = (out_ptr + b * stride_ob + node[:, None] * stride_ot
                    + head[:, None] * stride_oh + offs_d[None, :] * stride_od)
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=rd_valid)
    else:
        part_ptrs = (opart_ptr + pid_s * stride_ps + b * stride_pb + node[:, None] * stride_pt
                     + head[:, None] * stride_ph + offs_d[None, :] * stride_pd)
        tl.store(part_ptrs, o, mask=rd_valid)
        lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("-inf"))
        lse_ptrs = lse_ptr + pid_s * stride_ls + b * stride_lb + node * stride_lt + head * stride_lh
        tl.store(lse_ptrs, lse, mask=r_valid)


@triton.jit
def attention_merge_kernel(
    opart_ptr, lse_ptr, out_ptr,
    T, NUM_Q_HEADS,
    stride_ps, stride_pb, stride_pt, stride_ph, stride_pd,
    stride_ls, stride_lb, stride_lt, stride_lh,
    stride_ob, stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge ``NUM_SPLITS`` partial outputs of one ``(batch, node, q_head)`` row by their LSE.

    Grid: ``(B * T, NUM_Q_HEADS)``. Weights are ``2^(lse_s - max_s lse_s)``; a row whose
    splits all saw no key (every ``lse_s = -inf``) is written as zeros.
    """
    pid_bt = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = pid_bt // T
    t = pid_bt % T

    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM

    lse = tl.load(lse_ptr + offs_s * stride_ls + b * stride_lb + t * stride_lt + h * stride_lh,
                  mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_max)  # 0 for empty splits and padding
    w_sum = tl.sum(w, 0)
    part_ptrs = (opart_ptr + offs_s[:, None] * stride_ps + b * stride_pb + t * stride_pt
                 + h * stride_ph + offs_d[None, :] * stride_pd)
    parts = tl.load(part_ptrs, mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    out_ptrs = out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_d * stride_od
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_valid)
