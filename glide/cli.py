"""``glide generate`` (the command-line front of :func:`glide.api.generate`) and ``glide train-draft``.

Bad input ends with one line on stderr that names the argument, and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from glide import api

# API argument name -> the CLI flag that sets it, for error messages.
_FLAGS = {
    "method": "--method",
    "prompt": "--prompt",
    "prompts": "--prompt/--prompts",
    "prompts_file": "--prompts",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "model": "--model",
    "draft": "--draft",
    "gamma": "--gamma",
    "bins": "--bins",
    "tree": "--tree",
    "fallback": "--no-fallback",
    "lookup": "--lookup",
    "ngrams": "--no-ngrams",
    "sample_draft": "--sample-draft",
    "cuda_graphs": "--no-cuda-graphs",
    "device": "--device",
    "dtype": "--dtype",
    "out": "--out",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line form, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glide", description="Speculative decoding with GliDe and CaPE.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate replies to prompts")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="one user message (the chat template is applied)")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="JSONL rows with 'prompt' and optional 'id'")
    # choices are checked by the API so that every error has the same form
    g.add_argument("--method", default="ar", metavar="{" + ",".join(api.METHODS) + "}", help=f"one of {', '.join(api.METHODS)} (default: ar)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="at most this many new tokens a prompt; EOS ends a reply earlier (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 is greedy; > 0 samples from the target's distribution (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling in (0, 1]; only with --temperature > 0 (default: 1.0, off)")
    g.add_argument("--seed", type=int, default=0, metavar="S", help="random seed for sampling (default: 0)")
    g.add_argument("--batch-size", type=int, default=1, metavar="B", help="prompts decoded together (default: 1)")
    g.add_argument("--model", metavar="PATH", help="checkpoint dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--draft", metavar="PATH",
                   help="GliDe draft folder (glide, cape; default: the draft shipped for the embedded model)")
    g.add_argument("--gamma", type=int, default=4, metavar="G",
                   help="draft tokens per step for glide and cape (default: 4)")
    g.add_argument("--bins", default=None, metavar="N,N,...",
                   help="cape: candidates per depth by floor(10 * draft confidence) "
                        "(default: the paper's 8,8,8,6,6,6,4,4,2,2,2,2)")
    g.add_argument("--tree", default=None, metavar="{chain,cape,dynamic}",
                   help="glide/cape draft tree: chain (glide's default), cape (cape's default) or dynamic "
                        "(best-first, sized by the verify cost measured on this device)")
    g.add_argument("--no-fallback", dest="fallback", action="store_false",
                   help="dynamic tree: draft at every step (default: pause drafting while drafted "
                        "steps, as timed, emit fewer tokens per second than plain ones)")
    g.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="dynamic tree: merge up to N prompt-lookup tokens (the continuation of the last "
                        "earlier occurrence of the reply's last tokens) into the tree; 0 turns it off "
                        "(default: the tree's own)")
    g.add_argument("--no-ngrams", dest="ngrams", action="store_false",
                   help="dynamic tree: never take lookup tokens from the draft's corpus n-gram table "
                        "(default: where the reply's history has no match, if the draft ships one)")
    g.add_argument("--sample-draft", action="store_true",
                   help="glide chain, when sampling: draw the draft tokens from the draft and accept each "
                        "with min(1, p/q), which accepts more often (exact too; a seed no longer gives "
                        "ar's very sample)")
    g.add_argument("--device", default=None, metavar="{cpu,cuda}",
                   help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default=None, metavar="{float32,bfloat16,float16}",
                   help="float32, bfloat16 or float16 (default: bfloat16)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="on cuda, run every target forward eagerly (default: decode and verification "
                        "replay CUDA graphs)")
    g.add_argument("--out", metavar="FILE.jsonl",
                   help="write one JSON row per prompt here (default: print the replies)")
    from glide.train.command import add_parser as add_train_parser

    add_train_parser(sub)
    return parser


def _fail(message: str, command: str = "generate") -> int:
    print(f"glide {command}: error: {message}", file=sys.stderr)
    return 2


def _open_out(path):
    """Open ``--out`` before any work, so that a bad path fails fast and names the flag."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise api.ArgumentError("out", f"directory {parent} does not exist")
    if os.path.isdir(path):
        raise api.ArgumentError("out", f"{path} is a directory")
    existed = os.path.exists(path)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        if existed:
            raise api.ArgumentError("out", f"cannot write {path}: {exc.strerror}") from None
        # e.g. /proc/x.jsonl: the OS says "No such file or directory" about a folder that exists
        raise api.ArgumentError(
            "out", f"cannot create {path}: the folder {parent} exists, but a file cannot be "
                   f"created there (the system says: {exc.strerror})") from None


