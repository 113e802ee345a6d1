"""Drafts on held-out prompts: mean accepted tokens per target forward (MAT) and tokens/s.

    python -m bench.draft_eval [--drafts glide=PATH cape=PATH:cape dyn=PATH:dynamic vanilla=PATH2]
                               [--batch-sizes 1 4] [--temperatures 0 1] [--max-new-tokens 128]
                               [--gamma 4] [--prompts bench/prompts/heldout.jsonl] [--limit N]
                               [--calibration] [--out FILE]

A draft spec is ``NAME=PATH[:TREE[,lookup=N][,ngrams=0|1]]`` with ``TREE`` one of ``chain``
(default), ``cape`` (the paper's bins), ``dynamic``, or ``dynamic-always`` (the dynamic tree
drafting at every step: ``fallback=False``); ``lookup=N`` sets a dynamic tree's prompt-lookup
tokens (``0`` turns them off; default: the tree's own); ``ngrams=0`` keeps its lookup off the
draft's corpus n-gram table (default: on, where the draft ships one). ``--calibration`` also runs the dynamic tree greedily at batch 1
with a recorder and stores the predicted-against-observed acceptance table, and stores the
verify-cost curve the dynamic tree sized itself with.

Every run goes through :func:`glide.api.generate` on one loaded target. For each
``(batch size, temperature)`` the runs are interleaved (``ar``, then every draft), so that slow
phases of a shared machine hit all of them alike; ``speedup`` is a draft's decode tokens/s over
``ar``'s in the same configuration. MAT is pooled over prompts (:func:`bench.e2e.aggregate`),
and also given per prompt kind (``chat``/``code``, from the prompts file). ``--out`` defaults to
``profiles/<device-slug>/draft-eval.json``; the file is rewritten after every run, so an
interrupted sweep keeps what it measured. Greedy rows also count the prompts whose output is
identical to ``ar``'s (``identical_to_ar``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from glide.api import TREES

from . import harness
from .e2e import aggregate

DEFAULT_PROMPTS = "bench/prompts/heldout.jsonl"


def _kinds(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[row.get("id")] = row.get("kind", "all")
    return out


def run(drafts: dict, prompts_path: Path, batch_sizes, temperatures, max_new_tokens, gamma, dtype,
        device, limit=None, out=None, progress=True, methods=("ar",)):
    from tqdm.auto import tqdm

    from glide import api

    prompts = api.read_prompts(prompts_path)[:limit]
    kinds = _kinds(prompts_path)
    dev = torch.device(device)
    dt = api.resolve_dtype(dtype, dev)
    env = harness.environment(dev, "draft-eval")
    loaded = api.load("ar", None, dev, dt)
    runs = [(m, None) for m in methods] + [("glide", (name, spec)) for name, spec in drafts.items()]
    api.generate(prompts[:1], method="ar", max_new_tokens=4, loaded=loaded, dtype=dt)  # warm-up
    rows = []
    meta = dict(env, prompts=str(prompts_path), prompt_ids=[p.id for p in prompts], dtype=str(dt),
                gamma=gamma, drafts={k: {"path": str(p), "tree": t} for k, (p, t) in drafts.items()},
                max_new_tokens=max_new_tokens)
    out = Path(out) if out else harness.results_path(env["device_slug"], "draft-eval")
    bar = tqdm(total=len(batch_sizes) * len(temperatures) * len(runs), desc="draft-eval", disable=not progress)
    for b in batch_sizes:
        for temp in temperatures:
            base, base_ids = None, None
            for method, draft in runs:
                name, (path, tree) = draft if draft else (method, (None, None))
                tree, lookup, ngrams = split_tree(tree)
                always = tree == "dynamic-always"
                start = time.perf_counter()
                res = api.generate(prompts, method=method, max_new_tokens=max_new_tokens, batch_size=b,
                                   temperature=temp, seed=0, draft=path, gamma=gamma,
                                   tree="dynamic" if always else tree, fallback=not always,
                                   lookup=lookup, ngrams=ngrams is not False, loaded=loaded, dtype=dt)
                wall = time.perf_counter() - start
                row = aggregate(res, method=name, batch_size=b, max_new_tokens=max_new_tokens,
                                wall_seconds=wall)
                row.update(temperature=temp, draft=str(path) if path else None, tree=tree, lookup=_lookup_used(tree, lookup),
                           ngrams=_ngrams_used(path, tree, lookup, ngrams),
                           gamma=gamma if path and not str(tree).startswith("dynamic") else None)
                for kind in sorted(set(kinds.get(p.id, "all") for p in prompts)):
                    part = [r for p, r in zip(prompts, res) if kinds.get(p.id, "all") == kind]
                    fw = sum(r["target_forwards"] for r in part)
                    row[f"mean_accepted_{kind}"] = sum(r["new_tokens"] - 1 for r in part) / fw if fw else None
                if method == "ar":
                    base, base_ids = row, [r["output_ids"] for r in res]
                elif temp == 0.0 and base is not None:
                    # greedy speculative output should equal ar's token for token (bf16 may part at near-ties)
                    row["identical_to_ar"] = sum(r["output_ids"] == ids for r, ids in zip(res, base_ids))
                row["speedup"] = (row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                                  if base and base["decode_tokens_per_s"] else None)
                rows.append(row)
                harness.write_results(out, rows, meta)
                bar.update(1)
                bar.set_postfix(last=f"{name} b{b} t{temp}: MAT {row['mean_accepted']:.2f}")
    bar.close()
    return rows, out, meta, loaded


TREE_KINDS = (*TREES, "dynamic-always")  # the API's trees, and the dynamic one never pausing


def _lookup_used(tree, lookup):
    """The prompt-lookup tokens a run's tree merged (``None`` for trees without lookup)."""
    if tree is None or not tree.startswith("dynamic"):
        return None
    from glide.draft.dynamic import LOOKUP

    return LOOKUP if lookup is None else lookup


