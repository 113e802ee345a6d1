"""Host cost per call of the kernel launchers, the Triton launch itself left out.

``python -m bench.launch_overhead [--device cpu|cuda] [--out runs/bench/launch-overhead.json]``

What is timed: one call of a public launcher (``tree_attention``, ``cross_attention``,
``cape_topk``, ``compact_kv``) or of its custom op (``torch.ops.glide.*``, see
:mod:`glide.kernels.ops`), with every ``@triton.jit`` kernel that the launcher modules hold
replaced by a stub whose ``kernel[grid](...)`` does nothing. What remains is the launchers'
own work: argument checks, the config heuristic, output and scratch allocation, the grid;
plus, for the ops, the dispatcher's round trip. Triton's own launch (argument binding, cache
lookup, the driver call; tens of microseconds of host time) is not in these numbers.

On the CPU the tensors are CPU tensors and ``TRITON_INTERPRET=1`` is set for the run, so the
dispatcher takes the Triton path (to the stubs); the interpreter itself never runs. CPU
allocations are cheaper than CUDA's caching allocator and no SM count is read, so a CUDA run
(``--device cuda``) is the number that matters for a GPU decode loop; it also times the real
launch (``mode="launch"``: wall-clock per call of the unstubbed launcher, synchronised once
at the end, which on these small shapes is host-bound).

The launchers run as a decode loop calls them: ``check_lens=False`` / ``check_values=False``
(no host read of the lengths). Shapes: SmolLM2-135M heads (9 query heads, 3 KV heads,
head_dim 64), batch 1, context 2048, tree sizes ``T`` in {1, 17, 64}; top-k over a vocab of
49152 with ``k = 8`` on ``T`` rows; compaction of 60 caches (30 layers of K and V) with a
path of ``T`` slots. bfloat16.

Each row: the median and the 20th/80th percentiles, in microseconds per call, over
``--samples`` samples of ``--calls`` back-to-back calls each, after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from . import harness

KERNELS = ("tree_attention", "cross_attention", "cape_topk", "compact_kv")
T_VALUES = (1, 17, 64)
HEADS = dict(num_q_heads=9, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
CONTEXT = 2048
VOCAB = 49152
TOPK = 8
NUM_CACHES = 60
DEFAULT_OUT = Path("runs/bench/launch-overhead.json")

# The kernel objects each launcher module holds (module attribute names).
_KERNEL_ATTRS = {
    "glide.kernels.attention": ("attention_fwd_kernel", "attention_merge_kernel", "_autotuned_fwd"),
    "glide.kernels.topk": ("topk_partial_kernel", "topk_merge_kernel"),
    "glide.kernels.compact": ("compact_kv_kernel",),
}


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    @staticmethod
    def _noop(*args, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._noop


@contextlib.contextmanager
def no_kernel_launches():
    """Replace the launcher modules' kernels by :class:`_NoLaunch` and set
    ``TRITON_INTERPRET=1`` (so CPU tensors take the Triton path); restore both on exit."""
    import importlib

    saved, old_env = [], os.environ.get("TRITON_INTERPRET")
    try:
        for mod_name, attrs in _KERNEL_ATTRS.items():
            mod = importlib.import_module(mod_name)
            for attr in attrs:
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, _NoLaunch())
        os.environ["TRITON_INTERPRET"] = "1"
        yield
    finally:
        for mod, attr, obj in saved:
            setattr(mod, attr, obj)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def make_calls(kernel: str, T: int, device: torch.device) -> dict[str, Callable[[], object]]:
    """``{"launcher": f, "op": g}``: zero-argument calls of ``kernel`` at tree size ``T``."""
    import glide.kernels as K
    import glide.kernels.ops  # noqa: F401 - registers torch.ops.glide.*

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    Hq, Hkv, D = HEADS["num_q_heads"], HEADS["num_kv_heads"], HEADS["head_dim"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    ops = torch.ops.glide
    if kernel in ("tree_attention", "cross_attention"):
        q = randn(1, T, Hq, D)
        k, v = randn(1, Hkv, CONTEXT, D), randn(1, Hkv, CONTEXT, D)
        lens = torch.tensor([CONTEXT - T], device=device)
        if kernel == "tree_attention":
            mask = torch.ones(T, T, dtype=torch.bool).tril().expand(1, T, T).to(device)
            return {
                "launcher": lambda: K.tree_attention(q, k, v, lens, mask, check_lens=False),
                "op": lambda: ops.tree_attention(q, k, v, lens, mask, None),
            }
        return {
            "launcher": lambda: K.cross_attention(q, k, v, lens, check_lens=False),
            "op": lambda: ops.cross_attention(q, k, v, lens),
        }
    if kernel == "cape_topk":
        logits = randn(T, VOCAB)
        return {
            "launcher": lambda: K.cape_topk(logits, TOPK, 0.8),
            "op": lambda: ops.cape_topk(logits, TOPK, 0.8),
        }
    if kernel == "compact_kv":
        kv = torch.zeros(NUM_CACHES, 1, Hkv, CONTEXT, D, dtype=dtype, device=device)
        lens = torch.tensor([CONTEXT - T], device=device)
        path_idx = torch.arange(T, device=device)[None]
        path_lens = torch.tensor([T], device=device)
        return {
            "launcher": lambda: K.compact_kv(kv, lens, path_idx, path_lens, check_values=False),
            "op": lambda: ops.compact_kv(kv, lens, path_idx, path_lens),
        }
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def time_per_call(fn: Callable[[], object], device: torch.device, calls: int, samples: int,
                  warmup: int) -> dict[str, float]:
    """Median, p20 and p80 microseconds per call over ``samples`` runs of ``calls`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    per_call = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    median, p20, p80 = harness._quantiles(per_call)
    return dict(us_median=median, us_p20=p20, us_p80=p80)


def run(device: torch.device, kernels=KERNELS, t_values=T_VALUES, calls: int = 200,
        samples: int = 25, warmup: int = 50, real_launch: bool | None = None) -> list[dict]:
    """Rows ``{kernel, path, mode, T, us_median, us_p20, us_p80, calls, samples}``.

    ``mode`` is ``"no-launch"`` (kernels stubbed) and, on CUDA unless ``real_launch`` is
    False, also ``"launch"`` (the real kernels).
    """
    if real_launch is None:
        real_launch = device.type == "cuda"
    rows = []
    modes = ["no-launch"] + (["launch"] if real_launch else [])
    for mode in modes:
        ctx = no_kernel_launches() if mode == "no-launch" else contextlib.nullcontext()
        with ctx:
            for kernel in kernels:
                for T in t_values:
                    for path, fn in make_calls(kernel, T, device).items():
                        stats = time_per_call(fn, device, calls, samples, warmup)
                        rows.append(dict(kernel=kernel, path=path, mode=mode, T=T, **stats,
                                         calls=calls, samples=samples))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per (kernel, mode, T): launcher and op medians (p20-p80) in us."""
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["mode"], r["T"]), {})[r["path"]] = r
    lines = [f"{'kernel':<16} {'mode':<9} {'T':>3}  {'launcher us':>20}  {'op us':>20}  {'op - launcher':>13}"]

    def cell(r):
        return f"{r['us_median']:7.1f} ({r['us_p20']:.1f}-{r['us_p80']:.1f})" if r else "-"

    for (kernel, mode, T), paths in by_key.items():
        la, op = paths.get("launcher"), paths.get("op")
        diff = f"{op['us_median'] - la['us_median']:+.1f}" if la and op else "-"
        lines.append(f"{kernel:<16} {mode:<9} {T:>3}  {cell(la):>20}  {cell(op):>20}  {diff:>13}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset")
    p.add_argument("--T", default=",".join(map(str, T_VALUES)), help="comma-separated tree sizes")
    p.add_argument("--calls", type=int, default=200, help="calls per sample")
    p.add_argument("--samples", type=int, default=25)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-real-launch", action="store_true", help="CUDA: skip the 'launch' rows")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        p.error(f"--kernels: unknown {sorted(unknown)}; choose from {KERNELS}")
    t_values = [int(t) for t in args.T.split(",") if t]
    rows = run(device, kernels, t_values, args.calls, args.samples, args.warmup,
               real_launch=False if args.no_real_launch else None)
    meta = dict(harness.environment(device, "launch-overhead"), how=__doc__.split("\n\n", 1)[1],
                heads=HEADS, context=CONTEXT, vocab=VOCAB, topk=TOPK, num_caches=NUM_CACHES,
                dtype="bfloat16", torch_threads=torch.get_num_threads())
    harness.write_results(args.out, rows, meta)
    print(format_table(rows))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
