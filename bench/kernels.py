"""Kernel microbenchmarks: every kernel of :mod:`glide.kernels` against its baselines.

Run ``python -m bench.kernels`` (sweep chosen by device: ``gpu`` on CUDA, ``cpu`` otherwise)
or ``python -m bench.kernels --sweep bench/sweeps/my.json``. Rows go to
``profiles/<device-slug>/<sweep>.json``.

Implementations timed per kernel (``impl`` field of a row):

- ``glide:triton`` - the public launcher on CUDA (the Triton kernel);
  ``glide:torch-fallback`` - the same launcher on CPU with ``backend="reference"``: input
  checks plus the PyTorch reference. Triton's CPU interpreter is never timed.
- ``reference`` - :mod:`glide.kernels.reference`, called directly.
- ``sdpa-dense`` (attention) - ``F.scaled_dot_product_attention`` on KV heads repeated to the
  query heads, with a dense ``(B, 1, T, S)`` bool mask; the repeat and the mask are built
  outside the timed region, so the baseline gets its friendliest layout.
- ``flex-attention`` (tree attention, CUDA only) - compiled ``flex_attention`` with a block
  mask built from the tree, outside the timed region; compiled once per shape, and retried on
  its main kernel when the default choice (the decoding kernel) fails to compile. The options
  that ran are the row's ``config``.
- ``torch-softmax-topk`` (top-k) - ``torch.topk(torch.softmax(logits.float() / t))``.

Every row also records ``max_abs_err`` of that implementation against the reference on the
same inputs, so a fast but wrong kernel shows up in the data. A failure stays in its row
(``error`` for the launcher, ``skipped`` for a baseline, with the reason in ``note``) and the
sweep goes on. The results file is rewritten after every case, and a run stopped part-way
resumes where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from glide.kernels import reference as ref

from . import harness, traffic
from .sweeps import DTYPES, ancestor_mask, deepest_path, expand, load_sweep, tree_label, tree_parents

TOPK_TEMPERATURE = 0.8


@dataclass
class Impl:
    """One implementation of a kernel: ``prepare`` builds its per-copy arguments outside the
    timed region; ``call`` is what gets timed."""

    name: str
    prepare: Callable[[dict], Any]
    call: Callable[[Any], Any]
    config: dict | None = None
    skip: str | None = None  # reason the impl cannot run here


# --------------------------------------------------------------------------------------------
# Inputs and traffic
# --------------------------------------------------------------------------------------------


def case_shape(case: dict) -> dict:
    """The shape fields of a row (everything in the case but the kernel and dtype)."""
    shape = {k: v for k, v in case.items() if k not in ("kernel", "dtype")}
    if "tree" in shape:
        shape["tree"] = tree_label(case["tree"])
        shape["T"] = len(tree_parents(case["tree"]))
    return shape


def make_inputs(case: dict, device: torch.device, seed: int = 0) -> dict:
    """One copy of the inputs of ``case`` on ``device`` (random, fixed seed)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case["dtype"]]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)

    kernel = case["kernel"]
    if kernel in ("tree_attention", "cross_attention", "compact_kv"):
        B, Hkv, D = case["batch"], case["num_kv_heads"], case["head_dim"]
        ctx = case["context"]
    if kernel == "tree_attention":
        parents = tree_parents(case["tree"])
        T, Hq = len(parents), case["num_q_heads"]
        S = ctx + T
        return dict(
            q=randn(B, T, Hq, D),
            k_cache=randn(B, Hkv, S, D),
            v_cache=randn(B, Hkv, S, D),
            cache_seqlens=torch.full((B,), ctx, dtype=torch.int32, device=device),
            tree_mask=ancestor_mask(parents).expand(B, T, T).contiguous().to(device),
        )
    if kernel == "cross_attention":
        Tq, Hq = case["q_len"], case["num_q_heads"]
        return dict(
            q=randn(B, Tq, Hq, D),
            k_cache=randn(B, Hkv, ctx, D),
            v_cache=randn(B, Hkv, ctx, D),
            kv_lens=torch.full((B,), ctx, dtype=torch.int32, device=device),
        )
    if kernel == "cape_topk":
        return dict(logits=randn(case["rows"], case["vocab"]) * 4.0)
    if kernel == "compact_kv":
        parents = tree_parents(case["tree"])
        T = len(parents)
        path = deepest_path(parents)
        return dict(
            kv=randn(case["num_caches"], B, Hkv, ctx + T, D),
            cache_seqlens=torch.full((B,), ctx, dtype=torch.int32, device=device),
            path_idx=torch.tensor([path] * B, dtype=torch.int32, device=device),
            path_lens=torch.full((B,), len(path), dtype=torch.int32, device=device),
        )
    raise ValueError(f"unknown kernel {kernel!r}")


