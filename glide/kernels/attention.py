"""Launchers for tree-masked verification attention and GliDe cross attention.

Both run one Triton kernel (:mod:`glide.kernels._jit.attention`): ``cross_attention`` is
``tree_attention`` with the tree part compiled out. The launchers own every check, the
allocation, the choice of block sizes and KV splits, and the dispatch to the reference.

Block sizes and the number of KV splits come from :func:`attention_config`, a heuristic, so a
benchmark can record exactly what ran. Its tile sizes follow compile-time facts only (sm_90
register spills and shared memory from ``ptxas``); the KV-split policy was timed on an H100
(profiles/nvidia-h100-80gb-hbm3/), the tile sizes not yet one against another.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import triton

from ._checks import FLOAT_DTYPES, check_like
from ._checks import check_lens as _check_lens
from ._dispatch import use_triton
from ._host import cdiv, next_power_of_2
from ._jit.attention import attention_fwd_kernel, attention_merge_kernel
from .reference import cross_attention_ref, tree_attention_ref

__all__ = [
    "tree_attention",
    "cross_attention",
    "attention_config",
    "AttentionConfig",
    "autotuned_config",
]

_DEFAULT_NUM_SMS = 132  # H100 SXM; used when the tensors are not on a CUDA device
_MIN_TILES_PER_SPLIT = 2  # unmeasured: a split shorter than this costs more to merge than it saves
_MAX_SPLITS = 64  # the merge kernel holds (splits, head_dim) in registers


@dataclass(frozen=True)
class AttentionConfig:
    """Launch configuration of the attention kernel (one benchmark row's ``config`` field)."""

    block_m: int
    block_n: int
    block_d: int
    num_splits: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(index: int) -> int:
    # get_device_properties costs microseconds of host time; the launchers ask every call.
    return torch.cuda.get_device_properties(index).multi_processor_count


# The 128-row tile (head_dim 128, 2 stages) needs 104 KiB of shared memory (sm_90 ptxas,
# profiles/compile-sm90.json) plus 1 KiB reserved: sm_80 and sm_90 give a block up to 163 and
# 227 KiB, but sm_86 and sm_89 (RTX 30/40, A10, L4, L40S) only 99 KiB.
_BIG_TILE_SHARED = 110 * 1024


@functools.lru_cache(maxsize=None)
def _cuda_fits_big_tiles(index: int) -> bool:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", _BIG_TILE_SHARED) >= _BIG_TILE_SHARED


def _device_facts(device: torch.device | None) -> tuple[int, bool]:
    """``(SM count, whether a block can hold a 128-row tile)`` of a CUDA device; an H100's
    for anything else (the interpreter, ahead-of-time compiles)."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_num_sms(index), _cuda_fits_big_tiles(index)
    return _DEFAULT_NUM_SMS, True


def attention_config(
    batch: int,
    q_len: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_keys: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    num_splits: int | None = None,
    device: torch.device | None = None,
    max_block_m: int | None = None,
) -> AttentionConfig:
    """Block sizes, warps and KV splits for one attention launch (the heuristic).

    The tile sizes are set from compile-time facts only: ``ptxas -v`` for sm_90 on every
    config the launchers choose (``python -m bench.aot_report`` -> profiles/compile-sm90.json).
    The rule is no register spills and, for 16-bit inputs, at most ~113 KiB of shared memory
    so that two programs share an H100 SM (228 KiB, 1 KiB reserved per block). Only two
    choices rest on GPU timings (the splits on an H100, 128-row tiles on an H200); the others
    are untimed, and a sweep should replace them.

    - ``BLOCK_M``: the ``q_len * group`` query rows of a KV head, rounded up to a power of two,
      clamped to [16, 64] (``tl.dot`` needs 16 rows), or to [16, 128] past 64 rows at a
      128 head-dim block (``max_block_m`` below). float32 caps it at 32 (16 above
      head_dim 64): its ``ieee`` dots run on FMA units, whose operands take far more
      registers than the 16-bit tensor-core path. Before this cap, float32 at BLOCK_M 32-64
      spilled 27-30 KB of stores per thread (3.5 KB at BLOCK_M 64, head_dim 64), and no
      BLOCK_N / warps / stages tried at BLOCK_M 32-64 with head_dim 128 was spill-free.
    - ``BLOCK_N``: 16 bits, 128 keys when ``BLOCK_M <= 32`` and ``head_dim <= 64`` (decode and
      small trees: fewer, larger loads), else 64. float32, 64.
    - ``num_stages``: 3 in 16 bits, but 2 at ``BLOCK_M * BLOCK_D >= 64 * 128``: three stages
      of 64x128 K/V tiles plus Q need 112-116 KiB (more than half an SM), two need 80-84 KiB.
      float32, 2 (three stages needed 140-176 KiB, one program per SM; two need <= 76 KiB).
    - ``num_warps``: 4, but 8 at ``BLOCK_M * BLOCK_D >= 64 * 128`` in 16 bits (4 warps took
      252-255 registers per thread with the tree mask, and 20 bytes of spill with 3 stages;
      8 warps take 195) and at BLOCK_M 32 in float32 (4 warps spilled 684 bytes at
      BLOCK_N 64; 8 warps take 90 registers).
    - ``num_splits`` (flash-decoding): with ``base = batch * num_kv_heads``, the key range
      is split into ``ceil(num_sms / base)`` chunks when ``base`` is below the device's SM
      count (132 on an H100), but never into chunks shorter than ``_MIN_TILES_PER_SPLIT``
      tiles, nor more than ``_MAX_SPLITS``. The count of M tiles
      (``ceil(q_len * group / BLOCK_M)``) is left out on purpose, so the key chunk a
      program reads does not grow with the tree. Counting it (the policy before this one)
      halved the splits as soon as ``q_len * group`` passed 64 rows. H100, bf16, batch 1,
      32k context, CUDA-graph replay: Llama-8B heads (group 4) T=17 226 -> 147 us,
      T=32 219 -> 142 us, T=64 371 -> 259 us (T <= 16 unchanged, 52-83 us); SmolLM2 heads
      (group 3) T=24-64 1-6 us faster (21 -> 19 us, 35 -> 29 us). A tree past 64 rows now
      launches ``m_tiles * base * num_splits`` programs, more than one wave, so T=17 still
      costs 1.8x T=16: the cliff is smaller, not gone.

    Parameters
    ----------
    batch, q_len, num_q_heads, num_kv_heads, head_dim : int
        Shapes of the launch (``q_len`` is the tree length for tree attention).
    max_keys : int
        The longest key range of any sequence (``max(cache_seqlens) + q_len`` for a tree,
        ``max(kv_lens)`` for cross attention).
    dtype : torch.dtype
        Dtype of q, k and v: ``torch.float32`` gets smaller tiles; float16 and bfloat16 the
        same ones. Defaults to bfloat16, the models' dtype.
    num_splits : int, optional
        Force this many KV splits (tests, benchmarks); ``None`` applies the heuristic.
    max_block_m : {None, 16, 32, 64, 128}
        The largest ``BLOCK_M`` for 16-bit inputs (float32 keeps its own cap). ``None`` (the
        default) picks 128 when ``head_dim`` pads to a 128 block and a KV head has more than
        64 query rows, else 64. A 128-row tile reads the K/V once for up to 128 rows (8 warps,
        2 stages) where 64-row tiles read it twice. H200, bf16, batch 1, CUDA-graph replay
        (``profiles/nvidia-h200/gpu-check.json``): Llama-8B heads (group 4) at 32k,
        T=17 144 -> 86 us, T=32 143 -> 87 us, T=64 258 -> 156 us; at 8k, T=17 44 -> 28 us;
        groups 2 and 8 at T=64, 8k: 44 -> 30 and 145 -> 95 us. At head_dim 64 (SmolLM2,
        group 3, 44 splits) 128-row tiles were slower (32k, T=24: 20 -> 26 us), so they keep 64.
        A CUDA device whose blocks get less than 110 KiB of shared memory (sm_86, sm_89) keeps
        64 too: the 128-row tile needs 104 KiB. Prefill (thousands of rows) also takes 128-row
        tiles at head_dim 128; only trees up to T = 64 were timed.
    device : torch.device, optional
        Its SM count replaces the H100's 132 when it is a CUDA device.

    Returns
    -------
    AttentionConfig
    """
    _check_max_block_m(max_block_m)
    return _config(batch, q_len, num_q_heads, num_kv_heads, head_dim, max_keys, dtype,
                   num_splits, *_device_facts(device), max_block_m)


# The launchers ask for a config on every call, mostly with the same arguments (with
# check_lens=False max_keys is fixed too): cached, it costs a dict lookup.
@functools.lru_cache(maxsize=1024)
def _config(batch, q_len, num_q_heads, num_kv_heads, head_dim, max_keys, dtype, num_splits,
            num_sms, big_tiles, max_block_m) -> AttentionConfig:
    group = num_q_heads // num_kv_heads
    rows = q_len * group
    block_d = max(16, next_power_of_2(head_dim))
    if max_block_m is None:  # measured on an H200 (attention_config's docstring)
        max_block_m = 128 if big_tiles and block_d == 128 and rows > 64 else 64
    block_m = min(max_block_m if dtype != torch.float32 else 64, max(16, next_power_of_2(rows)))
    if dtype == torch.float32:
        # sm_90 ptxas, float32 (see the docstring): M16 N64 w4 80-91 registers, 40-76 KiB;
        # M32 N64 D64 w8 90 registers, 48 KiB.
        block_m = min(block_m, 32 if block_d <= 64 else 16)
        block_n, num_stages = 64, 2
        num_warps = 8 if block_m >= 32 else 4
    else:
        block_n = 128 if block_m <= 32 and block_d <= 64 else 64
        # A 64x128 float32 accumulator alone is 64 registers per thread at 4 warps.
        large = block_m * block_d >= 64 * 128
        num_stages = 2 if large else 3
        num_warps = 8 if large else 4
    if num_splits is None:
        base = batch * num_kv_heads
        n_tiles = cdiv(max(max_keys, 1), block_n)
        wanted = cdiv(num_sms, max(base, 1))
        num_splits = max(1, min(wanted, n_tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS))
    return AttentionConfig(
        block_m=block_m,
        block_n=block_n,
        block_d=block_d,
        num_splits=int(num_splits),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _prune_autotune_configs(configs, named_args, **kwargs):
    """Drop configs whose K/V tiles are large for the head_dim (shared memory) and 8 warps on
    16-row tiles (too little work per warp). Both rules are unmeasured guesses."""
    block_m, block_d = kwargs["BLOCK_M"], kwargs["BLOCK_D"]
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] * block_d <= 128 * 128
        and not (block_m == 16 and c.num_warps == 8 and c.kwargs["BLOCK_N"] < 128)
    ]
    return kept or configs[:1]


# Optional (``autotune=True``), CUDA only: the interpreter cannot time kernels. BLOCK_M is
# not tuned because it fixes the grid and the split heuristic; BLOCK_N, warps and stages are.
# The key leaves out the prefix lengths, which change every step and would retune each time.
_autotuned_fwd = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ],
    key=["T", "GROUP", "HEAD_DIM", "BLOCK_M", "NUM_SPLITS", "HAS_TREE"],
    prune_configs_by={"early_config_prune": _prune_autotune_configs},
)(attention_fwd_kernel)


def autotuned_config() -> dict | None:
    """The config the autotuner picked in the latest ``autotune=True`` launch (``None`` before
    any): ``{"BLOCK_N": ..., "num_warps": ..., "num_stages": ...}``, for benchmark rows."""
    best = getattr(_autotuned_fwd, "best_config", None)
    if best is None:
        return None
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


# ----------------------------------------------------------------------------- validation


def _check_qkv(q, k_cache, v_cache):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
    B, _, Hq, D = q.shape
    Bk, Hkv, S, Dk = k_cache.shape
    if (Bk, Dk) != (B, D) or Hkv == 0:
        raise ValueError(
            f"k_cache must have shape (batch={B}, num_kv_heads, max_seq, head_dim={D}), "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"q's num_q_heads={Hq} must be a multiple of k_cache's num_kv_heads={Hkv}"
        )


def _check_triton_dtype(q):
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"q has dtype {q.dtype}; the Triton kernel takes float16, bfloat16 or float32 "
            "(use backend='reference' for other dtypes)"
        )


def _scale(sm_scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def _finish(out, result):
    if out is None:
        return result
    out.copy_(result)
    return out


# ----------------------------------------------------------------------------- launch

def _launch(q, k_cache, v_cache, lens, tree_mask, out, sm_scale, max_keys, num_splits, autotune,
            max_block_m):
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    # the public launchers checked every argument: straight to the cached config
    cfg = _config(B, T, Hq, Hkv, D, max_keys, q.dtype, num_splits, *_device_facts(q.device), max_block_m)
    has_tree = tree_mask is not None
    if has_tree:
        mask = tree_mask.view(torch.uint8)  # same bytes; Triton loads bytes, not i1
        mask_strides = mask.stride()
    else:
        mask, mask_strides = lens, (0, 0, 0)  # never read: HAS_TREE=False drops the tree loop
    if cfg.num_splits > 1:
        opart = torch.empty((cfg.num_splits, B, T, Hq, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((cfg.num_splits, B, T, Hq), dtype=torch.float32, device=q.device)
        part_strides = (*opart.stride(), *lse.stride())
    else:  # never touched: NUM_SPLITS == 1 writes out directly (like mask without a tree)
        opart, lse, part_strides = out, out, (0,) * 9
    # (batch * kv_head) fastest: the M-tile-first order measured no gain (the kernel's docstring).
    grid = (B * Hkv, cdiv(T * (Hq // Hkv), cfg.block_m), cfg.num_splits)
    if autotune and q.device.type == "cuda":
        kernel, tuned = _autotuned_fwd, {}
    else:
        kernel = attention_fwd_kernel
        tuned = dict(BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel[grid](
        q, k_cache, v_cache, lens, mask, out, opart, lse,
        T, Hkv, _scale(sm_scale, D) * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask_strides,
        *out.stride(), *part_strides,
        GROUP=Hq // Hkv,
        HEAD_DIM=D,
        BLOCK_D=cfg.block_d,
        BLOCK_M=cfg.block_m,
        NUM_SPLITS=cfg.num_splits,
        HAS_TREE=has_tree,
        # fp32 inputs are held to fp32 round-off, so no TF32; 16-bit inputs use the default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        DOT_UPCAST=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        **tuned,
    )
    if cfg.num_splits > 1:
        attention_merge_kernel[(B * T, Hq)](
            opart, lse, out, T, Hq,
            *opart.stride(), *lse.stride(), *out.stride(),
            HEAD_DIM=D,
            BLOCK_D=cfg.block_d,
            NUM_SPLITS=cfg.num_splits,
            BLOCK_S=next_power_of_2(cfg.num_splits),
            num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- public API


def tree_attention(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    tree_mask,
    sm_scale=None,
    *,
    out=None,
    num_splits=None,
    autotune=False,
    check_lens=True,
    backend="auto",
    max_block_m=None,
):
    """Tree-masked attention for verification, prefill (causal tree) and decode (``T = 1``).

    Node ``i`` of sequence ``b`` attends to every prefix position ``s < cache_seqlens[b]`` and
    to tree position ``cache_seqlens[b] + j`` exactly when ``tree_mask[b, i, j]``; a node with
    no visible key gets zeros. Query head ``h`` reads KV head ``h // (Hq // Hkv)``.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim)
        float16, bfloat16 or float32 on the Triton path; any strides.
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
        dtype of ``q``, any strides (views into a larger cache are read in place). The K/V of
        tree node ``j`` is already written at position ``cache_seqlens[b] + j``.
    cache_seqlens : torch.Tensor, shape (batch,), integer
        Committed prefix lengths; ``cache_seqlens + tree_len <= max_seq``.
    tree_mask : torch.Tensor, shape (batch, tree_len, tree_len), bool
        ``tree_mask[b, i, j]``: node ``j`` is node ``i`` or one of its ancestors.
    sm_scale : float, optional
        Softmax scale; defaults to ``1 / sqrt(head_dim)``.
    out : torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim), optional
        Written in place and returned (dtype and device of ``q``, any strides).
    num_splits : int, optional
        Force this many KV splits instead of the heuristic of :func:`attention_config`.
    autotune : bool
        On CUDA, pick BLOCK_N, warps and stages by timing (see :func:`autotuned_config`);
        ignored elsewhere. Default: the heuristic of :func:`attention_config`.
    check_lens : bool
        Read the lengths on the host to check their range (one device sync a call). Pass
        ``False`` in a decode loop when the caller guarantees the range: the split heuristic
        then assumes every sequence fills ``max_seq``, and out-of-range lengths read garbage.
    backend : {"auto", "triton", "reference"}
        See :func:`glide.kernels.use_triton`.
    max_block_m : {None, 16, 32, 64, 128}
        See :func:`attention_config`; ``None`` applies its measured rule.

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, num_q_heads, head_dim), dtype of ``q``
    """
    _check_qkv(q, k_cache, v_cache)
    B, T = q.shape[:2]
    if not isinstance(tree_mask, torch.Tensor):
        raise TypeError(f"tree_mask must be a torch.Tensor, got {type(tree_mask).__name__}")
    if tree_mask.dtype != torch.bool:
        raise TypeError(f"tree_mask must have dtype torch.bool, got {tree_mask.dtype}")
    if tree_mask.shape != (B, T, T):
        raise ValueError(f"tree_mask must have shape ({B}, {T}, {T}), got {tuple(tree_mask.shape)}")
    if tree_mask.device != q.device:
        raise ValueError(f"tree_mask is on {tree_mask.device}, expected q's device {q.device}")
    hi = _check_lens(
        "cache_seqlens", cache_seqlens, B, q.device, k_cache.shape[2], T, check_lens
    )
    if out is not None:
        check_like("out", out, q.shape, "q", q)
    _check_num_splits(num_splits)
    _check_max_block_m(max_block_m)
    if not use_triton(q.device, backend):
        if q.numel() == 0:
            return _finish(out, torch.empty(q.shape, dtype=q.dtype, device=q.device))
        ref = tree_attention_ref(q, k_cache, v_cache, cache_seqlens, tree_mask, sm_scale)
        return _finish(out, ref)
    _check_triton_dtype(q)
    return _launch(
        q, k_cache, v_cache, cache_seqlens, tree_mask, out, sm_scale, hi + T, num_splits, autotune,
        max_block_m,
    )


def cross_attention(
    q,
    k_cache,
    v_cache,
    kv_lens,
    sm_scale=None,
    *,
    out=None,
    num_splits=None,
    autotune=False,
    check_lens=True,
    backend="auto",
    max_block_m=None,
):
    """GliDe cross attention: draft queries over the target's KV cache, read in place.

    Every query of sequence ``b`` attends to positions ``[0, kv_lens[b])``; a sequence with
    ``kv_lens[b] == 0`` gets zeros. Same kernel as :func:`tree_attention`, tree part
    compiled out.

    Parameters
    ----------
    q : torch.Tensor, shape (batch, q_len, num_q_heads, head_dim)
        float16, bfloat16 or float32 on the Triton path; any strides.
    k_cache, v_cache : torch.Tensor, shape (batch, num_kv_heads, max_seq, head_dim)
        dtype of ``q``, any strides.
    kv_lens : torch.Tensor, shape (batch,), integer
        ``0 <= kv_lens <= max_seq``.
    sm_scale : float, optional
        Softmax scale; defaults to ``1 / sqrt(head_dim)``.
    out : torch.Tensor, shape (batch, q_len, num_q_heads, head_dim), optional
        Written in place and returned.
    num_splits : int, optional
        Force this many KV splits instead of the heuristic of :func:`attention_config`.
    autotune : bool
        On CUDA, pick BLOCK_N, warps and stages by timing (see :func:`autotuned_config`);
        ignored elsewhere. Default: the heuristic of :func:`attention_config`.
    check_lens : bool
        Read the lengths on the host to check their range (one device sync a call). Pass
        ``False`` in a decode loop when the caller guarantees the range: the split heuristic
        then assumes every sequence fills ``max_seq``, and out-of-range lengths read garbage.
    backend : {"auto", "triton", "reference"}
    max_block_m : {None, 16, 32, 64, 128}
        See :func:`attention_config`; ``None`` applies its measured rule.

    Returns
    -------
    torch.Tensor, shape (batch, q_len, num_q_heads, head_dim), dtype of ``q``
    """
    _check_qkv(q, k_cache, v_cache)
    B = q.shape[0]
    hi = _check_lens("kv_lens", kv_lens, B, q.device, k_cache.shape[2], 0, check_lens)
    if out is not None:
        check_like("out", out, q.shape, "q", q)
    _check_num_splits(num_splits)
    _check_max_block_m(max_block_m)
    if not use_triton(q.device, backend):
        if q.numel() == 0:
            return _finish(out, torch.empty(q.shape, dtype=q.dtype, device=q.device))
        return _finish(out, cross_attention_ref(q, k_cache, v_cache, kv_lens, sm_scale))
    _check_triton_dtype(q)
    return _launch(q, k_cache, v_cache, kv_lens, None, out, sm_scale, hi, num_splits, autotune,
                   max_block_m)


def _check_num_splits(num_splits):
    if num_splits is None:
        return
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")


def _check_max_block_m(max_block_m):
    if max_block_m is not None and max_block_m not in (16, 32, 64, 128):  # True == 1 is not among them
        raise ValueError(f"max_block_m must be None or one of 16, 32, 64, 128, got {max_block_m!r}")