def _ngrams_used(path, tree, lookup, ngrams):
    """Whether a run's lookup could fall back on the draft's corpus n-gram table (``None`` for
    trees without lookup). The run itself loaded and checked the table; this only asks
    whether the folder ships one."""
    if _lookup_used(tree, lookup) in (None, 0):
        return None
    from glide.api import check_draft_applies
    from glide.draft.checkpoint import _folder
    from glide.speculative.ngrams import NGRAMS

    folder = check_draft_applies("glide", str(path) if path else None)
    return ngrams is not False and (_folder(folder) / NGRAMS).is_file()


def split_tree(spec):
    """``(tree, lookup, ngrams)`` from a spec's ``TREE[,lookup=N][,ngrams=0|1]`` part
    (``lookup`` and ``ngrams`` ``None``: the defaults); ``(None, None, None)`` for ``None``.

    Raises
    ------
    ValueError
        For an unknown tree, another option, or an option on a tree that is not dynamic.
    """
    if spec is None:
        return None, None, None
    tree, *opts = spec.split(",")
    tree = tree or "chain"
    if tree not in TREE_KINDS:
        raise ValueError(f"unknown tree {tree!r}")
    lookup = ngrams = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "lookup" and value.isdigit() and tree.startswith("dynamic"):
            lookup = int(value)
        elif key == "ngrams" and value in ("0", "1") and tree.startswith("dynamic"):
            ngrams = value == "1"
        else:
            raise ValueError(f"unknown option {opt!r} for tree {tree!r} (dynamic trees take lookup=N "
                             f"and ngrams=0|1)")
    return tree, lookup, ngrams


