"""Plots from results files: a separate step that only reads ``profiles/**/*.json``.

``--results-dir DIR`` reads ``DIR/**/*.json`` instead (``make plots``: ``runs/bench``).

``python -m bench.plot`` writes, next to each results file:

- kernel sweeps: ``<sweep>_time.png`` (median time vs context length, or vs rows for top-k,
  one line per impl, p20-p80 band) and ``<sweep>_bandwidth.png`` (achieved GB/s as a fraction
  of the copy bandwidth measured in the same run);
- ``e2e.json``: ``e2e.png``, decode tokens/s by method and batch size;
- ``verify-cost.json``: ``verify-cost.png``, one forward's time by verified-tree size;
- ``ar-vs-hf.json``: ``ar-vs-hf.png``, decode tokens/s of ``ar`` and ``hf`` by dtype;
- ``draft-eval.json``: ``draft-eval.png``, MAT and decode tokens/s by draft, batch size and
  temperature; with a calibration, ``draft-eval-calibration.png`` (observed against predicted
  acceptance) and ``draft-eval-verify-cost.png`` (the verify-cost curve the tree was sized with);
- ``draft-training.json``: ``draft-training.png``, training loss and teacher agreement by step
  (and the validation scores of runs trained with ``--val-shards``);
- ``bench.step_ops --time`` files (``step-time.json``): ``<stem>.png``, milliseconds a decode step
  by phase for each configuration, stacked, with the tokens a step and the throughput against
  the first configuration.

Each kernel panel shows one slice of the sweep: every shape field except the x axis is held
at its first value in the file, and the panel title says which.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from . import harness  # noqa: E402

# The x axis of each kernel's panel.
X_AXIS = {
    "tree_attention": "context",
    "cross_attention": "context",
    "compact_kv": "context",
    "cape_topk": "rows",
}
# Shape fields that restate another one (heads_name fixes the three head numbers).
_DERIVED = {"num_q_heads", "num_kv_heads", "head_dim", "T"}


def _slice(rows: list[dict], x: str) -> tuple[list[dict], dict]:
    """Rows that share the first-seen value of every shape field but ``x`` (and the dtype)."""
    first = rows[0]
    fixed = {k: v for k, v in first["shape"].items() if k != x and k not in _DERIVED}
    fixed["dtype"] = first["dtype"]
    keep = [r for r in rows if r["dtype"] == fixed["dtype"]
            and all(r["shape"].get(k) == v for k, v in fixed.items() if k != "dtype")]
    return keep, fixed


def _kernel_panels(rows: list[dict]) -> dict[str, tuple[list[dict], dict]]:
    panels = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        ok = [r for r in rows if r["kernel"] == kernel and r.get("status") == "ok"]
        if ok:
            panels[kernel] = _slice(ok, X_AXIS.get(kernel, "context"))
    return panels


def plot_kernels(data: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Time and bandwidth figures for one kernel results file; returns the PNG paths."""
    panels = _kernel_panels(data["rows"])
    if not panels:
        return []
    meta = data["meta"]
    written = []
    for what, ylabel in (("time", "median ms (p20-p80 band)"),
                         ("bandwidth", "achieved GB/s / copy GB/s")):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False)
        for ax, (kernel, (rows, fixed)) in zip(axes[0], panels.items()):
            x = X_AXIS.get(kernel, "context")
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["shape"][x])
                xs = [r["shape"][x] for r in pts]
                if what == "time":
                    ax.plot(xs, [r["median_ms"] for r in pts], marker="o", label=impl)
                    ax.fill_between(xs, [r["p20_ms"] for r in pts], [r["p80_ms"] for r in pts],
                                    alpha=0.2)
                else:
                    ys = [r["frac_copy"] for r in pts]
                    ax.plot(xs, [y if y is not None else float("nan") for y in ys],
                            marker="o", label=impl)
            ax.set_xscale("log", base=2)
            if what == "time":
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            fixed_text = textwrap.fill(", ".join(f"{k}={v}" for k, v in fixed.items()), 56)
            ax.set_title(f"{kernel}\n{fixed_text}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        copy = meta.get("copy_gbps")
        line2 = f"sweep {meta.get('sweep', stem)}"
        if copy:
            line2 += f" - copy {copy:.1f} GB/s"
        line2 += f" - {str(meta.get('git_sha', ''))[:12]}"
        fig.suptitle(f"{meta.get('device', '?')}\n{line2}", fontsize=9)
        written.append(_save(fig, out_dir / f"{stem}_{what}.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(data: dict[str, Any], out_dir: Path, stem: str = "e2e") -> list[Path]:
    """Decode tokens/s by method (bars) and batch size (groups), a panel per max_new_tokens."""
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    if not rows:
        return []
    lengths = sorted({r["max_new_tokens"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.0 * len(lengths), 4.0), squeeze=False)
    width = 0.8 / len(methods)
    for ax, n in zip(axes[0], lengths):
        for i, m in enumerate(methods):
            by_batch = {r["batch_size"]: r["decode_tokens_per_s"] for r in rows
                        if r["method"] == m and r["max_new_tokens"] == n}
            xs = [j + i * width for j in range(len(batches))]
            ax.bar(xs, [by_batch.get(b) or 0.0 for b in batches], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"max_new_tokens={n}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"end to end - {data['meta'].get('device', '?')}", fontsize=9)
    return [_save(fig, out_dir / f"{stem}.png")]


def plot_verify_cost(data: dict[str, Any], out_dir: Path, stem: str = "verify-cost") -> list[Path]:
    """One target forward's time by verified-tree size, a line per dtype and context."""
    rows = data["rows"]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for key in dict.fromkeys((r["dtype"], r["context"]) for r in rows):
        pts = sorted((r["tree_len"], r["median_ms"], r["p20_ms"], r["p80_ms"]) for r in rows
                     if (r["dtype"], r["context"]) == key)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", label=f"{key[0]}, context {key[1]}")
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree tokens verified in one forward")
    ax.set_ylabel("ms per forward (median, p20-p80)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"verification cost - {data['meta'].get('device', '?')}", fontsize=9)
    return [_save(fig, out_dir / f"{stem}.png")]


def plot_ar_vs_hf(data: dict[str, Any], out_dir: Path, stem: str = "ar-vs-hf") -> list[Path]:
    """Decode tokens/s of each method by dtype, from ``bench.ar_vs_hf``'s summary."""
    summary = data.get("summary") or []
    if not summary:
        return []
    methods = [k[: -len("_tokens_per_s")] for k in summary[0] if k.endswith("_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(summary))]
        ax.bar(xs, [s[f"{m}_tokens_per_s"] for s in summary], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(summary))])
    ax.set_xticklabels([f"{s['dtype']}\n(identical {s.get('identical_outputs', '?')})" for s in summary])
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"greedy decode - {data['meta'].get('device', '?')}", fontsize=9)
    return [_save(fig, out_dir / f"{stem}.png")]


def plot_draft_eval(data: dict[str, Any], out_dir: Path, stem: str = "draft-eval") -> list[Path]:
    """MAT and tokens/s per run, grouped by (batch, temperature); calibration and cost curves."""
    rows = data["rows"]
    if not rows:
        return []
    groups = list(dict.fromkeys((r["batch_size"], r["temperature"]) for r in rows))
    runs = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
    width = 0.8 / len(runs)
    for ax, field, label in ((axes[0], "mean_accepted", "tokens per target forward (MAT)"),
                             (axes[1], "decode_tokens_per_s", "decode tokens/s")):
        for i, name in enumerate(runs):
            vals = {(r["batch_size"], r["temperature"]): r[field] for r in rows if r["method"] == name}
            ax.bar([j + i * width for j in range(len(groups))], [vals.get(g) or 0.0 for g in groups], width,
                   label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"batch {b}\nT={t:g}" for b, t in groups])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    meta = data["meta"]
    fig.suptitle(f"drafts on {len(meta.get('prompt_ids', []))} held-out prompts, {meta.get('dtype', '')} - "
                 f"{meta.get('device', '?')}", fontsize=9)
    out = [_save(fig, out_dir / f"{stem}.png")]
    cals = meta.get("calibration") or []
    if cals:
        fig, ax = plt.subplots(figsize=(4.5, 4.0))
        for cal in cals:
            t = cal["table"]
            line, = ax.plot([r["predicted"] for r in t], [r["observed"] for r in t], marker="o",
                            label=f"T={cal['temperature']:g}, held-out prompts")
            shipped = [r for r in t if r.get("shipped") is not None]
            if shipped:  # the draft's calibration.json, recorded on training prompts
                ax.plot([r["predicted"] for r in shipped], [r["shipped"] for r in shipped], marker="x",
                        ls=":", color=line.get_color(), label=f"T={cal['temperature']:g}, shipped table")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        ax.set_xlabel("predicted acceptance (product of draft probabilities)")
        ax.set_ylabel("observed acceptance")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        ax.set_title("dynamic tree calibration", fontsize=9)
        out.append(_save(fig, out_dir / f"{stem}-calibration.png"))
        vc = cals[0]["verify_cost"]
        fig, ax = plt.subplots(figsize=(4.5, 4.0))
        ax.plot(vc["sizes"], [s * 1e3 for s in vc["seconds"]], marker="o")
        ax.set_xlabel("tree slots verified in one forward")
        ax.set_ylabel("ms per target forward")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"verify cost used by the dynamic tree (batch {vc.get('batch_size')})", fontsize=9)
        out.append(_save(fig, out_dir / f"{stem}-verify-cost.png"))
    return out


def plot_training(data: dict[str, Any], out_dir: Path, stem: str = "draft-training") -> list[Path]:
    """Loss and top-1 agreement with the teacher by step, a line per run (smoothed over 50 steps),
    and the validation scores as dashed lines where a run has them."""
    runs = data.get("runs") or {}
    if not runs:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    validation = data.get("validation") or {}
    for name, log in runs.items():
        steps = [r["step"] for r in log]
        val = validation.get(name) or []
        for ax, field in ((axes[0], "loss"), (axes[1], "top1")):
            vals = [r[field] for r in log]
            k = 50
            smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
            line, = ax.plot(steps, smooth, label=name)
            if val:
                ax.plot([r["step"] for r in val], [r[field] for r in val], "o--", ms=3,
                        color=line.get_color(), label=f"{name} (validation)")
    axes[0].set_ylabel("training loss (50-step mean)")
    axes[1].set_ylabel("top-1 agreement with the teacher")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return [_save(fig, out_dir / f"{stem}.png")]


def plot_file(path: Path, out_dir: Path | None = None) -> list[Path]:
    """Plot one results file; PNGs go to ``out_dir`` (default: the file's folder)."""
    path = Path(path)
    data = harness.read_results(path)
    out_dir = Path(out_dir) if out_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = data["rows"]
    sweep = data.get("meta", {}).get("sweep")
    if sweep == "verify_cost":
        return plot_verify_cost(data, out_dir, path.stem)
    if sweep == "ar_vs_hf":
        return plot_ar_vs_hf(data, out_dir, path.stem)
    if sweep == "draft-eval":
        return plot_draft_eval(data, out_dir, path.stem)
    if sweep == "draft-training":
        return plot_training(data, out_dir, path.stem)
    if rows and "ms_per_step" in rows[0]:
        return plot_step_time(data, out_dir, path.stem)
    if rows and "method" in rows[0]:
        return plot_e2e(data, out_dir, path.stem)
    return plot_kernels(data, out_dir, path.stem)


def plot_step_time(data: dict[str, Any], out_dir: Path, stem: str = "step-time") -> list[Path]:
    """Stacked ms per decode step by phase, one bar per configuration (``bench.step_ops --time``)."""
    rows = data["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    phases = [p for p in dict.fromkeys(r["phase"] for r in rows if r["phase"] != "total")
              if any(r["ms_per_step"] > 0 for r in rows if r["phase"] == p)]
    ms = {(r["config"], r["phase"]): r["ms_per_step"] for r in rows}
    total = {r["config"]: r for r in rows if r["phase"] == "total"}
    if not configs or not total:
        return []
    fig, ax = plt.subplots(figsize=(10.0, 2.2 + 0.7 * len(configs)))
    cmap = plt.get_cmap("tab20")
    for i, phase in enumerate(phases):
        left = [sum(ms.get((c, q), 0.0) for q in phases[:i]) for c in configs]
        ax.barh(range(len(configs)), [ms.get((c, phase), 0.0) for c in configs], left=left,
                color=cmap(i % 20), label=phase)
    first = total[configs[0]]
    # files written before tokens_per_step was a field ran at batch 1, where it equals the MAT
    rate0 = first.get("tokens_per_step", first["mean_accepted"]) / first["ms_per_step"]
    for j, c in enumerate(configs):
        t = total[c]
        per = t.get("tokens_per_step", t["mean_accepted"])
        ax.text(t["ms_per_step"], j, f"  {t['ms_per_step']:.1f} ms, {per:.2f} tokens, "
                f"{per / t['ms_per_step'] / rate0:.2f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(configs)))
    ax.set_yticklabels(configs)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step (one target forward after the prefill)")
    ax.set_xlim(0, max(t["ms_per_step"] for t in total.values()) * 1.45)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    meta = data.get("meta", {})
    ax.set_title(f"where a step's time goes, batch {meta.get('batch_size', 1)} - {meta.get('device', '')}",
                 fontsize=9)
    fig.tight_layout()
    out = out_dir / f"{stem}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="results files (default: RESULTS_DIR/**/*.json)")
    p.add_argument("--results-dir", metavar="DIR", help="where to look for results files when none are "
                   "named (default: profiles)")
    p.add_argument("--out-dir", help="write every PNG here instead of next to its file")
    args = p.parse_args(argv)
    root = Path(args.results_dir) if args.results_dir else harness.PROFILES_DIR
    files = [Path(f) for f in args.files] or sorted(root.glob("**/*.json"))
    if not files:
        print(f"no results files under {root}: run the benchmarks first (make bench)", file=sys.stderr)
        return 1
    for f in files:
        for png in plot_file(f, args.out_dir):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
