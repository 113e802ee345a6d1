"""PyTorch ops a decode step issues, by phase: the host's share of a step, counted exactly.

    python -m bench.step_ops ar glide=glide dyn=glide:dynamic [--limit 4] [--max-new-tokens 64] \\
        [--name step-ops] [--out FILE]

Configurations as in :mod:`bench.ab`. Each prompt is decoded at batch 1 under a
``TorchDispatchMode`` that counts every ATen op and charges it to the innermost phase running:

- ``target``: the target's forwards (prefill, decode, verification);
- ``draft.forward``: the draft network's forwards (its ``step``);
- ``draft.lookup`` and ``draft.ngrams``: the dynamic tree's prompt-lookup merge and its corpus
  n-gram walk;
- ``draft``: the rest of the draft's ``begin`` / ``propose`` / ``observe``;
- ``engine.tree``, ``engine.verify``, ``engine.emit``, ``engine.compact``, ``engine.report``:
  the engine's tree building, verification, emission, cache compaction and host hand-out;
- ``other``: the rest (the engine's own glue, the first token's pick).

Why count: on a GPU every op costs the host several microseconds to issue, whatever its size,
and the forwards replayed from CUDA graphs cost one call each; what is left between two graph
replays is these ops. A phase's count per call does not depend on the machine's speed, so a
change to the host path can be judged on this CPU. Per step it can: the dynamic tree decides
from its own timings how many levels to grow (and, unless it drafts always, when to pause),
so its draft phases vary between runs; compare those per call, or in one run. ``kernel_ops`` leaves out views (``is_view``),
which launch nothing; ``item_reads`` counts ``_local_scalar_dense`` calls, each a device sync
on a GPU. The target's and the draft's forwards are counted too, but on CUDA most replay from
graphs: the target's, the chain draft's and the dynamic tree's grown levels (its catch-up
forward runs eagerly).

Rows (``profiles/<device>/<name>.json``): per configuration and phase, ops, kernel ops and
item reads per decode step (a step: one target forward after the prefill), with the
configuration's steps and mean acceptance.
"""

from __future__ import annotations

import argparse
import collections
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import harness
from .ab import _factory, parse_config
from .draft_eval import DEFAULT_PROMPTS

__all__ = ["PhaseCounter", "count_steps", "main"]

PHASES = ("target", "draft.forward", "draft.lookup", "draft.ngrams", "draft", "engine.tree", "engine.verify",
          "engine.emit", "engine.compact", "engine.report", "other")


