"""Collect draft training logs into ``profiles/<device-slug>/draft-training.json`` (for plots).

    python -m bench.draft_training glide=runs/smollm2/glide vanilla=runs/smollm2/vanilla [--out FILE]

Each run folder holds ``log.jsonl`` (one row a step) and, when finished, ``draft/config.json``
whose card gives the recipe; a summary row per run goes to ``rows``, the logs to ``runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import harness


def collect(runs: dict) -> tuple[list, dict]:
    rows, logs = [], {}
    for name, folder in runs.items():
        folder = Path(folder)
        log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if x.strip()]
        # a resumed run repeats the steps after its last checkpoint: keep the last of each
        by_step = {r["step"]: r for r in log}
        log = [by_step[k] for k in sorted(by_step)]
        logs[name] = log
        cfg = folder / "draft" / "config.json"
        card = json.loads(cfg.read_text())["card"] if cfg.exists() else {}
        tail = log[-50:]
        rows.append({"run": name, "steps": log[-1]["step"], "seconds": log[-1]["seconds"],
                     "tokens": log[-1]["tokens"], "loss_last50": sum(r["loss"] for r in tail) / len(tail),
                     "top1_last50": sum(r["top1"] for r in tail) / len(tail),
                     "training": card.get("training"), "corpus": card.get("corpus"), "hardware": card.get("hardware")})
    return rows, logs


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
    rows, logs = collect(runs)
    env = harness.environment(torch.device("cpu"), "draft-training")
    out = Path(args.out) if args.out else harness.results_path(env["device_slug"], "draft-training")
    harness.write_results(out, rows, env)
    data = json.loads(out.read_text())
    data["runs"] = logs
    out.write_text(json.dumps(data) + "\n")
    for r in rows:
        print(f"{r['run']}: {r['steps']} steps, {r['seconds'] / 60:.1f} min, loss {r['loss_last50']:.3f}, "
              f"top-1 {r['top1_last50']:.3f} (last 50 steps)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
