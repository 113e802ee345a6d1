"""Device code for :func:`glide.kernels.silu_mul`: SwiGLU's ``silu(gate) * up``.

Each row of the fused gate/up projection holds ``gate`` in its first ``I`` columns and ``up``
in the next ``I``. ``silu(g) = g / (1 + exp(-g))`` runs in float32 and is rounded to the input
dtype before the product, which is rounded again: the model's ``F.silu(gate) * up`` in a half
dtype (no-ops in float32).
"""

import triton
import triton.language as tl


@triton.jit
def silu_mul_kernel(
    gu_ptr,
    out_ptr,
    I,
    stride_gr,
    stride_gc,
    stride_or,
    stride_oc,
    BLOCK_I: tl.constexpr,
):
    """Grid ``(rows, cdiv(I, BLOCK_I))``."""
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs_i < I
    g_ptrs = gu_ptr + row * stride_gr + offs_i * stride_gc
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    u = tl.load(g_ptrs + I * stride_gc, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(dtype)
    out = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_or + offs_i * stride_oc, out.to(dtype), mask=mask)
