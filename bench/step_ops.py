"""PyTorch ops a decode step issues, by phase: the host's share of a step, counted exactly;
or, with ``--time``, the wall time each phase takes a step.

    python -m bench.step_ops ar glide=glide dyn=glide:dynamic [--limit 4] [--max-new-tokens 64] \\
        [--batch-size 1] [--time] [--name step-ops] [--out FILE]

Configurations as in :mod:`bench.ab`. Prompts are decoded at batch 1 (or ``--batch-size`` together) under a
``TorchDispatchMode`` that counts every ATen op and charges it to the innermost phase running:

- ``target``: the target's forwards after the prompt (decode, verification);
- ``target.prefill``: the prompt's forward;
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

``--time`` runs the same phases without the dispatch mode (which would slow every op) and
charges wall time instead, each phase its own time less the phases nested in it (a draft
forward is ``draft.forward``, not ``draft``); ``other`` is what the generation's wall time has
beyond them. Rows: milliseconds and calls per step by phase (default ``--name step-time``).
Timings move with the machine's load, so compare phases within one run; the split answers
where a step's time goes, e.g. how much of a speculative step is the verification forward
against one decode step of ``ar``.
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

__all__ = ["PhaseCounter", "PhaseTimer", "count_steps", "main"]

PHASES = ("target", "target.prefill", "draft.forward", "draft.lookup", "draft.ngrams", "draft", "engine.tree", "engine.verify",
          "engine.emit", "engine.compact", "engine.report", "other")


class _Phases:
    """The phase stack that :class:`PhaseCounter` and :class:`PhaseTimer` share: :meth:`phase`
    wraps a callable so that what it does is charged to a phase, the innermost wrapped call's,
    except that a call wrapped as ``X`` inside a call of ``X`` itself or of a sub-phase
    ``X.y`` is part of that call (a decode step's forward is the step's, the prefill's forward
    the prefill's). Subclasses hear of each call through :meth:`_opened` and :meth:`_closed`.

    ``fields`` maps each row field (per decode step) to the ``Counter`` attribute it comes from
    and a scale."""

    fields: dict = {}

    def __init__(self):
        self._stack = ["other"]

    def phase(self, name: str, fn):
        def wrapped(*args, **kwargs):
            current = self._stack[-1]
            if current == name or current.startswith(name + "."):
                return fn(*args, **kwargs)
            self._stack.append(name)
            token = self._opened()
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                self._closed(name, token)
        return wrapped

    def _opened(self):
        return None

    def _closed(self, name: str, token) -> None:
        pass


class PhaseCounter(_Phases, TorchDispatchMode):
    """Counts ATen ops by phase: ``ops``, ``kernel_ops`` (views left out) and ``item_reads``,
    each a ``Counter`` keyed by phase name; :meth:`phase` says which phase runs (see
    :class:`_Phases`)."""

    fields = {"ops_per_step": ("ops", 1.0), "kernel_ops_per_step": ("kernel_ops", 1.0),
              "item_reads_per_step": ("item_reads", 1.0)}

    def __init__(self):
        TorchDispatchMode.__init__(self)
        _Phases.__init__(self)
        self.ops = collections.Counter()
        self.kernel_ops = collections.Counter()
        self.item_reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self._stack[-1]
        self.ops[where] += 1
        if not func.is_view:
            self.kernel_ops[where] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.item_reads[where] += 1
        return func(*args, **(kwargs or {}))


class PhaseTimer(_Phases):
    """Wall time by phase: ``seconds`` (a ``Counter``) charges each wrapped call its time less
    that of the wrapped calls inside it, and ``calls`` counts them (a call that stays part of
    another, see :class:`_Phases`, is not a call of its own). Used as a context manager, it
    charges ``other`` with the time inside the ``with`` that no phase took. ``clock`` is
    ``time.perf_counter`` unless given."""

    fields = {"ms_per_step": ("seconds", 1e3), "calls_per_step": ("calls", 1.0)}

    def __init__(self, clock=None):
        import time

        super().__init__()
        self.clock = clock or time.perf_counter
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self._nested = [0.0]  # per open call (and the ``with`` at the bottom): time of its nested calls
        self._start = None

    def _opened(self):
        self._nested.append(0.0)
        return self.clock()

    def _closed(self, name: str, t0) -> None:
        took = self.clock() - t0
        self.seconds[name] += took - self._nested.pop()
        self.calls[name] += 1
        self._nested[-1] += took

    def __enter__(self):
        self._nested = [0.0]
        self._start = self.clock()
        return self

    def __exit__(self, *exc):
        self.seconds["other"] += (self.clock() - self._start) - self._nested[0]
        return False


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

    for attr in ("forward", "decode"):
        patch(target, attr, "target")
    patch(target, "prefill", "target.prefill")
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


def count_steps(target, prompts, make_draft, max_new_tokens: int, eos=(), timer: bool = False,
                into: dict | None = None, batch_size: int = 1) -> dict:
    """Decode the prompts (token ids), ``batch_size`` at a time, each batch with a fresh draft
    from ``make_draft``, under a :class:`PhaseCounter` (a :class:`PhaseTimer` with ``timer``).

    Returns ``{"steps", "tokens", "row_forwards", "counter"}``: steps are the batches' target
    forwards after the prefill, tokens the new tokens of every prompt after its first, and
    row_forwards the forwards each prompt took part in, summed (the engine's
    ``target_forwards``; tokens over row_forwards is the mean acceptance). ``into``, such a
    result, is added to and returned instead (its counter keeps counting)."""
    from glide.speculative.engine import generate_ids

    counter = into["counter"] if into is not None else PhaseTimer() if timer else PhaseCounter()
    res = into if into is not None else dict(steps=0, tokens=0, row_forwards=0, counter=counter)
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo:lo + batch_size])
        draft = make_draft()
        with _patched(counter, target, draft), counter:
            outs = generate_ids(target, batch, draft, max_new_tokens=max_new_tokens, eos_token_ids=eos,
                                cuda_graphs=False)
        res["steps"] += max(int(o.target_forwards) for o in outs)
        res["row_forwards"] += sum(int(o.target_forwards) for o in outs)
        res["tokens"] += sum(len(o.output_ids) - 1 for o in outs)
    return res


def _rows(name, res):
    """Per phase (and ``total``), the counter's fields per decode step, with the steps, the
    mean acceptance and the tokens a step."""
    c, steps = res["counter"], max(res["steps"], 1)
    rows = []
    for phase in PHASES + ("total",):
        row = dict(config=name, phase=phase)
        for field, (attr, scale) in c.fields.items():
            counts = getattr(c, attr)
            row[field] = scale * (sum(counts.values()) if phase == "total" else counts[phase]) / steps
        rows.append(dict(row, steps=res["steps"], mean_accepted=res["tokens"] / max(res["row_forwards"], 1),
                         tokens_per_step=res["tokens"] / steps))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="as in bench.ab: ar, lookup, NAME=METHOD[@PATH][:TREE,opts]")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--limit", type=int, default=4, help="prompts (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--time", action="store_true", help="wall time by phase instead of op counts")
    p.add_argument("--name", default=None, help="results file stem (default step-ops, or step-time with --time)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default profiles/<device>/<name>.json)")
    a = p.parse_args(argv)
    if a.limit < 1 or a.max_new_tokens < 2:
        p.error("--limit must be >= 1 and --max-new-tokens >= 2")
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    try:
        configs = [parse_config(s) for s in a.configs]
    except ValueError as exc:
        p.error(str(exc))
    from tqdm.auto import tqdm

    from glide import api

    dev = torch.device("cpu")
    target, tokenizer = api.load("ar", None, dev, torch.bfloat16)
    eos = api.eos_ids(target.config, tokenizer)
    prompts = [api.encode_chat(tokenizer, q.text) for q in api.read_prompts(a.prompts)[:a.limit]]
    rows = []
    a.name = a.name or ("step-time" if a.time else "step-ops")
    env = harness.environment(dev, a.name)
    out = a.out or harness.results_path(env["device_slug"], a.name)
    meta = dict(env, prompts=str(a.prompts), limit=a.limit, max_new_tokens=a.max_new_tokens, dtype="bfloat16",
                batch_size=a.batch_size,
                configs=configs, how=__doc__.split("\n\n", 2)[2])
    makers = {}
    for cfg in configs:
        try:
            makers[cfg["name"]] = make = _factory(cfg, target, 0.0)
        except ValueError as exc:
            p.error(str(exc))
        count_steps(target, prompts[:1], make, 8, eos, a.time)  # warm-up: first calls take other paths
    # prompt by prompt, every configuration in turn (as bench.ab): a slow spell of a shared
    # machine then hits all of them alike, which matters for --time
    results = {}
    B = a.batch_size
    for lo in tqdm(range(0, len(prompts), B), desc="step_ops", unit="batch"):
        for cfg in configs:
            name = cfg["name"]
            results[name] = count_steps(target, prompts[lo:lo + B], makers[name], a.max_new_tokens, eos, a.time,
                                        results.get(name), B)
        rows = [r for cfg in configs for r in _rows(cfg["name"], results[cfg["name"]])]
        harness.write_results(out, rows, meta)
    cols = list((PhaseTimer if a.time else PhaseCounter).fields)
    print(f"{'config':12s} {'phase':15s} " + " ".join(f"{c.split('_per_')[0]:>10s}" for c in cols) + "   (per step)")
    for r in rows:
        if r[cols[0]] or r["phase"] == "total":
            print(f"{r['config']:12s} {r['phase']:15s} " + " ".join(f"{r[c]:10.2f}" for c in cols))
    print(f"wrote {out}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
