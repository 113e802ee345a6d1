"""Launcher for ``rope_store``: RoPE on the fused q/k/v projection and the K/V cache write, in one
launch (the decoder layer's ``apply_rope`` copy and indexed K/V store were five kernels).

The kernel lives in :mod:`glide.kernels._jit.rope`.
"""

from __future__ import annotations

import torch

from ._checks import check_float_input, check_like
from ._checks import check_lens as check_lens_tensor
from ._dispatch import use_triton
from ._host import cdiv, next_power_of_2
from ._jit.rope import rope_store_kernel
from .reference import rope_store_ref

__all__ = ["rope_store"]

# Elements of one half-head tile a program handles: 16 heads of head_dim 64, 8 of 128, so a
# decode step (one token) still spreads over a few programs. Not timed on a GPU.
_TILE = 512


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_layer: torch.Tensor,
    lens: torch.Tensor,
    *,
    check_lens: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate the query heads of ``qkv`` in place and write rotated K and plain V to the cache.

    For token ``t`` of sequence ``b``, with rotate-half RoPE
    ``rope(x) = x * cos + roll(x, D/2) * sin`` (``sin`` signed, see
    :func:`glide.kernels.reference.rotate_half_rope`)::

        qkv[b, t, h]          <- rope(qkv[b, t, h])              for h < Hq
        kv_layer[0, b, j, s]  <- rope(qkv[b, t, Hq + j])         s = lens[b] + t
        kv_layer[1, b, j, s]  <- qkv[b, t, Hq + Hkv + j]

    No other cache slot is written, and ``qkv``'s key and value heads are only read. With
    ``check_lens=False`` nothing here reads a device value on the host, so a CUDA graph can
    capture the call and replay it at any ``lens``.

    Parameters
    ----------
    qkv : torch.Tensor, shape (batch, T, num_q_heads + 2 * num_kv_heads, head_dim)
        float32, float16 or bfloat16, any strides (a view of the fused projection). ``head_dim``
        is even; ``num_q_heads >= 1``.
    cos, sin : torch.Tensor, shape (batch, T, head_dim)
        The RoPE tables gathered at each token's position, dtype of ``qkv``, any strides.
        ``sin`` has its first half negated (:func:`glide.model.llama.rope_tables`).
    kv_layer : torch.Tensor, shape (2, batch, num_kv_heads, max_seq, head_dim)
        One layer's K (``[0]``) and V (``[1]``) cache, dtype of ``qkv``, any strides.
    lens : torch.Tensor, shape (batch,), integer
        Where each sequence's first new token goes; ``0 <= lens[b] <= max_seq - T``.
    check_lens : bool
        Check that range (one host sync on CUDA). Shapes, dtypes and devices are always
        checked; out-of-range lengths write out of bounds.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.

    Returns
    -------
    torch.Tensor
        ``qkv``, its query heads rotated in place.

    Raises
    ------
    TypeError
        On a non-tensor argument, a dtype outside the list above or unlike ``qkv``'s, or a
        non-integer ``lens``.
    ValueError
        On a bad shape or device, an odd ``head_dim``, no query head, or (with ``check_lens``)
        ``lens`` outside ``[0, max_seq - T]``.
    """
    check_float_input("qkv", qkv, 4, "(batch, T, num_q_heads + 2 * num_kv_heads, head_dim)")
    B, T, H, D = qkv.shape
    if D % 2:
        raise ValueError(f"qkv's head_dim must be even for rotate-half RoPE, got {D}")
    dev = qkv.device
    if not isinstance(kv_layer, torch.Tensor):
        raise TypeError(f"kv_layer must be a torch.Tensor, got {type(kv_layer).__name__}")
    if kv_layer.dim() != 5:
        raise ValueError(f"kv_layer must have shape (2, batch={B}, num_kv_heads, max_seq, head_dim={D}), "
                         f"got {tuple(kv_layer.shape)}")
    Hkv, S = kv_layer.shape[2], kv_layer.shape[3]
    check_like("kv_layer", kv_layer, (2, B, Hkv, S, D), "qkv", qkv)
    if Hkv < 1 or H - 2 * Hkv < 1:
        raise ValueError(f"qkv has {H} heads, which leaves no query head beside 2 * num_kv_heads "
                         f"({2 * Hkv}) from kv_layer")
    check_like("cos", cos, (B, T, D), "qkv", qkv)
    check_like("sin", sin, (B, T, D), "qkv", qkv)
    check_lens_tensor("lens", lens, B, dev, S, T, check_lens, ref="qkv", extra_name="T")

    if not use_triton(dev, backend):
        return rope_store_ref(qkv, cos, sin, kv_layer, lens)
    if qkv.numel() == 0:
        return qkv
    block_half = next_power_of_2(D // 2)
    block_h = min(next_power_of_2(H), max(1, _TILE // block_half))
    rope_store_kernel[(B * T, cdiv(H, block_h))](
        qkv,
        cos,
        sin,
        kv_layer,
        lens,
        T,
        H - 2 * Hkv,
        Hkv,
        *qkv.stride(),
        *cos.stride(),
        *sin.stride(),
        *kv_layer.stride(),
        lens.stride(0),
        HALF_D=D // 2,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
    )
    return qkv