def input_nbytes(inputs: dict) -> int:
    """Total bytes of the tensors of one input copy."""
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def bytes_moved(case: dict) -> int:
    """Bytes the kernel of ``case`` must move (see :mod:`bench.traffic`)."""
    es = DTYPES[case["dtype"]].itemsize
    kernel = case["kernel"]
    if kernel == "tree_attention":
        B, T = case["batch"], len(tree_parents(case["tree"]))
        return traffic.tree_attention_bytes(
            B, T, case["num_q_heads"], case["num_kv_heads"], case["head_dim"],
            [case["context"]] * B, es,
        )
    if kernel == "cross_attention":
        B = case["batch"]
        return traffic.cross_attention_bytes(
            B, case["q_len"], case["num_q_heads"], case["num_kv_heads"], case["head_dim"],
            [case["context"]] * B, es,
        )
    if kernel == "cape_topk":
        return traffic.cape_topk_bytes(case["rows"], case["vocab"], case["k"], es)
    if kernel == "compact_kv":
        B = case["batch"]
        A = len(deepest_path(tree_parents(case["tree"])))
        return traffic.compact_kv_bytes(
            case["num_caches"], case["num_kv_heads"], case["head_dim"], [A] * B, es
        )
    raise ValueError(f"unknown kernel {kernel!r}")


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _launcher(kernel: str):
    import glide.kernels as gk

    return getattr(gk, kernel, None)


def _glide_impl(kernel: str, case: dict, device: torch.device) -> Impl:
    fn = _launcher(kernel)
    on_gpu = device.type == "cuda"
    name = "glide:triton" if on_gpu else "glide:torch-fallback"
    if fn is None:
        return Impl(name, None, None, skip=f"glide.kernels.{kernel} is not available yet")
    # On CPU, force the reference path: timing Triton's interpreter would be meaningless.
    backend = "triton" if on_gpu else "reference"
    cfg = _config(kernel, case, device) if on_gpu else None
    if kernel == "tree_attention":
        call = lambda x: fn(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"],  # noqa: E731
                            x["tree_mask"], backend=backend)
    elif kernel == "cross_attention":
        call = lambda x: fn(x["q"], x["k_cache"], x["v_cache"], x["kv_lens"], backend=backend)  # noqa: E731
    elif kernel == "cape_topk":
        call = lambda x: fn(x["logits"], case["k"], TOPK_TEMPERATURE, backend=backend)  # noqa: E731
    else:
        call = lambda x: fn(x["kv"], x["cache_seqlens"], x["path_idx"], x["path_lens"],  # noqa: E731
                            backend=backend)
    return Impl(name, lambda x: x, call, config=cfg)


def _config(kernel: str, case: dict, device: torch.device) -> dict | None:
    """The launch config the launcher will choose, when it exposes one."""
    try:
        if kernel in ("tree_attention", "cross_attention"):
            from glide.kernels.attention import attention_config

            if kernel == "tree_attention":
                q_len = len(tree_parents(case["tree"]))
                keys = case["context"] + q_len
            else:
                q_len, keys = case["q_len"], case["context"]
            cfg = attention_config(case["batch"], q_len, case["num_q_heads"], case["num_kv_heads"],
                                   case["head_dim"], keys, dtype=DTYPES[case["dtype"]], device=device)
            return cfg.as_dict()
        if kernel == "cape_topk":
            import triton

            from glide.kernels import topk

            k_pad = triton.next_power_of_2(case["k"])
            block_v, tiles, chunks = topk._chunking(case["rows"], case["vocab"], k_pad)
            return dict(block_v=block_v, tiles_per_chunk=tiles, num_chunks=chunks)
    except (ImportError, AttributeError):
        return None
    return None


def _repeat_kv(t: torch.Tensor, group: int, length: int) -> torch.Tensor:
    return t[:, :, :length].repeat_interleave(group, dim=1).contiguous()


