"""How far a larger tree can lift a draft's acceptance: MAT by tree shape and size.

    python -m bench.tree_ceiling [--draft PATH] [--limit 16] [--max-new-tokens 96] [--out FILE]

Greedy, batch 1, bf16, held-out prompts, one loaded target. Rows: the GliDe chain at gamma 4
and 8, CaPE with the paper's bins, and the dynamic tree held at a fixed size (16, 32, 48, 64
nodes: no cost model, no growth check, ``min_expand=0``), each with MAT (emitted tokens per
target forward, the prefill's token left out), mean tree size and tokens/s, beside ``ar`` in
the same run. The fixed trees answer what the budget leaves out: how many tokens a step could
yield if verifying a wide tree were free. ``--out`` defaults to
``profiles/<device-slug>/tree-ceiling.json``, rewritten after every row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import harness
from .draft_eval import DEFAULT_PROMPTS

# (nodes, depth, top_k, beam) of the fixed-size dynamic trees
FIXED_TREES = ((16, 6, 8, 4), (32, 6, 8, 4), (48, 8, 8, 6), (64, 8, 10, 8))


def drafts(net):
    """``(name, factory)`` of every draft measured, in order; ``None`` makes ``ar``."""
    from glide.draft.cape import CapeDraft
    from glide.draft.dynamic import DynamicTreeDraft
    from glide.draft.runtime import GlideDraft

    out = [("ar", lambda: None), ("chain, gamma 4", lambda: GlideDraft(net, gamma=4)),
           ("chain, gamma 8", lambda: GlideDraft(net, gamma=8)), ("cape, paper bins", lambda: CapeDraft(net))]
    for n, depth, k, beam in FIXED_TREES:
        out.append((f"dynamic, fixed {n} nodes (depth {depth}, top-k {k}, beam {beam})",
                    lambda n=n, depth=depth, k=k, beam=beam: DynamicTreeDraft(
                        net, depth=depth, top_k=k, beam=beam, max_nodes=n, fixed_size=n, min_expand=0.0,
                        lookup=0)))  # the draft's own ceiling
    return out


def run(draft_path, limit, max_new_tokens, out=None, progress=True):
    from tqdm.auto import tqdm

    from glide import api
    from glide.draft.checkpoint import default_draft_path, load_draft
    from glide.speculative.engine import generate_ids

    dev = torch.device("cpu")
    env = harness.environment(dev, "tree-ceiling")
    target, tok = api.load("ar", None, dev, torch.bfloat16)[:2]
    draft_path = draft_path or default_draft_path()
    net = load_draft(draft_path, target)
    prompts = api.read_prompts(Path(DEFAULT_PROMPTS))[:limit]
    ids = [api.encode_chat(tok, p.text) for p in prompts]
    meta = dict(env, prompts=DEFAULT_PROMPTS, prompt_ids=[p.id for p in prompts], dtype="torch.bfloat16",
                temperature=0.0, batch_size=1, max_new_tokens=max_new_tokens, draft=str(draft_path))
    out = Path(out) if out else harness.results_path(env["device_slug"], "tree-ceiling")
    generate_ids(target, ids[:1], None, max_new_tokens=4)  # warm-up
    rows = []
    todo = drafts(net)
    bar = tqdm(total=len(todo), desc="tree-ceiling", disable=not progress)
    for name, make in todo:
        d = harness.decode_all(target, ids, 1, make, max_new_tokens)
        new, forwards, sizes, seconds = d["new"], d["forwards"], d["sizes"], d["seconds"]
        row = dict(draft=name, num_prompts=len(ids), mean_accepted=new / forwards,
                   mean_tree_size=sum(sizes) / len(sizes) if sizes else None,
                   tokens_per_s=(new + len(ids)) / seconds, seconds=seconds)
        row["vs_ar"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
        rows.append(row)
        harness.write_results(out, rows, meta)
        bar.update(1)
        bar.set_postfix(last=f"MAT {row['mean_accepted']:.2f}")
    bar.close()
    return rows, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tree_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", help="draft folder (default: the shipped draft)")
    p.add_argument("--limit", type=int, default=16, help="first N held-out prompts (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.limit < 1 or a.max_new_tokens < 2:
        p.error("--limit must be >= 1 and --max-new-tokens >= 2")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows, out = run(a.draft, a.limit, a.max_new_tokens, a.out, not a.no_progress)
    for r in rows:
        size = "-" if r["mean_tree_size"] is None else f"{r['mean_tree_size']:.1f}"
        print(f"{r['draft']:52s} MAT {r['mean_accepted']:.2f}  size {size:>5s}  "
              f"{r['tokens_per_s']:6.1f} tok/s ({r['vs_ar']:.2f}x)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
