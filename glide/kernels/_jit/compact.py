"""Device code for :func:`glide.kernels.compact_kv`: move accepted tree slots after the prefix.

One program per ``(cache n, sequence b, kv head h)`` row of the stacked cache does::

    kv[n, b, h, lens[b] + a] <- kv[n, b, h, lens[b] + path_idx[b, a]]   for a < path_lens[b]

Rows never share memory, so programs are independent. Inside a row a destination can be the
source of another accepted slot (path ``[0, 2, 3]`` writes slot 1 from 2 and slot 2 from 3);
the program loads every source of its row before it stores anything, with a barrier in
between because a value is loaded by one thread and its slot overwritten by another. Any
``path_idx`` order is therefore safe, not only the ``path_idx[b, a] >= a`` of tree paths.
"""

import triton
import triton.language as tl


@triton.jit
def compact_kv_kernel(
    kv_ptr,
    seqlens_ptr,
    path_idx_ptr,
    path_lens_ptr,
    batch,
    num_heads,
    max_path,
    stride_kn,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_sb,
    stride_pb,
    stride_pa,
    stride_lb,
    HEAD_DIM: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(num_caches * batch * num_heads,)``; each program moves one row's path."""
    pid = tl.program_id(0).to(tl.int64)
    h = pid % num_heads
    b = (pid // num_heads) % batch
    n = pid // (num_heads * batch)

    base = tl.load(seqlens_ptr + b * stride_sb).to(tl.int64)
    path_len = tl.load(path_lens_ptr + b * stride_lb).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    live = (offs_a < path_len) & (offs_a < max_path)
    src = base + tl.load(path_idx_ptr + b * stride_pb + offs_a * stride_pa, mask=live, other=0).to(tl.int64)
    dst = base + offs_a

    row_ptr = kv_ptr + n * stride_kn + b * stride_kb + h * stride_kh
    # Unrolled at compile time: each column block is independent, and a static loop keeps the
    # compiler from pipelining loads across the barrier.
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (offs_d < HEAD_DIM)[None, :]
        src_ptrs = row_ptr + src[:, None] * stride_ks + offs_d[None, :] * stride_kd
        dst_ptrs = row_ptr + dst[:, None] * stride_ks + offs_d[None, :] * stride_kd
        moved = tl.load(src_ptrs, mask=mask)
        tl.debug_barrier()  # every source of the row is read before any slot is overwritten
        tl.store(dst_ptrs, moved, mask=mask)