def _generate(args) -> int:
    prompts = [api.Prompt(text=args.prompt, id=0)] if args.prompt is not None else api.read_prompts(args.prompts)
    api.check_sampling(args.temperature, args.top_p)  # a bad value fails before the note
    if args.temperature == 0 and args.top_p != 1.0:
        print("glide generate: note: --top-p has no effect at --temperature 0 (greedy decoding)",
              file=sys.stderr)
    out_file = _open_out(args.out) if args.out is not None else None
    single = len(prompts) == 1
    # transformers' generate() has no text callback here: hf prints its reply at the end
    stream = single and out_file is None and sys.stdout.isatty() and args.method != "hf"

    def on_text(_index, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        rows = api.generate(
            prompts, method=args.method, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed,
            batch_size=args.batch_size, model=args.model, draft=args.draft, gamma=args.gamma,
            bins=args.bins, tree=args.tree, fallback=args.fallback, lookup=args.lookup,
            ngrams=args.ngrams, sample_draft=args.sample_draft, device=args.device, cuda_graphs=args.cuda_graphs,
            dtype=args.dtype, progress=not single, on_text=on_text if stream else None,
        )
    except BaseException:
        if out_file is not None:
            out_file.close()
            os.unlink(args.out)  # leave no empty results file behind
        raise
    if out_file is not None:
        with out_file:
            for row in rows:
                out_file.write(json.dumps(row) + "\n")
    elif stream:
        sys.stdout.write("\n")
    else:
        for row in rows:
            print(row["output_text"] if single else json.dumps({"id": row["id"], "output_text": row["output_text"]}))
    print(summary(args.method, rows), file=sys.stderr)
    return 0


def summary(method: str, rows: list[dict]) -> str:
    """The run's one-line report. Throughput is new tokens over decode wall time, each batch
    counted once (as ``bench.e2e`` does); with batches of several prompts the per-sequence rate
    is shown beside it."""
    n = sum(r["new_tokens"] for r in rows)
    batches = {r.get("batch", i): r.get("batch_seconds", r["seconds"]) for i, r in enumerate(rows)}
    wall = sum(batches.values())
    fw = sum(r["target_forwards"] for r in rows)
    rate = f"{n / wall:.1f} tokens/s decode" if wall > 0 else "n/a tokens/s decode"
    if len(batches) < len(rows):  # batched: also each sequence's own rate
        secs = sum(r["seconds"] for r in rows)
        if secs > 0:
            rate += f" ({n / secs:.1f} tokens/s per sequence)"
    acc = f"{(n - len(rows)) / fw:.2f}" if fw > 0 else "n/a"
    return (f"[{method}] {len(rows)} prompt(s) in {len(batches)} batch(es), {n} new tokens, {rate}, "
            f"{acc} tokens per target forward")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    flags, cmd = _FLAGS, args.command
    try:
        if cmd == "generate":
            return _generate(args)
        if cmd == "train-draft":
            from glide.train import command

            flags = {**_FLAGS, **command.FLAGS}
            return command.run(args)
    except api.ArgumentError as exc:
        return _fail(f"argument {flags.get(exc.argument, exc.argument)}: {exc.detail}", cmd)
    except NotImplementedError as exc:
        return _fail(str(exc), cmd)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        # the loaders' messages start with the argument they blame, e.g. "model: ..."
        name, sep, rest = str(exc).partition(": ")
        if sep and name in flags:
            return _fail(f"argument {flags[name]}: {rest}", cmd)
        return _fail(str(exc), cmd)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
