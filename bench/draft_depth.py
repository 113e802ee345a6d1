"""Where a draft's agreement with the teacher comes from: by depth in the block, and by how stale
the target's cache is.

    python -m bench.draft_depth [--draft PATH] [--shard 95] [--limit 48] [--out FILE]

Scores a draft teacher-forced on one corpus shard's stored features (``runs/smollm2/corpus`` and
``runs/smollm2/features``, see ``glide train-draft``): top-1 agreement of the draft's argmax with
the teacher's on the response positions,

- **by depth**: with the training cross mask (blocks of ``gamma + 1``, sample ``i`` offset by
  ``i mod (gamma + 1)``), per position in the block. Depth 0 is a step's first draft token,
  which reads the target's cache up to the token before it;
- **by the teacher's confidence**: the same agreement by the teacher's probability of its own
  argmax, with each bucket's share of the positions (where a draft fails: on tokens the
  teacher itself is sure of, or on near-ties);
- **recall at k**: how often the teacher's argmax is among the draft's top ``k`` (1, 4, 8):
  what a tree with ``k`` children under a node can catch;
- **sampled acceptance**: the chance that a one-token draft is accepted when the target samples
  at temperature 1, for a draft token that is the draft's argmax (the engine's rule today)
  and for one sampled from the draft with the residual rule (lower bounds over the teacher's
  stored top-16);
- **by lag**: every query reads the target's cache up to ``lag`` positions before its own
  (lag 0: its own position too, which decoding never has; ``bos``: only position 0, i.e.
  next to nothing from the target).

A draft that uses the target's cache well gains from fresher views: depth 0 above depth 4,
small lags above large ones. ``--out`` defaults to ``profiles/<device-slug>/draft-depth.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import harness


def _masks(S: int, lag):
    pos = torch.arange(S)
    if lag == "bos":
        m = torch.zeros(S, S, dtype=torch.bool)
        m[:, 0] = True
        return m
    return pos[None, :] <= pos[:, None] - lag


def run(draft_path, shard, limit, corpus="runs/smollm2/corpus", features="runs/smollm2/features",
        lags=(0, 1, 2, 5, 20, "bos"), gamma=4):
    from glide.draft.checkpoint import load_draft
    from glide.model.load import load_model
    from glide.train.corpus import load_corpus
    from glide.train.features import open_shard_features
    from glide.train.trainer import TrainSettings, evaluate

    target, _ = load_model(None, dtype=torch.float32)
    draft = load_draft(draft_path, target)
    samples = load_corpus(corpus, slice(shard, shard + 1))
    feats = open_shard_features(corpus, features, slice(shard, shard + 1))
    settings = TrainSettings(gamma=gamma)
    base = evaluate(draft, samples, feats, settings, limit=limit)
    rows = [dict(kind="depth", depth=d, top1=t, positions=n)
            for d, (t, n) in enumerate(zip(base["top1_by_depth"], base["tokens_by_depth"]))]
    edges = base["confidence_edges"]
    rows += [dict(kind="confidence", confidence=[edges[i], edges[i + 1]], top1=t, positions=n,
                  share=n / max(base["tokens"], 1))
             for i, (t, n) in enumerate(zip(base["top1_by_confidence"], base["tokens_by_confidence"]))]
    rows += [dict(kind="recall", k=k, recall=r, positions=base["tokens"]) for k, r in base["recall"].items()]
    rows += [dict(kind="sampled_acceptance", draft_token=k, acceptance=a, positions=base["tokens"])
             for k, a in base["sampled_acceptance"].items()]
    for lag in lags:
        res = evaluate(draft, samples, feats, settings, limit=limit,
                       cross_mask=lambda S, shift, lag=lag: _masks(S, lag))
        rows.append(dict(kind="lag", lag=lag, top1=res["top1"], positions=res["tokens"]))
    return rows


def main(argv=None) -> int:
    from glide.draft.checkpoint import default_draft_path

    p = argparse.ArgumentParser(prog="python -m bench.draft_depth", description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", default=None, help="a draft folder (default: the shipped draft)")
    p.add_argument("--shard", type=int, default=95, help="corpus shard to score (default 95)")
    p.add_argument("--limit", type=int, default=48, help="first N samples of the shard")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = a.draft or default_draft_path()
    rows = run(path, a.shard, a.limit)
    env = harness.environment(torch.device("cpu"), "draft-depth")
    out = Path(a.out) if a.out else harness.results_path(env["device_slug"], "draft-depth")
    harness.write_results(out, rows, dict(env, draft=str(path), shard=a.shard, limit=a.limit))
    for r in rows:
        if r["kind"] == "recall":
            print(f"recall@{r['k']:<3d}   {r['recall']:.3f}  (the teacher's argmax among the draft's top {r['k']})")
            continue
        if r["kind"] == "sampled_acceptance":
            print(f"T=1 accept {r['acceptance']:.3f}  (a one-token draft, {r['draft_token'].replace('_', ' ')}; lower bound)")
            continue
        if r["kind"] == "confidence":
            what = "p {:.1f}-{:.1f}".format(*r["confidence"])
        else:
            what = f"{r['kind']} {r[r['kind']]}"  # depth N, lag N
        print(f"{what:10s} top-1 {r['top1']:.3f}  ({r['positions']} positions)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