def _sdpa_tree_prepare(x: dict) -> tuple:
    q, k, v = x["q"], x["k_cache"], x["v_cache"]
    B, T, Hq, _ = q.shape
    group = Hq // k.shape[1]
    lens = x["cache_seqlens"].long()
    S = int(lens.max()) + T
    rel = torch.arange(S, device=q.device)[None, :] - lens[:, None]  # (B, S)
    in_tree = (rel >= 0) & (rel < T)
    tm = torch.gather(x["tree_mask"], 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    mask = ((rel < 0)[:, None, :] | (in_tree[:, None, :] & tm))[:, None]  # (B, 1, T, S)
    return q.transpose(1, 2).contiguous(), _repeat_kv(k, group, S), _repeat_kv(v, group, S), mask


def _sdpa_cross_prepare(x: dict) -> tuple:
    q, k, v = x["q"], x["k_cache"], x["v_cache"]
    group = q.shape[2] // k.shape[1]
    S = int(x["kv_lens"].max())
    return q.transpose(1, 2).contiguous(), _repeat_kv(k, group, S), _repeat_kv(v, group, S), None


def _sdpa_call(a: tuple) -> torch.Tensor:
    q, k, v, mask = a
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


# The flex baseline compiles once per shape (dynamic=False: the fastest code for each). The GPU
# sweep has 96 tree-attention shapes, far past dynamo's default of 8 recompiles of one function,
# after which it would run flex_attention eagerly; a retry with other kernel options (below)
# compiles again.
FLEX_RECOMPILE_LIMIT = 512
# flex_attention picks its decoding kernel for fewer than 128 queries; that kernel holds
# T * (query heads per KV head) rows in one block, and at T = 37 or 64 with group 4 and d = 128
# no config fits (NoValidChoicesError on the H100 with torch 2.11), so a failing case retries on
# the main kernel.
FLEX_RETRY_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}
_FLEX = None


def _raise_recompile_limit(limit: int) -> dict:
    """Lift dynamo's per-function recompile limit (``recompile_limit``, ``cache_size_limit``
    before torch 2.6) and the total over all functions to at least ``limit``."""
    import torch._dynamo.config as dynamo_config

    set_to = {}
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is not None:
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))
            set_to[name] = getattr(dynamo_config, name)
    return set_to


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _raise_recompile_limit(FLEX_RECOMPILE_LIMIT)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def _flex_impl(device: torch.device, flex: Callable | None = None) -> Impl:
    """The flex_attention baseline of one case. ``flex`` replaces the compiled
    ``flex_attention`` (tests pass the eager one to run it on the CPU)."""
    name = "flex-attention"
    if device.type != "cuda" and flex is None:
        return Impl(name, None, None, skip="flex_attention is timed on CUDA only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        return Impl(name, None, None, skip=f"flex_attention unavailable: {exc}")
    flex = flex or _compiled_flex()
    config: dict = {"kernel_options": None}  # the options that ran, filled by the first call
    block_mask = {}
    state = {"chosen": False}

    def prepare(x):
        q, k, v = x["q"], x["k_cache"], x["v_cache"]
        B, T = q.shape[:2]
        S = int(x["cache_seqlens"].max()) + T
        # One block mask for every input copy (the copies hold the same lengths and tree): a
        # mask_mod closing over each copy's tensors would be a new graph input per copy.
        if not block_mask:
            lens = x["cache_seqlens"].long()
            tm = x["tree_mask"]

            def mask_mod(b, h, q_idx, kv_idx):
                rel = kv_idx - lens[b]
                in_tree = (rel >= 0) & (rel < T)
                return (rel < 0) | (in_tree & tm[b, q_idx, rel.clamp(0, T - 1)])

            block_mask["bm"] = create_block_mask(mask_mod, B, None, T, S, device=q.device)
        return q.transpose(1, 2), k[:, :, :S], v[:, :, :S], block_mask["bm"]

    def run(a, options):
        q, k, v, bm = a
        return flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options).transpose(1, 2)

    def call(a):
        if state["chosen"]:
            return run(a, config["kernel_options"])
        try:  # the first call compiles: default options, then the main kernel
            out = run(a, None)
        except Exception as first:  # noqa: BLE001 - a compile failure of one shape
            try:
                out = run(a, dict(FLEX_RETRY_OPTIONS))
            except Exception as second:  # noqa: BLE001
                raise RuntimeError(
                    f"default options: {type(first).__name__}: {str(first)[:200]}; "
                    f"{FLEX_RETRY_OPTIONS}: {type(second).__name__}: {str(second)[:200]}"
                ) from second
            config["kernel_options"] = dict(FLEX_RETRY_OPTIONS)
            config["default_options_error"] = f"{type(first).__name__}: {str(first)[:200]}"
        state["chosen"] = True
        return out

    return Impl(name, prepare, call, config=config)


