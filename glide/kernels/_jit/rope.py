"""Device code for :func:`glide.kernels.rope_store`: RoPE on q and k, then K/V into the cache.

Rotate-half RoPE with the runner's signed sine table (``sin`` with its first half negated) is,
on the two halves ``x1 = x[:D/2]``, ``x2 = x[D/2:]`` of a head::

    out1 = x1 * cos1 + x2 * sin1        (sin1 = -sin: the sign of rotate_half)
    out2 = x2 * cos2 + x1 * sin2

which is ``addcmul(x * cos, roll(x, D/2), sin)``, the model's ``apply_rope``. Like that torch
code in a half dtype, ``x * cos`` is rounded to the input dtype before the second product is
added in float32 and the sum rounded once; in float32 the roundings are no-ops.

One program per ``(token, block of heads)`` of the fused projection ``qkv``, whose heads are
``Hq`` query heads, then ``Hkv`` key heads, then ``Hkv`` value heads. Query heads are
rotated in place; key heads are rotated and value heads copied to the cache slot
``lens[b] + t`` of their KV head. ``qkv``'s key and value heads are only read.
"""

import triton
import triton.language as tl


@triton.jit
def rope_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    kv_ptr,
    lens_ptr,
    T,
    num_q_heads,
    num_kv_heads,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    stride_kc,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_lb,
    HALF_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Grid ``(batch * T, cdiv(num_q_heads + 2 * num_kv_heads, BLOCK_H))``."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    num_heads = num_q_heads + 2 * num_kv_heads

    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    live_h = offs_h < num_heads
    live_d = offs_d < HALF_D
    mask = live_h[:, None] & live_d[None, :]

    # The tables are per token: one row of cos and sin serves every head of the block.
    cos_row = cos_ptr + b * stride_cb + t * stride_ct
    sin_row = sin_ptr + b * stride_sb + t * stride_st
    cos1 = tl.load(cos_row + offs_d * stride_cd, mask=live_d).to(tl.float32)
    cos2 = tl.load(cos_row + (offs_d + HALF_D) * stride_cd, mask=live_d).to(tl.float32)
    sin1 = tl.load(sin_row + offs_d * stride_sd, mask=live_d).to(tl.float32)
    sin2 = tl.load(sin_row + (offs_d + HALF_D) * stride_sd, mask=live_d).to(tl.float32)

    x_ptrs = qkv_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh
    x1_ptrs = x_ptrs + offs_d[None, :] * stride_qd
    x2_ptrs = x_ptrs + (offs_d[None, :] + HALF_D) * stride_qd
    x1 = tl.load(x1_ptrs, mask=mask)
    x2 = tl.load(x2_ptrs, mask=mask)
    dtype = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    out1 = ((x1f * cos1[None, :]).to(dtype).to(tl.float32) + x2f * sin1[None, :]).to(dtype)
    out2 = ((x2f * cos2[None, :]).to(dtype).to(tl.float32) + x1f * sin2[None, :]).to(dtype)

    is_q = offs_h < num_q_heads
    is_v = offs_h >= num_q_heads + num_kv_heads
    # Value heads go to the cache as they are.
    out1 = tl.where(is_v[:, None], x1, out1)
    out2 = tl.where(is_v[:, None], x2, out2)

    q_mask = mask & is_q[:, None]
    tl.store(x1_ptrs, out1, mask=q_mask)
    tl.store(x2_ptrs, out2, mask=q_mask)

    kv_idx = tl.maximum(offs_h - num_q_heads, 0)  # clamped so that query rows form valid offsets
    which = (kv_idx // num_kv_heads).to(tl.int64)  # 0: K, 1: V
    head = (kv_idx % num_kv_heads).to(tl.int64)
    slot = tl.load(lens_ptr + b * stride_lb).to(tl.int64) + t
    c_ptrs = kv_ptr + which[:, None] * stride_kc + b * stride_kb + head[:, None] * stride_kh + slot * stride_ks
    kv_mask = mask & ~is_q[:, None]
    tl.store(c_ptrs + offs_d[None, :] * stride_kd, out1, mask=kv_mask)
    tl.store(c_ptrs + (offs_d[None, :] + HALF_D) * stride_kd, out2, mask=kv_mask)
