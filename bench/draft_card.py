"""Write a draft's ``CARD.md`` from its ``config.json`` card, a ``bench.draft_eval`` results file
and its ``calibration.json`` (when it ships one).

    python -m bench.draft_card DRAFT_DIR [--eval profiles/<slug>/draft-eval.json] [--name glide]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.harness import REPO_ROOT


def _repo_relative(path) -> str:
    """``path`` relative to the repository when it lies inside it (cards travel with the package)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except (TypeError, ValueError):
        return str(path)


def _fmt(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def stages(card: dict) -> list[dict]:
    """The training stages in a card, first to last (each continued draft keeps its
    predecessor's card under ``prior``)."""
    out, c = [], card
    while c:
        out.append(c)
        c = c.get("prior")
    return out[::-1]


def calibration_lines(body: dict) -> list[str]:
    """The card's section on a draft's ``calibration.json`` (predicted against observed
    acceptance by bucket, greedy and at temperature 1)."""
    from glide.draft.dynamic import Calibration

    info = body.get("info", {})
    tables = {k: Calibration.from_dict(v).table() for k, v in body.get("tables", {}).items()}
    keys = [k for k in ("greedy", "sampled") if k in tables]
    if not keys:
        return []
    lines = ["", "## Calibration of the dynamic tree",
             f"`calibration.json`: {info.get('prompts', '?')} prompts of corpus shard {info.get('corpus_shard', '?')} "
             f"(training distribution, not the held-out prompts), {info.get('max_new_tokens', '?')} new tokens each, "
             "decoded with the uncalibrated dynamic tree; `--tree dynamic` expects the observed rates. "
             "Predicted: the mean product of draft probabilities along a node's path.", "",
             "| bucket | " + " | ".join(f"{k} nodes | {k} predicted | {k} observed" for k in keys) + " |",
             "|---|" + "---|---|---|" * len(keys)]
    buckets = sorted({tuple(r["bucket"]) for k in keys for r in tables[k]})
    for b in buckets:
        cells = []
        for k in keys:
            r = next((r for r in tables[k] if tuple(r["bucket"]) == b), None)
            cells += ["-", "-", "-"] if r is None else [str(r["nodes"]), _fmt(r["predicted"], 3), _fmt(r["observed"], 3)]
        lines.append(f"| {b[0]:.2f}-{b[1]:.2f} | " + " | ".join(cells) + " |")
    return lines


def _turns(corpus: dict) -> str:
    later = corpus.get("later_turns", 0)
    if not later:
        return "each conversation's first user turn"
    return (f"{corpus.get('samples', 0) - later} conversations' first user turns and {later} later user turns, "
            "each without the turns before it")


def render(config: dict, evaluation: dict | None, name: str, notes=(), calibration: dict | None = None) -> str:
    card = config.get("card", {})
    cfg = config["config"]
    tr, corpus = card.get("training", {}), card.get("corpus", {})
    t = cfg["target"]
    vocab = cfg.get("draft_vocab")
    runs = stages(card)
    lines = [
        "# GliDe draft for SmolLM2-135M-Instruct",
        "",
        f"One GliDe layer ({cfg['num_layers']} layer(s), cross-attention {'on' if cfg['cross_attention'] else 'off'}) "
        f"over the target's last-layer K/V; embedding and head shared with the target "
        f"(head cut to {len(vocab) if vocab else t['vocab_size']} most frequent corpus tokens).",
        "",
        "## Training",
        f"- Data (last stage): {corpus.get('samples', '?')} self-distilled ShareGPT prompts ({_turns(corpus)}, "
        f"answered by the target; half greedy, half at temperature 1), {corpus.get('tokens', '?')} tokens, of which "
        f"{corpus.get('response_tokens', '?')} response tokens carry the loss. Held-out prompts "
        "(`glide.train.prompts.is_heldout`) were never answered.",
        f"- Recipe: loss `{tr.get('loss')}`, batch {tr.get('batch_size')} sequences, AdamW (linear warm-up, cosine "
        f"to 10% of the peak lr), gamma {tr.get('gamma')} (cross-mask blocks of {tr.get('gamma', 0) + 1}), "
        f"bf16 autocast {tr.get('bf16')}, seed {tr.get('seed')}.",
        f"- Hardware: {card.get('hardware', '?')}.",
        "",
        "| stage | start | samples | epochs | peak lr (warm-up) | steps | wall time | final loss | top-1 "
        "| validation loss | validation top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, c in enumerate(runs, 1):
        st, res = c.get("training", {}), c.get("result", {})
        start = f"stage {k - 1}" if k > 1 else f"`{st.get('init', '?')}` init"
        lines.append(f"| {k} | {start} | {c.get('corpus', {}).get('samples', '?')} | {st.get('epochs')} | "
                     f"{st.get('lr')} ({st.get('warmup_steps')}) | {res.get('steps')} | "
                     f"{_fmt(res.get('seconds', 0) / 60, 1)} min | {res.get('loss')} | {res.get('top1')} | "
                     f"{res.get('val_loss', '-')} | {res.get('val_top1', '-')} |")
    lines += ["",
              f"All stages: {sum(c.get('result', {}).get('steps', 0) for c in runs)} steps, "
              f"{_fmt(sum(c.get('result', {}).get('seconds', 0) for c in runs) / 60, 1)} min of training. "
              "Final loss and top-1 (agreement with the teacher's argmax) are the last step's batch; validation "
              "scores the last corpus shard(s) of the run, never trained on in that stage "
              "(`--val-shards`)."]
    lines += [f"- {n}" for n in notes]
    if evaluation:
        meta = evaluation["meta"]
        lines += ["", "## Measured acceptance and speed",
                  f"Held-out prompts `{_repo_relative(meta.get('prompts'))}` ({len(meta.get('prompt_ids', []))}), "
                  f"{meta.get('max_new_tokens')} new tokens, {meta.get('dtype')}, device {meta.get('device')}, "
                  f"git {meta.get('git_sha', '?')[:10]}; `python -m bench.draft_eval`.", "",
                  "| run | batch | temperature | MAT | MAT chat | MAT code | tok/s | vs ar |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in evaluation["rows"]:
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['temperature']} | {_fmt(r['mean_accepted'])} | "
                         f"{_fmt(r.get('mean_accepted_chat'))} | {_fmt(r.get('mean_accepted_code'))} | "
                         f"{_fmt(r['decode_tokens_per_s'], 1)} | {_fmt(r.get('speedup'))}x |")
        lines += ["", "MAT: tokens emitted per target forward after the prefill (1.0 for `ar`)."]
    if calibration:
        lines += calibration_lines(calibration)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_card", description=__doc__.split("\n\n")[0])
    p.add_argument("draft")
    p.add_argument("--eval")
    p.add_argument("--name", default="glide")
    p.add_argument("--note", action="append", default=[], help="a line to add under Training (repeatable)")
    args = p.parse_args(argv)
    d = Path(args.draft)
    config = json.loads((d / "config.json").read_text())
    evaluation = json.loads(Path(args.eval).read_text()) if args.eval else None
    cal = d / "calibration.json"
    calibration = json.loads(cal.read_text()) if cal.is_file() else None
    (d / "CARD.md").write_text(render(config, evaluation, args.name, args.note, calibration))
    print(f"-> {d / 'CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
