"""Write a draft's ``CARD.md`` from its ``config.json`` card and a ``bench.draft_eval`` results file.

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


def render(config: dict, evaluation: dict | None, name: str) -> str:
    card = config.get("card", {})
    cfg = config["config"]
    tr, res, corpus = card.get("training", {}), card.get("result", {}), card.get("corpus", {})
    t = cfg["target"]
    vocab = cfg.get("draft_vocab")
    lines = [
        "# GliDe draft for SmolLM2-135M-Instruct",
        "",
        f"One GliDe layer ({cfg['num_layers']} layer(s), cross-attention {'on' if cfg['cross_attention'] else 'off'}) "
        f"over the target's last-layer K/V; embedding and head shared with the target "
        f"(head cut to {len(vocab) if vocab else t['vocab_size']} most frequent corpus tokens).",
        "",
        "## Training",
        f"- Data: {corpus.get('samples', '?')} self-distilled ShareGPT conversations (first user turn, answered by "
        f"the target; half greedy, half at temperature 1), {corpus.get('tokens', '?')} tokens, of which "
        f"{corpus.get('response_tokens', '?')} response tokens carry the loss. Held-out prompts "
        "(`glide.train.prompts.is_heldout`) were never answered.",
        f"- Recipe: loss `{tr.get('loss')}`, {tr.get('epochs')} epochs, batch {tr.get('batch_size')} sequences, "
        f"AdamW lr {tr.get('lr')} (warm-up {tr.get('warmup_steps')}, cosine to 10%), gamma {tr.get('gamma')} "
        f"(cross-mask blocks of {tr.get('gamma', 0) + 1}), bf16 autocast {tr.get('bf16')}, seed {tr.get('seed')}.",
        f"- Steps: {res.get('steps')}; loss tokens seen: {res.get('tokens')}; training wall time "
        f"{_fmt(res.get('seconds', 0) / 60, 1)} min (training stage only).",
        f"- Final training loss {res.get('loss')}, top-1 agreement with the teacher {res.get('top1')} (last step's batch).",
        f"- Hardware: {card.get('hardware', '?')}.",
    ]
    if tr.get("init_from"):
        lines.insert(-3, f"- Continued from the draft `{tr['init_from']}` (its own card gives its recipe and "
                         "time); the steps and time below are this stage's only.")
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
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_card", description=__doc__.split("\n\n")[0])
    p.add_argument("draft")
    p.add_argument("--eval")
    p.add_argument("--name", default="glide")
    args = p.parse_args(argv)
    d = Path(args.draft)
    config = json.loads((d / "config.json").read_text())
    evaluation = json.loads(Path(args.eval).read_text()) if args.eval else None
    (d / "CARD.md").write_text(render(config, evaluation, args.name))
    print(f"-> {d / 'CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
