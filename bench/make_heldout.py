"""Write ``bench/prompts/heldout.jsonl``: evaluation prompts from ShareGPT's held-out split.

The split is :func:`glide.train.prompts.is_heldout` (a hash of the conversation id), so these
prompts are never answered into a training corpus. Taken in source order: the first ``--chat``
prompts that do not look like code and the first ``--code`` ones that do
(:func:`glide.train.prompts.looks_like_code`), each at most ``--max-tokens`` tokens after the
chat template. Needs the training extra (``pip install -e .[train]``).

    python -m bench.make_heldout [--chat 16] [--code 16] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glide.train.prompts import is_heldout, looks_like_code, read_prompt_source

OUT = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chat", type=int, default=16)
    ap.add_argument("--code", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from glide.api import encode_chat
    from glide.model.load import _resolve

    directory, gguf = _resolve(None)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    want = {"chat": args.chat, "code": args.code}
    rows = []
    for p in read_prompt_source():
        if not is_heldout(p.id):
            continue
        kind = "code" if looks_like_code(p.text) else "chat"
        if want[kind] == 0 or len(encode_chat(tok, p.text)) > args.max_tokens:
            continue
        want[kind] -= 1
        rows.append({"id": p.id, "kind": kind, "prompt": p.text})
        if not any(want.values()):
            break
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
