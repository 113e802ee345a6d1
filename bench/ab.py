"""Interleaved A/B of decoding configurations, prompt by prompt (or batch by batch).

    python -m bench.ab ar dyn=glide:dynamic dyn-plain=glide:dynamic,ngrams=0 \\
        [--prompts bench/prompts/heldout.jsonl] [--limit N] [--max-new-tokens 128] \\
        [--temperature 0] [--batch-size 1] [--keep-drafts] [--name ab] [--out FILE]

A configuration is ``ar``, ``lookup``, or ``NAME=METHOD[:TREE[,OPTION=VALUE...]]`` with
``METHOD`` ``glide`` or ``cape`` (the shipped draft, or ``@PATH`` after the method:
``glide@runs/x/draft:dynamic``) and ``TREE`` as in :mod:`bench.draft_eval`
(``dynamic,lookup=6,ngrams=0``). Further options are constructor arguments of the draft's
class (``dynamic,depth=4,min_expand=0.1`` for :class:`~glide.draft.dynamic.DynamicTreeDraft`),
so that a setting can be compared without a command-line switch of its own; values are
parsed as Python literals.

Each prompt goes through every configuration in turn, on one loaded target, before the next
prompt: slow phases of a shared machine hit all configurations alike, which a sweep that runs
each configuration over all prompts (:mod:`bench.draft_eval`) cannot promise. Each prompt
starts a fresh draft (what the pause policy learnt does not carry over), unless
``--keep-drafts``: then each configuration keeps one draft for all prompts, as one
``glide generate`` call (or :mod:`bench.draft_eval`) does for its batches, so that what a
draft measures while decoding (the dynamic tree's rates, lookup rates and pauses) carries
over from prompt to prompt. The JSON under
``profiles/<device>/<name>.json`` is rewritten after every prompt: per configuration, the
tokens, target forwards, decode seconds, MAT, tokens/s, the ratio to the first configuration,
and (greedy) how many outputs equal the first configuration's.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import time
from pathlib import Path

import torch

from . import harness
from .draft_eval import DEFAULT_PROMPTS, TREE_KINDS

__all__ = ["parse_config", "run", "main"]


def parse_config(spec: str) -> dict:
    """One configuration from its spec (see the module docstring).

    Returns
    -------
    dict
        ``name``, ``method``, ``draft`` (path or ``None``), ``tree``, ``fallback``, ``lookup``,
        ``ngrams``, ``attrs`` (further constructor arguments of the draft's class).

    Raises
    ------
    ValueError
        Naming the spec, for an unknown method, tree or option value.
    """
    name, eq, rest = spec.partition("=")
    if not eq:
        name, rest = spec, spec
    if not name:
        raise ValueError(f"config {spec!r}: empty name")
    head, _, opts = rest.partition(":")
    method, _, path = head.partition("@")
    if method not in ("ar", "lookup", "glide", "cape"):
        raise ValueError(f"config {spec!r}: method must be ar, lookup, glide or cape, got {method!r}")
    cfg = dict(name=name, method=method, draft=path or None, tree=None, fallback=True, lookup=None,
               ngrams=True, attrs={})
    if not opts:
        return cfg
    if method in ("ar", "lookup"):
        raise ValueError(f"config {spec!r}: {method} takes no tree")
    tree, *options = opts.split(",")
    if tree not in TREE_KINDS:
        raise ValueError(f"config {spec!r}: unknown tree {tree!r}, expected one of {', '.join(TREE_KINDS)}")
    cfg["tree"] = "dynamic" if tree == "dynamic-always" else tree
    cfg["fallback"] = tree != "dynamic-always"
    for opt in options:
        key, eq, value = opt.partition("=")
        try:
            parsed = ast.literal_eval(value) if eq else None
        except (ValueError, SyntaxError):
            parsed = None
        if parsed is None or not key:
            raise ValueError(f"config {spec!r}: option {opt!r} must be KEY=LITERAL")
        if key in ("lookup", "ngrams") and not tree.startswith("dynamic"):
            raise ValueError(f"config {spec!r}: {key} is an option of the dynamic trees")
        if key == "lookup":
            if not isinstance(parsed, int) or parsed < 0:
                raise ValueError(f"config {spec!r}: lookup must be an int >= 0, got {value!r}")
            cfg["lookup"] = parsed
        elif key == "ngrams":
            cfg["ngrams"] = bool(parsed)
        else:
            cfg["attrs"][key] = parsed
    return cfg


def _factory(cfg, target, temperature):
    """A zero-argument callable giving a fresh draft of the configuration (``None`` for ``ar``).

    The draft is :func:`glide.api.make_draft`'s, built once (loading the weights, calibration
    and n-gram table once); each call constructs a new object of its class from the same
    constructor arguments, with ``attrs`` in place of theirs, so that whatever the constructor
    derives from them (a tree's scratch reach, clamped sizes) follows and no state of one
    generation reaches the next.

    Raises
    ------
    ValueError
        Naming the configuration, for an argument the class does not take or a bad value.
    """
    from glide import api

    draft = api.make_draft(cfg["method"], cfg["draft"], target, tree=cfg["tree"], temperature=temperature,
                           fallback=cfg["fallback"], lookup=cfg["lookup"], ngrams=cfg["ngrams"])
    if draft is None:
        return lambda: None
    cls = type(draft)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(cfg["attrs"]) - set(params) - {"self"})
    if unknown:
        known = ", ".join(k for k in params if k not in ("self", "model"))
        raise ValueError(f"config {cfg['name']!r}: {cls.__name__} takes no argument {unknown[0]!r} "
                         f"(it takes {known})")
    kwargs = {}
    for name, par in params.items():
        if name == "self" or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        if name in cfg["attrs"]:
            kwargs[name] = cfg["attrs"][name]
        elif hasattr(draft, name):
            kwargs[name] = getattr(draft, name)
        elif par.default is par.empty:
            raise ValueError(f"config {cfg['name']!r}: cannot rebuild {cls.__name__} (no {name!r})")

    def make():
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {cfg['name']!r}: {exc}") from None
    make()  # bad values fail here, before any decoding
    return make


def run(configs: list[dict], prompts_path, limit=None, max_new_tokens=128, temperature=0.0, dtype="bfloat16",
        device="cpu", out=None, name="ab", progress=True, keep_drafts=False, batch_size=1):
    """Decode every prompt (``batch_size`` at a time) with every configuration in turn; returns
    ``(rows, path)`` (the rows as written to the results file). A batch's time is its decode wall
    time, its MAT the tokens over the forwards each prompt took part in (as ``bench.draft_eval``)."""
    from tqdm.auto import tqdm

    from glide import api
    from glide.speculative.engine import generate_ids

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dev = torch.device(device)
    dt = api.resolve_dtype(dtype, dev)
    env = harness.environment(dev, name)
    prompts = api.read_prompts(prompts_path)[:limit]
    target, tokenizer = api.load("ar", None, dev, dt)
    eos = api.eos_ids(target.config, tokenizer)
    makers = {c["name"]: _factory(c, target, temperature) for c in configs}  # bad options fail here
    warm = api.encode_chat(tokenizer, prompts[0].text)
    for cfg in configs:  # first calls run cold (and a dynamic tree may measure its verify cost)
        generate_ids(target, [warm], makers[cfg["name"]](), max_new_tokens=8, eos_token_ids=eos)
    totals = {c["name"]: dict(tokens=0, forwards=0, seconds=0.0, same=0, prompts=0) for c in configs}
    kept = {c["name"]: makers[c["name"]]() for c in configs} if keep_drafts else None
    meta = dict(env, prompts=str(prompts_path), dtype=str(dt), max_new_tokens=max_new_tokens,
                temperature=temperature, configs=configs, keep_drafts=keep_drafts, batch_size=batch_size,
                what=f"each batch of prompts decoded by every configuration in turn, batch {batch_size}, one process"
                     + ("; one draft per configuration for all prompts" if keep_drafts else ""))
    out = Path(out) if out else harness.results_path(env["device_slug"], name)
    first = configs[0]["name"]
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(batches, desc="ab", unit="batch" if batch_size > 1 else "prompt", disable=not progress)
    for batch in bar:
        ids = [api.encode_chat(tokenizer, p.text) for p in batch]
        base = None
        for cfg in configs:
            # a fresh draft (nothing learnt carries over), or the configuration's own
            draft = kept[cfg["name"]] if kept is not None else makers[cfg["name"]]()
            res = generate_ids(target, ids, draft, max_new_tokens=max_new_tokens, temperature=temperature,
                               eos_token_ids=eos, seed=0)
            t = totals[cfg["name"]]
            t["tokens"] += sum(len(r.output_ids) - 1 for r in res)  # the first comes from the prefill
            t["forwards"] += sum(int(r.target_forwards) for r in res)
            t["seconds"] += max(float(r.seconds) for r in res)  # the batch's decode wall time
            t["prompts"] += len(res)
            outs = [list(r.output_ids) for r in res]
            if base is None:
                base = outs
            elif temperature == 0.0:
                t["same"] += sum(a == b for a, b in zip(outs, base))
        rows = _rows(totals, first, temperature == 0.0)
        harness.write_results(out, rows, meta)
        bar.set_postfix_str(" ".join(f"{r['config']} {r['mean_accepted']:.2f}/{r['ratio']:.2f}x" for r in rows))
    bar.close()
    return _rows(totals, first, temperature == 0.0), out


def _rows(totals, first, greedy=True):
    """One row per configuration; ``identical_to_first`` is counted only for greedy runs."""
    base = totals[first]
    rate0 = base["tokens"] / base["seconds"] if base["seconds"] else None
    rows = []
    for name, t in totals.items():
        rate = t["tokens"] / t["seconds"] if t["seconds"] else 0.0
        rows.append(dict(config=name, prompts=t["prompts"], tokens=t["tokens"], target_forwards=t["forwards"],
                         decode_seconds=t["seconds"], mean_accepted=t["tokens"] / max(t["forwards"], 1),
                         tokens_per_s=rate, ratio=rate / rate0 if rate0 else 0.0,
                         identical_to_first=t["same"] if name != first and greedy else None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="configurations; the first is the baseline of the ratios")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="ab", help="the result file's stem (default: ab)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    ap.add_argument("--keep-drafts", action="store_true",
                    help="one draft per configuration for all prompts (default: a fresh draft per prompt)")
    args = ap.parse_args(argv)
    try:
        configs = [parse_config(s) for s in args.configs]
    except ValueError as exc:
        ap.error(f"configs: {exc}")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    names = [c["name"] for c in configs]
    if len(set(names)) != len(names):
        ap.error(f"configs: names must differ, got {names}")
    try:
        rows, out = run(configs, Path(args.prompts), args.limit, args.max_new_tokens, args.temperature, args.dtype,
                        args.device, args.out, args.name, not args.no_progress, args.keep_drafts, args.batch_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        same = "" if r["identical_to_first"] is None else f", {r['identical_to_first']}/{r['prompts']} identical"
        print(f"{r['config']:>16}: MAT {r['mean_accepted']:.2f}, {r['tokens_per_s']:.1f} tok/s, "
              f"{r['ratio']:.2f}x{same}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
