"""Device code for :func:`glide.kernels.add_rms_norm`: residual add and RMSNorm in one pass.

One program per row::

    h = x + d                                  (HAS_DELTA; rounded to the dtype, as torch adds)
    y = w * (h / sqrt(mean(h^2) + eps))

The mean of squares is taken in float32 over the rounded ``h``. For half dtypes (``HALF``)
``h * rstd`` is rounded to the dtype before the weight multiplies it, and that product is
rounded again: the model's RMSNorm (``weight * F.rms_norm(x)``, as transformers). For float32
both roundings vanish. The whole row sits in registers (``BLOCK_N >= hidden``).
"""

import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    h_ptr,
    y_ptr,
    N,
    eps,
    stride_xr,
    stride_xc,
    stride_dr,
    stride_dc,
    stride_w,
    stride_hr,
    stride_hc,
    stride_yr,
    stride_yc,
    HAS_DELTA: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(rows,)``."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < N
    x = tl.load(x_ptr + row * stride_xr + offs_n * stride_xc, mask=mask, other=0.0)
    dtype = x.dtype
    # Constexpr: without a delta the add, its load and the store of h are compiled out.
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_dr + offs_n * stride_dc, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(dtype)
        tl.store(h_ptr + row * stride_hr + offs_n * stride_hc, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)  # rsqrt, as torch's rms_norm
    w = tl.load(w_ptr + offs_n * stride_w, mask=mask, other=0.0).to(tl.float32)
    if HALF:
        y = w * (xf * rstd).to(dtype).to(tl.float32)
    else:
        y = xf * rstd * w
    tl.store(y_ptr + row * stride_yr + offs_n * stride_yc, y.to(dtype), mask=mask)