class PhaseCounter(TorchDispatchMode):
    """Counts ATen ops by phase: ``ops``, ``kernel_ops`` (views left out) and ``item_reads``,
    each a ``Counter`` keyed by phase name. :meth:`phase` wraps a callable so that the ops it
    issues are charged to a phase (the innermost wrapped call wins)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.kernel_ops = collections.Counter()
        self.item_reads = collections.Counter()
        self._stack = ["other"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self._stack[-1]
        self.ops[where] += 1
        if not func.is_view:
            self.kernel_ops[where] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.item_reads[where] += 1
        return func(*args, **(kwargs or {}))

    def phase(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self._stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
        return wrapped


@contextmanager
def _patched(counter: PhaseCounter, target, draft):
    """Wrap the phases' callables (instance attributes, or class and module attributes that
    are put back on exit)."""
    import glide.speculative.engine as engine
    from glide.model.cache import KVCache

    undo = []

    def patch(obj, attr, name):
        if obj is None or not hasattr(obj, attr):
            return
        own = attr in vars(obj)  # an instance or class attribute of its own, to put back
        old = vars(obj)[attr] if own else None
        setattr(obj, attr, counter.phase(name, getattr(obj, attr)))
        undo.append((obj, attr, own, old))

    for attr in ("forward", "decode", "prefill"):
        patch(target, attr, "target")
    if draft is not None:
        for attr in ("begin", "propose", "observe"):
            patch(draft, attr, "draft")
        patch(draft, "_merge_lookup", "draft.lookup")
        patch(getattr(draft, "ngrams", None), "continuation", "draft.ngrams")
        net = getattr(draft, "model", None)
        if net is not None and net is not target:
            patch(net, "step", "draft.forward")
    patch(engine, "build_tree", "engine.tree")
    for attr in ("verify_greedy", "verify_logits"):
        patch(engine, attr, "engine.verify")
    patch(engine._Batch, "emit", "engine.emit")
    patch(engine._Batch, "emit_one", "engine.emit")
    patch(engine, "_report", "engine.report")
    patch(engine, "_hand_out", "engine.report")
    patch(KVCache, "compact", "engine.compact")
    try:
        yield
    finally:
        for obj, attr, own, old in reversed(undo):
            if own:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)


def count_steps(target, prompts, make_draft, max_new_tokens: int, eos=()) -> dict:
    """Decode each prompt (token ids) at batch 1 with a fresh draft from ``make_draft`` under a
    :class:`PhaseCounter`; returns ``{"steps", "tokens", "counter"}`` (steps: target forwards
    after the prefill, summed)."""
    from glide.speculative.engine import generate_ids

    counter = PhaseCounter()
    steps = tokens = 0
    for ids in prompts:
        draft = make_draft()
        with _patched(counter, target, draft), counter:
            out = generate_ids(target, [ids], draft, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                               cuda_graphs=False)[0]
        steps += int(out.target_forwards)
        tokens += len(out.output_ids) - 1
    return dict(steps=steps, tokens=tokens, counter=counter)


def _rows(name, res):
    c, steps = res["counter"], max(res["steps"], 1)
    rows = []
    for phase in PHASES + ("total",):
        if phase == "total":
            ops, kern, reads = (sum(x.values()) for x in (c.ops, c.kernel_ops, c.item_reads))
        else:
            ops, kern, reads = c.ops[phase], c.kernel_ops[phase], c.item_reads[phase]
        rows.append(dict(config=name, phase=phase, ops_per_step=ops / steps, kernel_ops_per_step=kern / steps,
                         item_reads_per_step=reads / steps, steps=res["steps"],
                         mean_accepted=res["tokens"] / steps))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="as in bench.ab: ar, lookup, NAME=METHOD[@PATH][:TREE,opts]")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--limit", type=int, default=4, help="prompts (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--name", default="step-ops")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default profiles/<device>/<name>.json)")
    a = p.parse_args(argv)
    if a.limit < 1 or a.max_new_tokens < 2:
        p.error("--limit must be >= 1 and --max-new-tokens >= 2")
    try:
        configs = [parse_config(s) for s in a.configs]
    except ValueError as exc:
        p.error(str(exc))
    from glide import api

    dev = torch.device("cpu")
    target, tokenizer = api.load("ar", None, dev, torch.bfloat16)
    eos = api.eos_ids(target.config, tokenizer)
    prompts = [api.encode_chat(tokenizer, q.text) for q in api.read_prompts(a.prompts)[:a.limit]]
    rows = []
    env = harness.environment(dev, a.name)
    out = a.out or harness.results_path(env["device_slug"], a.name)
    meta = dict(env, prompts=str(a.prompts), limit=a.limit, max_new_tokens=a.max_new_tokens, dtype="bfloat16",
                configs=configs, how=__doc__.split("\n\n", 2)[2])
    for cfg in configs:
        try:
            make = _factory(cfg, target, 0.0)
        except ValueError as exc:
            p.error(str(exc))
        count_steps(target, prompts[:1], make, 8, eos)  # warm-up: first calls take other paths
        res = count_steps(target, prompts, make, a.max_new_tokens, eos)
        rows += _rows(cfg["name"], res)
        harness.write_results(out, rows, meta)
    print(f"{'config':12s} {'phase':15s} {'ops':>8s} {'kernel':>8s} {'reads':>6s}   (per step)")
    for r in rows:
        if r["ops_per_step"] or r["phase"] == "total":
            print(f"{r['config']:12s} {r['phase']:15s} {r['ops_per_step']:8.1f} {r['kernel_ops_per_step']:8.1f} "
                  f"{r['item_reads_per_step']:6.2f}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
