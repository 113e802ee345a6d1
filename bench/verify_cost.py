"""What one target forward costs as the verified tree grows: the budget CaPE trees spend.

For each dtype, context length and tree size ``T``, times ``LlamaModel.forward`` over ``T``
new tokens (a CaPE-like spine with side leaves) after a prefix of ``context`` tokens, on the
embedded model. The ratio to ``T = 1`` is the break-even number of accepted tokens per step.

    python -m bench.verify_cost [--dtypes bfloat16 float32] [--contexts 128 512]
                                [--tree-sizes 1 2 4 8 16 32 64] [--batch 1]

Rows go to ``profiles/<device-slug>/verify-cost.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from glide.model.load import load_model

from . import harness, sweeps


def time_forward(model, batch, context, T, device, **timing):
    """Median/p20/p80 ms of one verification forward of ``T`` tree tokens after ``context``."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = model.new_cache(batch, context + T)
    prompts = torch.randint(3, vocab, (batch, context), generator=gen).tolist()
    model.prefill(prompts, cache)
    # a spine with one side leaf a level, cut to T slots (parents still come first)
    parents = sweeps.tree_parents({"kind": "cape", "spine": T // 2 + 1, "leaves": 1})[:T]
    mask = sweeps.ancestor_mask(parents)
    depth = mask.sum(-1) - 1
    tokens = torch.randint(3, vocab, (batch, T), generator=gen).to(device)
    mask = mask.to(device).expand(batch, T, T)
    pos = (cache.lens[:, None] + depth.to(device)[None, :])

    def run(_inputs):
        model.forward(tokens, pos, mask, cache)

    return harness.time_fn(run, [None], torch.device(device), **timing)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--tree-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results file (default profiles/<device-slug>/verify-cost.json)")
    ap.add_argument("--results-dir", metavar="DIR",
                    help="write DIR/<device-slug>/verify-cost.json unless --out is given (default: profiles)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    for name in args.dtypes:
        model, _ = load_model(dtype=getattr(torch, name), device=dev)
        for context in args.contexts:
            base = None
            for T in args.tree_sizes:
                t = time_forward(model, args.batch, context, T, args.device, warmup_ms=200, rep_ms=1500)
                base = base or t.median_ms
                row = {"dtype": name, "batch": args.batch, "context": context, "tree_len": T,
                       "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms,
                       "reps": t.reps, "vs_one_token": t.median_ms / base}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        del model
    meta = harness.environment(dev, "verify_cost")
    meta.update(torch_threads=torch.get_num_threads(), model="embedded SmolLM2-135M-Instruct",
                tree="spine with one side leaf a level, cut to tree_len slots")
    out = harness.write_results(
        args.out or harness.results_path(harness.device_slug(dev), "verify_cost", args.results_dir), rows, meta)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
