"""Compile the Triton kernels of :mod:`glide.kernels` ahead of time for NVIDIA GPUs, on a CPU.

Each case calls a launcher (``tree_attention``, ``cross_attention``, ``cape_topk``,
``compact_kv``, ``rope_store``, ``add_rms_norm``, ``silu_mul``) on ``meta`` tensors with every ``@triton.jit`` kernel it launches replaced by
a recorder. A recorded launch is then specialised exactly as ``JITFunction.run`` would
specialise it on a GPU (argument types, 16-byte divisibility, constexprs, ``num_warps`` and
``num_stages``) and compiled by ``triton.compile`` for a given ``GPUTarget``: Triton ships
``ptxas``, so this yields a cubin with no GPU and no driver. So the configurations compiled
are the ones the launchers choose, not a copy of their heuristics.

``meta`` tensors are free at any size (a 32k-token cache costs nothing), report
``data_ptr() == 0`` (aligned, like a CUDA allocation) and take the launchers' GPU paths
(``DOT_UPCAST`` is only for CPU tensors under the interpreter).

Must run in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces every
``@triton.jit`` function when the kernel modules are imported), hence the command line::

    python -m tests.aot_compile --out results.json [--shard 0/2]

It writes ``{"ptxas": ..., "cases": {case: [job, ...]}, "jobs": {job: result}}``, where a
result holds ``kernel``, ``arch``, ``constexprs``, ``num_warps``, ``num_stages``, ``pointers``
(the pointer arguments' types) and either
``shared`` (bytes), ``ptx_bytes``, ``cubin_bytes``, ``seconds`` or ``error``. With
``--shard i/n`` it compiles only every n-th distinct job; each shard still lists every case.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback

#: Largest dynamic shared memory one block may opt into, in bytes (CUDA programming guide,
#: compute capabilities table): 227 KiB on sm_90 (of the SM's 228 KiB), 163 KiB on sm_80.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

_DTYPES = ("float16", "bfloat16", "float32", "float64")

# ------------------------------------------------------------------------------ the cases
# Plain data, so that pytest can parametrise on them without importing the kernels.

# (name, kind, dtype, batch, q_len, num_q_heads, num_kv_heads, head_dim, max_seq)
# Chosen so that every BLOCK_M (16, 32, 64; 128 at head_dim 128) meets every head_dim (64; 80, padded to a 128 block
# and masked; 128), BLOCK_N 128 and 64 both occur, and in bfloat16 and float32 each pairing of
# tree / no tree with one split / several (plus the merge kernel) occurs. The caches are full
# (check_lens=False), so only a batch * num_kv_heads of at least 132 (H100 SMs) keeps one split.
_ATTN = [
    ("decode_d128_g8_long", "tree", 1, 1, 64, 8, 128, 32768),    # M16 N64, splits
    ("decode_d64_g1", "tree", 16, 1, 16, 16, 64, 1024),          # M16 N128, one split
    ("decode_d80_g3", "tree", 4, 1, 24, 8, 80, 4096),            # M16, D80
    ("tree_t7_d80_g3", "tree", 4, 7, 24, 8, 80, 2048),           # M32, D80
    ("tree_t7_d64_g3", "tree", 16, 7, 12, 4, 64, 2048),          # M32 N128
    ("tree_t7_d128_g8", "tree", 8, 7, 64, 8, 128, 4096),         # M64 (56 rows)
    ("tree_t64_d64_g1", "tree", 16, 64, 16, 16, 64, 4096),       # M64, T*G > BLOCK_M, one split
    ("tree_t64_d128_g1_long", "tree", 1, 64, 8, 8, 128, 32768),  # M64, splits
    ("tree_t32_d128_g4_long", "tree", 1, 32, 32, 8, 128, 32768),  # M128 (128 rows), splits
    ("cross_t7_d128_g8_long", "cross", 1, 7, 64, 8, 128, 32768),  # no tree, splits
    ("cross_t1_d64_g3", "cross", 32, 1, 24, 8, 64, 512),         # no tree, one split
]
# bfloat16 (the models' dtype) runs every shape; float16 and float32 a subset.
_ATTN_DTYPES = {
    "bfloat16": [a[0] for a in _ATTN],
    "float16": ["decode_d128_g8_long", "tree_t7_d80_g3", "tree_t64_d64_g1", "cross_t1_d64_g3"],
    "float32": ["decode_d128_g8_long", "tree_t7_d64_g3", "tree_t64_d64_g1", "cross_t7_d128_g8_long",
                "cross_t1_d64_g3"],
}
# (name, dtype, num_rows, vocab, k): SmolLM2's 49152 and Qwen2's 151936 vocabularies, one row
# (CaPE over a single sequence: many chunks) and 64 rows (few chunks), k 1 and 64 (K_PAD ends).
_TOPK = [
    ("v49152_k1_r1", "bfloat16", 1, 49152, 1),
    ("v49152_k64_r64", "bfloat16", 64, 49152, 64),
    ("v151936_k1_r64", "bfloat16", 64, 151936, 1),
    ("v151936_k64_r1", "bfloat16", 1, 151936, 64),
    ("v151936_k64_r1", "float16", 1, 151936, 64),
    ("v151936_k7_r8", "float32", 8, 151936, 7),
    ("v49152_k1_r1", "float32", 1, 49152, 1),
]
# (name, dtype, num_caches, batch, num_kv_heads, max_seq, head_dim, max_path, index dtype)
_COMPACT = [
    ("d128_p8", "float16", 48, 4, 8, 1024, 128, 8, "int64"),
    ("d80_p5", "bfloat16", 64, 2, 8, 512, 80, 5, "int32"),
    ("d64_p16", "float32", 8, 3, 4, 256, 64, 16, "int64"),
    ("d256_p1", "float64", 4, 1, 2, 64, 256, 1, "int64"),
]
# (name, dtype, batch, T, num_q_heads, num_kv_heads, head_dim, max_seq): SmolLM2's heads at
# decode, Llama-8B's over a tree, a head_dim of 80 (half 40: masked lanes), float32.
_ROPE = [
    ("smollm2_decode", "bfloat16", 1, 1, 9, 3, 64, 2048),
    ("llama8b_tree16", "bfloat16", 4, 16, 32, 8, 128, 4096),
    ("d80_tree7", "float16", 2, 7, 24, 8, 80, 1024),
    ("smollm2_tree7", "float32", 2, 7, 9, 3, 64, 512),
]
# (name, dtype, rows, hidden, with delta): SmolLM2's 576, Llama-8B's 4096, 8192; with and
# without the residual add; half and float32 rounding.
_NORM = [
    ("h576_add_r1", "bfloat16", 1, 576, True),
    ("h576_r16", "bfloat16", 16, 576, False),
    ("h4096_add_r64", "bfloat16", 64, 4096, True),
    ("h8192_add_r8", "float16", 8, 8192, True),
    ("h576_add_r4", "float32", 4, 576, True),
    ("h4096_r1", "float32", 1, 4096, False),
]
# (name, dtype, rows, intermediate): SmolLM2's 1536, Llama-8B's 14336, a tiny 56.
_SILU = [
    ("i1536_r1", "bfloat16", 1, 1536),
    ("i14336_r64", "bfloat16", 64, 14336),
    ("i1536_r16", "float16", 16, 1536),
    ("i56_r3", "float32", 3, 56),
]
# A100: one case of each kind and dtype family, enough to catch an sm_80-only failure.
_SM80 = {
    "rope-bfloat16-llama8b_tree16",
    "norm-bfloat16-h4096_add_r64",
    "silu-bfloat16-i14336_r64",
    "attention-bfloat16-decode_d128_g8_long",
    "attention-bfloat16-tree_t7_d80_g3",
    "attention-float32-tree_t64_d64_g1",
    "attention-float16-cross_t1_d64_g3",
    "topk-bfloat16-v151936_k64_r1",
    "compact-bfloat16-d80_p5",
}


def case_specs() -> list[dict]:
    """Every case as plain data: ``{"name", "arch", "kind", "dtype", "params"}``."""
    specs = []
    attn = {a[0]: a for a in _ATTN}
    for dtype, names in _ATTN_DTYPES.items():
        for n in names:
            _, kind, B, T, Hq, Hkv, D, S = attn[n]
            params = dict(kind=kind, batch=B, q_len=T, num_q_heads=Hq, num_kv_heads=Hkv,
                          head_dim=D, max_seq=S)
            specs.append(dict(name=f"attention-{dtype}-{n}", kind="attention", dtype=dtype,
                              params=params))
    for n, dtype, rows, vocab, k in _TOPK:
        specs.append(dict(name=f"topk-{dtype}-{n}", kind="topk", dtype=dtype,
                          params=dict(num_rows=rows, vocab=vocab, k=k)))
    for n, dtype, C, B, H, S, D, P, idx in _COMPACT:
        specs.append(dict(name=f"compact-{dtype}-{n}", kind="compact", dtype=dtype,
                          params=dict(num_caches=C, batch=B, num_kv_heads=H, max_seq=S,
                                      head_dim=D, max_path=P, index_dtype=idx)))
    for n, dtype, B, T, Hq, Hkv, D, S in _ROPE:
        specs.append(dict(name=f"rope-{dtype}-{n}", kind="rope", dtype=dtype,
                          params=dict(batch=B, q_len=T, num_q_heads=Hq, num_kv_heads=Hkv,
                                      head_dim=D, max_seq=S)))
    for n, dtype, rows, hidden, with_delta in _NORM:
        specs.append(dict(name=f"norm-{dtype}-{n}", kind="norm", dtype=dtype,
                          params=dict(rows=rows, hidden=hidden, with_delta=with_delta)))
    for n, dtype, rows, inter in _SILU:
        specs.append(dict(name=f"silu-{dtype}-{n}", kind="silu", dtype=dtype,
                          params=dict(rows=rows, intermediate=inter)))
    out = [dict(s, name=f"sm90-{s['name']}", arch=90) for s in specs]
    out += [dict(s, name=f"sm80-{s['name']}", arch=80) for s in specs if s["name"] in _SM80]
    return out


# ------------------------------------------------------------------------------ recording


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is kept."""

    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.fn, args, kwargs))

        return launch


