"""The dynamic tree with and without its growth check, against ``ar``, in one run.

    python -m bench.dynamic_growth [--batch-sizes 1 4] [--temperatures 0 1] [--limit 16]
                                   [--max-new-tokens 96] [--out FILE] [--no-progress]

:class:`glide.draft.dynamic.DynamicTreeDraft` asks, before growing a step's tree, whether the
draft forwards of its levels can pay for themselves (``_level_pays``). This runs the shipped
draft's dynamic tree twice per configuration, once with the check and once without
(``growth_check=False``, the behaviour before the check), interleaved with ``ar`` on the
same held-out prompts, bf16, so that the three share the machine's state. Rows: tokens/s over the
whole ``generate_ids`` call (prefill included), MAT (emitted tokens per target forward, the
prefill's token left out), mean tree size and draft forwards per step. ``--out`` defaults to
``profiles/<device-slug>/dynamic-growth.json``, rewritten after every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import harness
from .draft_eval import DEFAULT_PROMPTS


def _count_steps(model):
    """Wrap ``model.step`` to count the draft's forwards; returns the counter (a list)."""
    n = [0]
    step = model.step

    def counted(*args, **kwargs):
        n[0] += 1
        return step(*args, **kwargs)

    model.step = counted
    return n


def run(batch_sizes, temperatures, limit, max_new_tokens, out=None, progress=True):
    from tqdm.auto import tqdm

    from glide import api
    from glide.draft.checkpoint import default_draft_path, load_draft
    from glide.draft.dynamic import DynamicTreeDraft, load_calibration
    from glide.speculative.engine import generate_ids

    dev = torch.device("cpu")
    env = harness.environment(dev, "dynamic-growth")
    target, tok = api.load("ar", None, dev, torch.bfloat16)[:2]
    net = load_draft(default_draft_path(), target)
    calls = _count_steps(net)
    prompts = api.read_prompts(Path(DEFAULT_PROMPTS))[:limit]
    ids = [api.encode_chat(tok, p.text) for p in prompts]
    meta = dict(env, prompts=DEFAULT_PROMPTS, prompt_ids=[p.id for p in prompts], dtype="torch.bfloat16",
                max_new_tokens=max_new_tokens, draft=default_draft_path())
    out = Path(out) if out else harness.results_path(env["device_slug"], "dynamic-growth")
    generate_ids(target, ids[:1], None, max_new_tokens=4)  # warm-up
    rows = []
    methods = ("ar", "unchecked", "checked")
    bar = tqdm(total=len(batch_sizes) * len(temperatures) * len(methods), desc="dynamic-growth",
               disable=not progress)
    for b in batch_sizes:
        for temp in temperatures:
            cal = load_calibration(default_draft_path(), temp)
            # the verify-cost curve is measured (or read from the cache) at the first begin
            generate_ids(target, ids[:b], DynamicTreeDraft(net, calibration=cal), max_new_tokens=4)
            for method in methods:
                def make(method=method):
                    if method == "ar":
                        return None
                    # no pauses: every step drafts, so that only the growth check differs
                    return DynamicTreeDraft(net, calibration=cal, growth_check=method == "checked",
                                            fallback=False)
                calls[0] = 0
                d = harness.decode_all(target, ids, b, make, max_new_tokens, temp)
                new, forwards, sizes, seconds = d["new"], d["forwards"], d["sizes"], d["seconds"]
                steps = len(sizes)
                row = dict(method=method, batch_size=b, temperature=temp, num_prompts=len(ids),
                           tokens_per_s=(new + len(ids)) / seconds, mean_accepted=new / forwards,
                           mean_tree_size=sum(sizes) / len(sizes) if sizes else None,
                           draft_forwards_per_step=calls[0] / steps if steps else None, seconds=seconds)
                base = next((r for r in rows if r["batch_size"] == b and r["temperature"] == temp), row)
                row["vs_ar"] = row["tokens_per_s"] / base["tokens_per_s"]
                rows.append(row)
                harness.write_results(out, rows, meta)
                bar.update(1)
                bar.set_postfix(last=f"{method} b{b} t{temp}: {row['vs_ar']:.2f}x")
    bar.close()
    return rows, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dynamic_growth", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows, out = run(a.batch_sizes, a.temperatures, a.limit, a.max_new_tokens, a.out, not a.no_progress)
    for r in rows:
        size = "-" if r["mean_tree_size"] is None else f"{r['mean_tree_size']:.1f}"
        print(f"{r['method']:9s} b{r['batch_size']} t{r['temperature']}: {r['tokens_per_s']:6.1f} tok/s "
              f"({r['vs_ar']:.2f}x)  MAT {r['mean_accepted']:.2f}  size {size}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