def calibration_run(loaded, path, prompts_path, max_new_tokens, limit=None, temperature=0.0):
    """The uncalibrated dynamic tree at batch 1 with a recorder: the table of predicted ``v``
    against observed acceptance, with the rate the draft's shipped calibration (recorded on
    training prompts) expects at each bucket, if it ships one; the verify-cost curve; tree sizes."""
    from glide import api
    from glide.draft import load_draft
    from glide.draft.dynamic import load_calibration, record_calibration

    model, tok = loaded
    prompts = [api.encode_chat(tok, p.text) for p in api.read_prompts(prompts_path)[:limit]]
    rec, sizes, cost = record_calibration(model, load_draft(path, model), prompts, max_new_tokens,
                                          temperature, eos_token_ids=api.eos_ids(model.config, tok))
    table = rec.table()
    shipped = load_calibration(path, temperature)
    if shipped is not None:  # what the calibrated tree expects at each bucket's mean v
        f = shipped.mapping(torch.tensor([r["predicted"] for r in table], dtype=torch.float64))
        for row, x in zip(table, f.tolist()):
            row["shipped"] = x
    return {"table": table, "raw": rec.to_dict(), "temperature": temperature,
            "tree_sizes": {"mean": float(np.mean(sizes)), "min": int(min(sizes)), "max": int(max(sizes))},
            "verify_cost": {"sizes": cost.sizes, "seconds": cost.seconds, **cost.meta}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--drafts", nargs="*", default=None, metavar="NAME=PATH",
                   help="drafts to compare (default: glide=the shipped draft)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--no-ar", action="store_true", help="skip the ar baseline")
    p.add_argument("--calibration", action="store_true",
                   help="also record the dynamic tree's calibration (greedy and T=1, batch 1) with the first draft")
    p.add_argument("--out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from glide.draft import default_draft_path

    drafts = {}
    for item in args.drafts or [f"glide={default_draft_path()}"]:
        name, sep, spec = item.partition("=")
        path, _, tree = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        try:
            split_tree(tree or "chain")
        except ValueError as exc:
            p.error(f"argument --drafts: {exc}")
        if not sep:
            p.error(f"argument --drafts: expected NAME=PATH[:chain|cape|dynamic|dynamic-always[,lookup=N][,ngrams=0|1]], got {item!r}")
        drafts[name] = (path, tree or "chain")
    prompts = Path(args.prompts) if Path(args.prompts).is_absolute() else harness.REPO_ROOT / args.prompts
    rows, out, meta, loaded = run(drafts, prompts, args.batch_sizes, args.temperatures, args.max_new_tokens,
                                  args.gamma, args.dtype, args.device, args.limit, args.out,
                                  not args.no_progress, () if args.no_ar else ("ar",))
    if args.calibration:
        first = next(iter(drafts.values()))[0]
        meta["calibration"] = [calibration_run(loaded, first, prompts, args.max_new_tokens, args.limit, t)
                               for t in (0.0, 1.0)]
        harness.write_results(out, rows, meta)
        for cal in meta["calibration"]:
            print(f"calibration T={cal['temperature']}: tree sizes {cal['tree_sizes']}")
            for r in cal["table"]:
                shipped = f", shipped calibration {r['shipped']:.3f}" if r.get("shipped") is not None else ""
                print(f"  v in [{r['bucket'][0]:.2f}, {r['bucket'][1]:.2f}): {r['nodes']:6d} nodes, "
                      f"predicted {r['predicted']:.3f}, observed {r['observed']:.3f}{shipped}")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        r = dict(r, mean_accepted_chat=r.get("mean_accepted_chat"), mean_accepted_code=r.get("mean_accepted_code"))
        print(f"{r['method']:>10} b{r['batch_size']} T={r['temperature']}: MAT {r['mean_accepted']:.2f} "
              f"(chat {r.get('mean_accepted_chat') or float('nan'):.2f}, code {r.get('mean_accepted_code') or float('nan'):.2f}) "
              f"{r['decode_tokens_per_s']:.1f} tok/s {sp}"
              + (f" identical {r['identical_to_ar']}/{r['num_prompts']}" if "identical_to_ar" in r else ""))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
