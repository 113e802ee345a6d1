"""Collect draft training logs into ``profiles/<device-slug>/draft-training.json`` (for plots).

    python -m bench.draft_training glide=runs/smollm2/glide vanilla=runs/smollm2/vanilla [--out FILE]

Each run folder holds ``log.jsonl`` (one row a step), ``val.jsonl`` when it was trained with
``--val-shards``, and, when finished, ``draft/config.json`` whose card gives the recipe; a summary
row per run goes to ``rows``, the logs to ``runs`` and ``validation``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import harness


def _read_log(path: Path) -> list[dict]:
    """Rows of a JSONL log by step; a resumed run repeats the steps after its last checkpoint,
    so the last row of each step is kept."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def collect(runs: dict) -> tuple[list, dict, dict]:
    """Summary rows, training logs and validation logs (``val.jsonl``, may be empty) by run."""
    rows, logs, vals = [], {}, {}
    for name, folder in runs.items():
        folder = Path(folder)
        log = _read_log(folder / "log.jsonl")
        if not log:
            raise ValueError(f"{folder}: no training log (log.jsonl)")
        logs[name] = log
        vals[name] = _read_log(folder / "val.jsonl")
        cfg = folder / "draft" / "config.json"
        card = json.loads(cfg.read_text())["card"] if cfg.exists() else {}
        tail = log[-50:]
        rows.append({"run": name, "steps": log[-1]["step"], "seconds": log[-1]["seconds"],
                     "tokens": log[-1]["tokens"], "loss_last50": sum(r["loss"] for r in tail) / len(tail),
                     "top1_last50": sum(r["top1"] for r in tail) / len(tail),
                     "val_loss": vals[name][-1]["loss"] if vals[name] else None,
                     "val_top1": vals[name][-1]["top1"] if vals[name] else None,
                     "training": card.get("training"), "corpus": card.get("corpus"), "hardware": card.get("hardware")})
    return rows, logs, vals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_training", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=FOLDER")
    p.add_argument("--out")
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep:
            p.error(f"expected NAME=FOLDER, got {item!r}")
        runs[name] = folder
    rows, logs, vals = collect(runs)
    env = harness.environment(torch.device("cpu"), "draft-training")
    out = Path(args.out) if args.out else harness.results_path(env["device_slug"], "draft-training")
    harness.write_results(out, rows, env)
    data = json.loads(out.read_text())
    data["runs"] = logs
    data["validation"] = vals
    out.write_text(json.dumps(data) + "\n")
    for r in rows:
        print(f"{r['run']}: {r['steps']} steps, {r['seconds'] / 60:.1f} min, loss {r['loss_last50']:.3f}, "
              f"top-1 {r['top1_last50']:.3f} (last 50 steps)"
              + (f"; validation loss {r['val_loss']:.3f}, top-1 {r['val_top1']:.3f}" if r["val_loss"] is not None else ""))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
