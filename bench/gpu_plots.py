"""Plots of a ``bench.gpu_check`` result: PNGs beside its ``gpu-check.json``.

    python -m bench.gpu_plots profiles/nvidia-h100-80gb-hbm3/gpu-check.json

- ``gpu-tree-attention.png``: tree attention GB/s by tree size T, one panel per head shape and
  context, the launcher's KV splits against the policy before the fix, with the copy
  bandwidth and 70% of it drawn across;
- ``gpu-forward.png``: one target forward, eager against CUDA-graph replay (log scale);
- ``gpu-e2e.png``: tokens/s of ``ar``, the oracle draft and transformers' ``generate()``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.plot import _save, plt  # pyplot on the Agg backend that bench.plot selects


def _rows(data: dict, step: str) -> list[dict]:
    return [r for r in data["rows"] if r.get("step") == step and "skipped" not in r]


def _title(data: dict, what: str) -> str:
    env = data.get("meta") or data.get("env", {})  # "env": files written before 2026-11-27
    return f"{what}: {env.get('device', '?')}, torch {env.get('torch', '?')}"


def plot_tree(data: dict, out: Path) -> Path | None:
    rows = [r for r in _rows(data, "tree") if r.get("heads") in ("llama8b", "smollm2")]
    if not rows:
        return None
    copy = next((r["gbps"] for r in _rows(data, "copy")), None)
    panels = sorted({(r["heads"], r["ctx"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (heads, ctx) in zip(axes[0], panels):
        sel = sorted((r for r in rows if (r["heads"], r["ctx"]) == (heads, ctx)), key=lambda r: r["T"])
        Ts = [r["T"] for r in sel]
        ax.plot(Ts, [r["default_gbps"] for r in sel], "o-", label="launcher default")
        ax.plot(Ts, [r.get("old_gbps") or r["default_gbps"] for r in sel], "s--", label="splits before")
        for n, style in ((64, "v:"), (128, "^:")):
            big = [r for r in sel if f"bm{n}_gbps" in r]
            if big:
                ax.plot([r["T"] for r in big], [r[f"bm{n}_gbps"] for r in big], style, label=f"{n}-row tiles")
        if copy:
            ax.axhline(copy, color="gray", lw=1, label=f"copy {copy:.0f} GB/s")
            ax.axhline(0.7 * copy, color="gray", lw=1, ls=":", label="70% of copy")
        ax.set_title(f"{heads} heads (group {sel[0]['group']}), ctx {ctx // 1024}k", fontsize=9)
        ax.set_xlabel("tree size T")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("GB/s (K/V + q + out)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(data, "tree attention, batch 1, bf16, CUDA-graph replay"), fontsize=10)
    return _save(fig, out / "gpu-tree-attention.png")


def plot_forward(data: dict, out: Path) -> Path | None:
    rows = _rows(data, "forward")
    if not rows:
        return None
    labels = [f"{r['shape']}\nb{r['batch']} T{r['T']}" + ("\nfused" if r.get("fused") else "")
              for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.8))
    ax.bar([i - 0.2 for i in x], [r["eager_us"] / 1e3 for r in rows], 0.4, label="eager")
    ax.bar([i + 0.2 for i in x], [r["graphed_us"] / 1e3 for r in rows], 0.4, label="CUDA graph")
    for i, r in enumerate(rows):
        ax.text(i, r["eager_us"] / 1e3, f"{r['eager_us'] / r['graphed_us']:.1f}x", ha="center",
                va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("ms per forward (ctx 512)")
    ax.legend(fontsize=8)
    ax.set_title(_title(data, "one target forward, random weights, bf16"), fontsize=10)
    return _save(fig, out / "gpu-forward.png")


def plot_e2e(data: dict, out: Path) -> Path | None:
    rows = [r for r in _rows(data, "e2e") if "method" in r]
    if not rows:
        return None
    groups = sorted({(r["shape"], r["batch"]) for r in rows})
    series = []
    for r in rows:
        key = f"{r['method']}/{r['mode']}"
        if key not in series:
            series.append(key)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 3.8))
    for j, key in enumerate(series):
        vals = []
        for g in groups:
            hit = [r for r in rows if (r["shape"], r["batch"]) == g and f"{r['method']}/{r['mode']}" == key]
            vals.append(hit[0]["tok_s_wall"] if hit else 0.0)
        ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(groups))], vals, width, label=key)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{s}\nbatch {b}" for s, b in groups], fontsize=8)
    ax.set_ylabel("tokens/s (wall, 128 new tokens)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(data, "end to end, random weights, bf16"), fontsize=10)
    return _save(fig, out / "gpu-e2e.png")


def plot_all(path: str | Path) -> list[Path]:
    """Write every plot the file has data for beside it; returns their paths."""
    path = Path(path)
    data = json.loads(path.read_text())
    made = [plot(data, path.parent) for plot in (plot_tree, plot_forward, plot_e2e)]
    return [p for p in made if p is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="plots of a bench.gpu_check result")
    ap.add_argument("results", help="a gpu-check.json")
    args = ap.parse_args(argv)
    if not Path(args.results).is_file():
        ap.error(f"results: no such file {args.results}")
    for p in plot_all(args.results):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