def impls_for(case: dict, device: torch.device) -> list[Impl]:
    """The implementations timed for ``case`` on ``device``, the launcher first."""
    kernel = case["kernel"]
    ident = lambda x: x  # noqa: E731
    impls = [_glide_impl(kernel, case, device)]
    if kernel == "tree_attention":
        impls += [
            Impl("reference", ident, lambda x: ref.tree_attention_ref(
                x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["tree_mask"])),
            Impl("sdpa-dense", _sdpa_tree_prepare, _sdpa_call),
            _flex_impl(device),
        ]
    elif kernel == "cross_attention":
        impls += [
            Impl("reference", ident, lambda x: ref.cross_attention_ref(
                x["q"], x["k_cache"], x["v_cache"], x["kv_lens"])),
            Impl("sdpa-dense", _sdpa_cross_prepare, _sdpa_call),
        ]
    elif kernel == "cape_topk":
        k = case["k"]
        impls += [
            Impl("reference", ident, lambda x: ref.cape_topk_ref(x["logits"], k, TOPK_TEMPERATURE)),
            Impl("torch-softmax-topk", ident, lambda x: torch.topk(
                torch.softmax(x["logits"].float() / TOPK_TEMPERATURE, dim=-1), k, dim=-1)),
        ]
    elif kernel == "compact_kv":
        impls += [
            Impl("reference", ident, lambda x: ref.compact_kv_ref(
                x["kv"], x["cache_seqlens"], x["path_idx"], x["path_lens"])),
        ]
    return impls


def _max_err(kernel: str, out, want) -> float | None:
    """Largest absolute difference from the reference's output (None for in-place kernels)."""
    if kernel == "compact_kv" or out is None or want is None:
        return None
    if kernel == "cape_topk":
        out, want = out[0], want[0]  # probabilities; ids may swap on exact ties
    return float((out.double() - want.double()).abs().max())


# --------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _failed_status(impl: Impl) -> str:
    """A failing launcher is an error (a bug to fix); a failing baseline or reference is a skip
    with its reason (that implementation cannot run this shape here: flex_attention finding no
    kernel config, the reference running out of memory at long contexts)."""
    return "error" if impl.name.startswith("glide:") else "skipped"


def run_case(case: dict, device: torch.device, copy_gbps: float | None, env: dict,
             timing_kw: dict | None = None, memory_budget: int = 1 << 30) -> list[dict]:
    """Time every implementation of one case; one row per implementation.

    Any failure stays in the case: an implementation that raises gets a row with the reason in
    ``note`` (status ``error`` for the launcher, ``skipped`` otherwise), and inputs that cannot
    be built (out of memory) give every implementation a skipped row.
    """
    timing_kw = timing_kw or {}
    nbytes = bytes_moved(case)
    impls = impls_for(case, device)

    def row_of(impl: Impl) -> dict:
        return dict(kernel=case["kernel"], impl=impl.name, dtype=case["dtype"],
                    shape=case_shape(case), config=impl.config, copies=n, note=None)

    def finish(row: dict, t, err) -> dict:
        row["max_abs_err"] = err
        row.update(harness.timing_fields(t, nbytes, copy_gbps))
        row.update(env)
        return row

    n = None
    try:
        first = make_inputs(case, device, seed=0)
        n = harness.num_copies(input_nbytes(first), device, budget_bytes=memory_budget)
        copies = [first] + [{k: v.clone() for k, v in first.items()} for _ in range(n - 1)]
    except Exception as exc:  # noqa: BLE001 - one case's inputs failing is data, not a crash
        note = f"inputs: {_failure(exc)}"
        return [finish(dict(row_of(i), status="skipped", note=note), None, None) for i in impls]
    want, want_note = None, None
    if case["kernel"] != "compact_kv":
        try:
            want = impls[1].call(first)  # the reference, on copy 0
        except Exception as exc:  # noqa: BLE001
            want_note = f"no max_abs_err: the reference failed ({_failure(exc)})"
    rows = []
    for impl in impls:
        row = row_of(impl)
        t = None
        err = None
        if impl.skip:
            row.update(status="skipped", note=impl.skip)
        else:
            args = None
            try:
                args = [impl.prepare(c) for c in copies]
                err = _max_err(case["kernel"], impl.call(args[0]), want)
                t = harness.time_fn(impl.call, args, device, **timing_kw)
                row.update(status="ok", note=want_note)
            except Exception as exc:  # noqa: BLE001 - a failing implementation is data
                row.update(status=_failed_status(impl), note=_failure(exc))
            del args  # row["config"] is impl.config itself: flex's first call fills it in place
        rows.append(finish(row, t, err))
    return rows


def case_key(kernel: str, dtype: str, shape: dict) -> str:
    """Identifies a case among the rows of a results file (one row per impl shares it)."""
    return json.dumps([kernel, dtype, shape], sort_keys=True)


