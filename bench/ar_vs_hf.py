"""Our autoregressive runner (``ar``) against transformers' ``generate()`` (``hf``).

Same weights, same dtype, greedy, the same prompts; reports decode tokens/s of each, their
ratio, and whether the generated tokens are identical. Methods run interleaved, prompt by
prompt, so that load on the machine hits both alike.

    python -m bench.ar_vs_hf [--prompts bench/prompts/eval.jsonl] [--num-prompts 10]
                             [--max-new-tokens 64] [--dtypes float32 bfloat16] [--methods hf ar]
                             [--hog N]

``--hog N`` runs N busy-looping processes beside the timed decoding (bench/hog.py): how each
method holds up on a machine where N cores are taken by other work.

Rows go to ``profiles/<device-slug>/ar_vs_hf.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from glide import api

from . import harness
from .hog import cpu_hog

ROOT = Path(__file__).resolve().parent


def run(prompts, methods, dtypes, max_new_tokens, device):
    dev = torch.device(device)
    rows, summary = [], []
    for dtype_name in dtypes:
        dtype = api.DTYPES[dtype_name]
        loaded = {m: api.load(m, None, dev, dtype) for m in methods}
        for m in methods:  # warm-up, untimed
            api.generate([prompts[0]], method=m, max_new_tokens=4, loaded=loaded[m], device=device)
        per = {m: [] for m in methods}
        for p in tqdm(prompts, desc=f"{dtype_name}", unit="prompt"):
            for m in methods:
                (row,) = api.generate([p], method=m, max_new_tokens=max_new_tokens,
                                      loaded=loaded[m], device=device, dtype=dtype)
                per[m].append(row)
                rows.append({"dtype": dtype_name, "method": m, **{k: row[k] for k in (
                    "id", "new_tokens", "target_forwards", "seconds", "tokens_per_s", "output_ids")}})
        entry = {"dtype": dtype_name}
        for m in methods:
            toks = sum(r["new_tokens"] for r in per[m])
            secs = sum(r["seconds"] for r in per[m])
            entry[f"{m}_tokens_per_s"] = toks / secs
            entry[f"{m}_new_tokens"] = toks
        if len(methods) == 2:
            a, b = methods
            same = [ra["output_ids"] == rb["output_ids"] for ra, rb in zip(per[a], per[b])]
            entry["identical_outputs"] = f"{sum(same)}/{len(same)}"
            entry[f"ratio_{b}_over_{a}"] = entry[f"{b}_tokens_per_s"] / entry[f"{a}_tokens_per_s"]
        summary.append(entry)
        del loaded
    return rows, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(ROOT / "prompts" / "eval.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(api.DTYPES))
    ap.add_argument("--methods", nargs="+", default=["hf", "ar"], choices=list(api.METHODS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hog", type=int, default=0, metavar="N",
                    help="keep N cores busy with other processes while timing (default: 0)")
    ap.add_argument("--out", default=None, help="results file (default: profiles/<device>/ar_vs_hf.json)")
    args = ap.parse_args(argv)
    if args.hog < 0:
        ap.error(f"argument --hog: must be >= 0, got {args.hog}")
    prompts = api.read_prompts(args.prompts)[: args.num_prompts]
    start = time.perf_counter()
    with cpu_hog(args.hog):
        rows, summary = run(prompts, args.methods, args.dtypes, args.max_new_tokens, args.device)
    for s in summary:
        s["hog"] = args.hog
    dev = torch.device(args.device)
    out = Path(args.out) if args.out else harness.results_path(harness.device_slug(dev), "ar_vs_hf")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = harness.environment(dev, "ar_vs_hf")
    env.update(torch_threads=torch.get_num_threads(), hog_processes=args.hog, num_prompts=len(prompts),
               max_new_tokens=args.max_new_tokens, wall_seconds=time.perf_counter() - start)
    out.write_text(json.dumps({"meta": env, "summary": summary, "rows": rows}, indent=1) + "\n")
    for s in summary:
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()}))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