def _patch_launchers(sink):
    """Replace every JIT kernel the launcher modules hold by a recorder; force the Triton path.

    Returns the names of the ``@triton.jit`` kernels defined in ``glide.kernels._jit`` that
    launchers hold, for the coverage check.
    """
    import glide.kernels._jit as jit_pkg
    from glide.kernels import activation, attention, compact, norm, rope, topk
    from triton.runtime.jit import JITFunction

    for mod in (attention, compact, topk, rope, norm, activation):
        mod.use_triton = lambda device, backend="auto": True
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__.startswith(jit_pkg.__name__):
                setattr(mod, name, _Recorder(obj, sink))


def jit_kernels() -> list[str]:
    """Names of the ``@triton.jit`` functions in ``glide.kernels._jit`` that are launched
    (public ones: a leading underscore marks a device helper, inlined into its callers)."""
    import importlib
    import pkgutil

    import glide.kernels._jit as jit_pkg
    from triton.runtime.jit import JITFunction

    names = []
    for info in pkgutil.iter_modules(jit_pkg.__path__):
        mod = importlib.import_module(f"{jit_pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__ and not name.startswith("_"):
                names.append(name)
    return sorted(names)


def _launch_case(spec):
    """Call the case's launcher on meta tensors (the patched kernels only record)."""
    import torch

    from glide.kernels import (add_rms_norm, cape_topk, compact_kv, cross_attention, rope_store,
                               silu_mul, tree_attention)

    meta = torch.device("meta")
    dtype = getattr(torch, spec["dtype"])
    p = spec["params"]
    if spec["kind"] == "attention":
        B, T, Hq, Hkv, D, S = (p[k] for k in ("batch", "q_len", "num_q_heads", "num_kv_heads",
                                              "head_dim", "max_seq"))
        q = torch.empty(B, T, Hq, D, dtype=dtype, device=meta)
        k = torch.empty(B, Hkv, S, D, dtype=dtype, device=meta)
        v = torch.empty(B, Hkv, S, D, dtype=dtype, device=meta)
        # check_lens=False: meta lengths have no values; the heuristic then assumes full caches.
        lens = torch.empty(B, dtype=torch.int32, device=meta)
        if p["kind"] == "tree":
            mask = torch.empty(B, T, T, dtype=torch.bool, device=meta)
            tree_attention(q, k, v, lens, mask, check_lens=False)
        else:
            cross_attention(q, k, v, lens, check_lens=False)
    elif spec["kind"] == "topk":
        logits = torch.empty(p["num_rows"], p["vocab"], dtype=dtype, device=meta)
        cape_topk(logits, p["k"], 0.7)
    elif spec["kind"] == "compact":
        idx = getattr(torch, p["index_dtype"])
        kv = torch.empty(p["num_caches"], p["batch"], p["num_kv_heads"], p["max_seq"],
                         p["head_dim"], dtype=dtype, device=meta)
        lens = torch.empty(p["batch"], dtype=idx, device=meta)
        path_idx = torch.empty(p["batch"], p["max_path"], dtype=idx, device=meta)
        path_lens = torch.empty(p["batch"], dtype=idx, device=meta)
        compact_kv(kv, lens, path_idx, path_lens, check_values=False)
    elif spec["kind"] == "rope":
        B, T, Hq, Hkv, D, S = (p[k] for k in ("batch", "q_len", "num_q_heads", "num_kv_heads",
                                              "head_dim", "max_seq"))
        # The runner's layout: qkv a view of the projection, the layer a slice of the cache.
        qkv = torch.empty(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, device=meta).view(B, T, -1, D)
        cos = torch.empty(B, T, D, dtype=dtype, device=meta)
        sin = torch.empty(B, T, D, dtype=dtype, device=meta)
        kv_layer = torch.empty(2, 2, B, Hkv, S, D, dtype=dtype, device=meta)[1]
        lens = torch.empty(B, dtype=torch.int64, device=meta)
        rope_store(qkv, cos, sin, kv_layer, lens, check_lens=False)
    elif spec["kind"] == "norm":
        x = torch.empty(p["rows"], p["hidden"], dtype=dtype, device=meta)
        delta = torch.empty_like(x) if p["with_delta"] else None
        weight = torch.empty(p["hidden"], dtype=dtype, device=meta)
        add_rms_norm(x, delta, weight, 1e-5)
    elif spec["kind"] == "silu":
        silu_mul(torch.empty(p["rows"], 2 * p["intermediate"], dtype=dtype, device=meta))
    else:
        raise ValueError(f"unknown case kind {spec['kind']!r}")


def _specialise(fn, args, kwargs, target):
    """What ``JITFunction.run`` would hand ``triton.compile`` for this launch on ``target``."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def _job_key(fn, src, options, arch):
    desc = f"{src.hash()}-{arch}-{options.num_warps}-{options.num_stages}"
    return f"{fn.__name__}-sm{arch}-{hashlib.sha1(desc.encode()).hexdigest()[:10]}"


def _compile(fn, src, options, arch, with_ptx=False):
    import triton
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    res = dict(
        kernel=fn.__name__,
        arch=arch,
        # The declared constexprs; arguments equal to 1 (unit strides) are constants too.
        constexprs={names[path[0]]: _plain(v) for path, v in sorted(src.constants.items())
                    if fn.params[path[0]].is_constexpr},
        num_warps=options.num_warps,
        num_stages=options.num_stages,
        pointers={k: v for k, v in src.signature.items() if v.startswith("*")},
    )
    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as e:  # a compiler error is the finding: keep its message
        res["error"] = f"{type(e).__name__}: {e}"[-4000:]
        res["traceback"] = traceback.format_exc()[-4000:]
        return res
    res.update(
        seconds=round(time.perf_counter() - t0, 2),
        shared=int(k.metadata.shared),
        ptx_bytes=len(k.asm.get("ptx", "")),
        cubin_bytes=len(k.asm.get("cubin", b"")),
    )
    if with_ptx:
        res["ptx"] = k.asm["ptx"]
    return res


def _plain(v):
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def _ptxas_version():
    """``ptxas --version``'s last line, or ``None`` when Triton has no usable ptxas."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        return get_ptxas_version(90).strip().splitlines()[-1]
    except Exception:
        return None


def run(shard=0, num_shards=1, names=None, with_ptx=False):
    """Record every case (or the ``names`` given) and compile this shard's distinct jobs
    (keeping each job's PTX text under ``"ptx"`` if ``with_ptx``)."""
    from triton.backends.compiler import GPUTarget

    out = {"ptxas": _ptxas_version(), "kernels": jit_kernels(), "cases": {}, "jobs": {}}
    if out["ptxas"] is None:
        return out
    sink = []
    _patch_launchers(sink)
    jobs = {}
    for spec in case_specs():
        if names is not None and spec["name"] not in names:
            continue
        del sink[:]
        _launch_case(spec)
        keys = []
        for fn, args, kwargs in sink:
            src, options = _specialise(fn, args, kwargs, GPUTarget("cuda", spec["arch"], 32))
            key = _job_key(fn, src, options, spec["arch"])
            jobs.setdefault(key, (fn, src, options, spec["arch"]))
            keys.append(key)
        out["cases"][spec["name"]] = keys
    for key in sorted(jobs)[shard::num_shards]:
        out["jobs"][key] = _compile(*jobs[key], with_ptx=with_ptx)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--shard", default="0/1", help="i/n: compile every n-th job from the i-th")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("aot_compile: unset TRITON_INTERPRET (the interpreter replaces the JIT kernels)")
    i, n = (int(x) for x in a.shard.split("/"))
    names = set(a.cases.split(",")) if a.cases else None
    with open(a.out, "w") as f:
        json.dump(run(i, n, names), f, indent=1)


if __name__ == "__main__":
    main()