def _resumable(out: Path | None, env: dict) -> dict | None:
    """The results at ``out`` when they are an unfinished run of the same sweep, device and
    code (``meta.complete`` false); None otherwise, and the run starts afresh."""
    if out is None or not Path(out).exists():
        return None
    try:
        data = harness.read_results(out)
    except (ValueError, OSError):
        return None
    meta = data["meta"]
    same = all(meta.get(k) == env[k] for k in ("sweep", "device_slug", "git_sha", "torch"))
    return data if same and meta.get("complete") is False else None


def run_sweep(sweep: dict, device: torch.device, kernels: list[str] | None = None,
              limit: int | None = None, progress: bool = True, out: str | Path | None = None,
              resume: bool = True) -> tuple[list[dict], dict]:
    """Run every case of ``sweep`` on ``device``; returns ``(rows, meta)``.

    With ``out``, the results file is rewritten after every case (atomically: a temporary file
    renamed over it) with ``meta.complete`` false until the last case, so a run stopped at a time
    limit keeps every finished case. With ``resume``, a run finds such an unfinished file of the
    same sweep, device, git sha and torch and skips the cases already in it.
    """
    from tqdm.auto import tqdm

    timing_kw = dict(sweep.get("timing", {}))
    cases = expand(sweep, kernels)[:limit]
    env = harness.environment(device, sweep["name"])
    earlier = _resumable(out, env) if resume else None
    found: dict[str, set] = {}
    for r in earlier["rows"] if earlier else []:
        found.setdefault(case_key(r["kernel"], r["dtype"], r["shape"]), set()).add(r["impl"])
    todo, done = [], set()
    for c in cases:
        key = case_key(c["kernel"], c["dtype"], case_shape(c))
        if found.get(key, set()) >= {i.name for i in impls_for(c, device)}:
            done.add(key)
        else:
            todo.append(c)
    # rows of a case that lacks some impl (or is not in this run) are dropped; it runs again
    rows = [r for r in (earlier["rows"] if earlier else [])
            if case_key(r["kernel"], r["dtype"], r["shape"]) in done]
    # A resumed run keeps the copy bandwidth its rows were divided by.
    if earlier:
        copy_gbps = earlier["meta"]["copy_gbps"]
    else:
        copy_gbps = harness.copy_bandwidth(device, **timing_kw)
    budget = (1 << 30) if device.type == "cuda" else (512 << 20)
    meta = dict(env, copy_gbps=copy_gbps, timing=timing_kw, num_cases=len(cases),
                torch_threads=torch.get_num_threads(),
                description=sweep.get("description", ""),
                impl_note=("CPU rows time PyTorch (the references, the launchers' torch fallback, "
                           "SDPA), never the Triton kernels or Triton's interpreter."
                           if device.type == "cpu" else "CUDA rows: glide:triton is the Triton kernel."),
                complete=False, resumed_cases=len(done))
    for case in tqdm(todo, desc=f"{sweep['name']} on {device.type}", unit="case",
                     disable=not progress):
        rows += run_case(case, device, copy_gbps, env, timing_kw, memory_budget=budget)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out is not None:
            harness.write_results(out, rows, meta)
    meta["complete"] = True
    if out is not None:
        harness.write_results(out, rows, meta)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--sweep", help="sweep name in bench/sweeps or a JSON path "
                   "(default: 'gpu' on CUDA, 'cpu' otherwise)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--kernels", help="comma-separated subset of kernels")
    p.add_argument("--limit", type=int, help="run only the first N cases (smoke tests)")
    p.add_argument("--out", help="results file (default profiles/<device-slug>/<sweep>.json)")
    p.add_argument("--results-dir", metavar="DIR",
                   help="write DIR/<device-slug>/<sweep>.json unless --out is given (default: profiles)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on "
                   "a shared machine 1 avoids timing threads that wait for a descheduled peer")
    p.add_argument("--fresh", action="store_true", help="start over even when the results file "
                   "is an unfinished run of this sweep (by default the run resumes it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    sweep = load_sweep(args.sweep or ("gpu" if device.type == "cuda" else "cpu"))
    kernels = args.kernels.split(",") if args.kernels else None
    out = args.out or harness.results_path(harness.device_slug(device), sweep["name"],
                                           args.results_dir)
    rows, meta = run_sweep(sweep, device, kernels, args.limit, progress=not args.no_progress,
                           out=out, resume=not args.fresh)
    if meta["resumed_cases"]:
        print(f"resumed {out}: {meta['resumed_cases']} of {meta['num_cases']} cases were done")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} rows ({ok} timed) -> {out}; copy bandwidth {meta['copy_gbps']:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
