"""A budgeted dynamic draft tree: grown best-first from the GliDe draft, sized by measured cost.

Each step:

1. **Catch up.** The draft's cache is right up to the last root it saw (the tree's scratch slots
   are not); one forward runs the committed tokens since then, ending at the new root
   (``depth + 1`` rows, right-padded for ragged batches; padding lands past the root, where
   nothing is trusted).
2. **Grow.** Every candidate carries ``v``, the product of the draft's probabilities along its
   path: the draft's estimate that the target accepts it. The root's top-``k`` are the first
   candidates. At each further level the ``beam`` best candidates of the last level are
   expanded: one draft forward over every expanded node so far, with tree-masked
   self-attention (each node sees its ancestors; the cross-attention reads the target's cache
   as in the chain), and the top-``k`` children of the new nodes become candidates
   (``v_child = v_parent * p``). Branches can grow anywhere, not only off a spine. Before the
   first level the draft asks whether growing can pay for its forwards at all: not when even
   the root's best candidates' mass, accepted at every level, would not raise the expected
   tokens per second of step 3's best tree from the root's candidates alone. Where the draft
   is unsure (sampling, large batches on the CPU) that skips the forwards of a tree nobody
   would verify. (Asking again before every level cut levels that paid: measured as a loss
   with greedy decoding at batch 1.)
   With ``lookup``, a prompt-lookup chain joins the candidates here: the tokens that followed
   the last earlier occurrence of the sequence's last few tokens (prompt and reply), at no draft
   cost. Each lookup token's ``v`` is its parent's times the rate at which lookup tokens at its
   depth have matched the target so far; one equal to a candidate under the same parent raises
   that candidate's ``v`` instead of joining twice. Small models repeat themselves (lists,
   code, loops), where a one-layer draft is unsure and the history is right. With ``ngrams``
   (a corpus n-gram table, :class:`~glide.speculative.ngrams.NgramTable`), a sequence whose
   history holds no match takes the table's chain instead, rated on its own.
3. **Size.** Candidates are ranked by ``v`` (children never outrank their parent, so every
   prefix of the ranking is a tree). The tree keeps the ``N`` best, with ``N`` maximising the
   expected tokens per second of the step, ``(1 + sum_i f(v_i)) / (t_draft + t_verify(N + 1))``,
   summed over the batch: ``t_verify`` is a verify-cost curve measured on this device
   (:class:`VerifyCost`, cached per device, model shape, dtype and batch), ``t_draft`` the
   time this step's drafting took, and ``f`` an optional calibration of ``v`` against observed
   acceptance (:class:`Calibration`).
4. **Pause.** The draft times every step, from one proposal to the next (drafting,
   verification and the engine's work), and keeps smoothed tokens per second of drafted
   steps and of plain ones. The first steps all draft; then a plain step measures the plain
   rate, again every ``refresh`` drafted steps. While drafted steps emit fewer tokens per
   second than plain ones, by a margin against noise (on this CPU at batch 4, or sampling,
   the draft and the wider verification can cost more than they bring), the draft pauses:
   the next steps draft nothing and the engine decodes them as plain steps, for a pause that
   doubles while drafting keeps losing (``fallback``; vLLM turns speculation off above a
   batch size for the same reason). The drafted step that ends a pause catches up on every
   token committed in it. The rates and the pause length carry over from one generation to
   the next of the same batch size (the batches of one request, or a draft kept for many), so
   only the draft's first generation at a batch size pays the warm-up.

Exactness does not depend on any of it: the engine verifies whatever tree comes out.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glide.cache import cache_dir
from glide.speculative.drafts import DraftContext, check_count, lookup_continuation
from glide.speculative.ngrams import NgramTable
from glide.speculative.tree import Proposal, ancestor_mask

from .runtime import GlideDraft

__all__ = ["VerifyCost", "Calibration", "DynamicTreeDraft", "cache_dir", "record_calibration", "save_calibration",
           "load_calibration", "load_ngrams", "CALIBRATION"]


# Part of a verify-cost curve's cache key: bumped when the runner's forward changes speed, so
# that curves cached before are measured again. 2: the CPU verify forward's additive mask.
FORWARD_VERSION = 2


@dataclass
class VerifyCost:
    """Seconds of one target verification forward by tree size ``T`` (slots, root included).

    Attributes
    ----------
    sizes : list of int
    seconds : list of float
        Median time of a forward with ``T = sizes[i]`` new tokens.

    Notes
    -----
    Calling it reads the curve's lower non-decreasing envelope (at each size, the least time
    measured there or at any larger size), linear in between and extrapolated linearly from the
    last two points beyond. A larger tree never runs faster, and the noise of a shared machine
    only adds time: a size measured while another process ran would otherwise look dearer than
    larger ones, and the tree sizing would avoid it for as long as the curve stays cached (seen
    in a cache here: 108 ms at T = 24 against 72 ms at T = 32).
    """

    sizes: list
    seconds: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # the envelope, once: the tree sizing reads the curve a few times a decode step
        x, y = np.asarray(self.sizes, float), np.asarray(self.seconds, float)
        order = np.argsort(x, kind="stable")
        self._envelope = x[order], np.minimum.accumulate(y[order][::-1])[::-1]

    def envelope(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes, seconds)`` sorted by size, the seconds made non-decreasing from below."""
        return self._envelope

    def __call__(self, T):
        x, y = self._envelope
        T = np.asarray(T, float)
        out = np.interp(T, x, y)
        if len(x) >= 2:
            slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
            out = np.where(T > x[-1], y[-1] + slope * (T - x[-1]), out)
        return out

    @staticmethod
    def key(model, batch_size: int, context: int, graphs: bool = False) -> str:
        c = model.config
        dev = model.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu{os.cpu_count()}"
        raw = json.dumps([FORWARD_VERSION, name, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads,
                          c.head_dim, c.vocab_size, str(model.dtype), batch_size, context // 256, torch.get_num_threads(),
                          # the OpenMP wait policy changes CPU timings by ~40% (glide/threads.py)
                          os.environ.get("OMP_WAIT_POLICY", ""), os.environ.get("GOMP_SPINCOUNT", "")]
                         + (["cuda-graphs"] if graphs else []))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    @classmethod
    def measure(cls, model, batch_size: int = 1, context: int = 256,
                sizes=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64), reps: int = 3,
                graphs: bool = False) -> "VerifyCost":
        """Time the target's forward for each tree size, over a cache of ``context`` tokens.

        ``graphs=True`` times the forwards as the engine runs them with CUDA graphs: through a
        :class:`~glide.model.graphs.CudaGraphs` of its own (captured on CUDA; elsewhere its
        static path), where cost rises in bucket steps and the host's share is gone.
        """
        dev = model.device
        runner = model
        if graphs:
            from glide.model.graphs import CudaGraphs

            runner = CudaGraphs(model, capture=dev.type == "cuda")
            cache = runner.new_cache(batch_size, context + max(sizes) + 1)
        else:
            cache = model.new_cache(batch_size, context + max(sizes) + 1)
        times = {T: [] for T in sizes}
        # in rounds over all sizes (the first a warm-up), so that a slow phase of the machine
        # hits every size alike instead of all repetitions of one
        for _ in range(reps + 1):
            for T in sizes:
                ids = torch.zeros(batch_size, T, dtype=torch.int64, device=dev)
                pos = (context + torch.arange(T, device=dev)).expand(batch_size, T)
                mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(batch_size, T, T)
                cache.reset()
                cache.commit(context)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                runner.forward(ids, pos, mask, cache)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[T].append(time.perf_counter() - t)
        seconds = [float(np.median(times[T][1:])) for T in sizes]
        if graphs:
            runner.clear()
        return cls(list(sizes), seconds, {"batch_size": batch_size, "context": context, "graphs": graphs})

    @classmethod
    def cached(cls, model, batch_size: int, context: int, path=None, graphs: bool = False) -> "VerifyCost":
        """:meth:`measure`, kept in ``cache_dir()/verify-cost.json`` under :meth:`key`."""
        path = Path(path) if path else cache_dir() / "verify-cost.json"
        key = cls.key(model, batch_size, context, graphs)
        table = {}
        try:
            table = json.loads(path.read_text())
            hit = table.get(key)
            if hit and len(hit["sizes"]) == len(hit["seconds"]) >= 2:
                return cls(hit["sizes"], hit["seconds"], hit.get("meta", {}))
        except (OSError, ValueError, KeyError, TypeError):
            table = {}  # missing or damaged: measure again
        cost = cls.measure(model, batch_size, max(16, context), graphs=graphs)
        table[key] = {"sizes": cost.sizes, "seconds": cost.seconds, "meta": cost.meta}
        try:
            from glide.train.corpus import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1)))
        except OSError:
            pass  # a read-only cache is not an error; the curve is still used
        return cost


@dataclass
class Calibration:
    """Observed acceptance of tree nodes by predicted acceptance ``v`` (a path's product of
    draft probabilities), in buckets; also the map ``f(v)`` the sizing uses once trained.

    Attributes
    ----------
    edges : list of float
        Bucket edges over [0, 1].
    predicted, accepted, count : list of float
        Per bucket: sum of ``v``, number of accepted nodes, number of nodes.
    """

    edges: list = field(default_factory=lambda: [0, .02, .05, .1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0001])
    predicted: list = None
    accepted: list = None
    count: list = None
    # (dtype, device, min_nodes) -> (rates, inner edges): mapping() runs at every decode step
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.edges) - 1
        self.predicted = self.predicted or [0.0] * n
        self.accepted = self.accepted or [0.0] * n
        self.count = self.count or [0.0] * n

    def add(self, v: torch.Tensor, ok: torch.Tensor) -> None:
        """Record nodes with predicted acceptance ``v`` and outcome ``ok`` (same shape)."""
        v, ok = v.flatten().double().cpu(), ok.flatten().double().cpu()
        b = torch.bucketize(v, torch.tensor(self.edges[1:-1], dtype=torch.float64), right=True)
        n = len(self.count)
        for name, x in (("predicted", v), ("accepted", ok), ("count", torch.ones_like(v))):
            acc = torch.zeros(n, dtype=torch.float64).index_add_(0, b, x)
            setattr(self, name, [a + float(c) for a, c in zip(getattr(self, name), acc)])
        self._tables.clear()

    def table(self) -> list[dict]:
        """One row per non-empty bucket: range, nodes, mean predicted, observed rate."""
        rows = []
        for i, n in enumerate(self.count):
            if n:
                rows.append({"bucket": [self.edges[i], min(self.edges[i + 1], 1.0)], "nodes": int(n),
                             "predicted": self.predicted[i] / n, "observed": self.accepted[i] / n})
        return rows

    def mapping(self, v: torch.Tensor, min_nodes: int = 20) -> torch.Tensor:
        """``f(v)``: the observed rate of ``v``'s bucket (``v`` itself where a bucket holds fewer
        than ``min_nodes`` nodes, too few to trust)."""
        key = (v.dtype, v.device, min_nodes)
        if key not in self._tables:  # built once, not at every step
            self._tables[key] = (
                torch.tensor([a / n if n >= max(min_nodes, 1) else float("nan")
                              for a, n in zip(self.accepted, self.count)], dtype=v.dtype, device=v.device),
                torch.tensor(self.edges[1:-1], dtype=v.dtype, device=v.device))
        rate, inner = self._tables[key]
        f = rate[torch.bucketize(v.contiguous(), inner, right=True)]  # a slice would be copied anyway
        return torch.where(torch.isnan(f), v, f)

    def to_dict(self) -> dict:
        return {"edges": self.edges, "predicted": self.predicted, "accepted": self.accepted, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(list(d["edges"]), list(d["predicted"]), list(d["accepted"]), list(d["count"]))


LOOKUP = 12  # prompt-lookup tokens merged into the tree by default (see DynamicTreeDraft)


class DynamicTreeDraft(GlideDraft):
    """The budgeted dynamic tree (see the module docstring).

    Parameters
    ----------
    model : GlideDraftModel
    depth : int
        Deepest level grown.
    top_k : int
        Children proposed per expanded node.
    beam : int
        Nodes expanded per level.
    max_nodes : int
        Largest tree (draft nodes, root excluded).
    cost : VerifyCost, optional
        Default: measured at :meth:`begin` for the batch (and cached, see
        :meth:`VerifyCost.cached`).
    calibration : Calibration, optional
        Maps ``v`` to the acceptance the sizing expects; default ``f(v) = v``.
    record : Calibration, optional
        Filled with every proposed node's ``v`` and whether it was accepted.
    fixed_size : int, optional
        Always keep this many nodes (no cost model), e.g. to compare against CaPE at equal size.
    min_expand : float
        Stop growing once the best candidate of the last level has ``v`` below this: deeper
        nodes would rarely be accepted, and each level costs a draft forward. A step also
        grows nothing when growing cannot pay for its draft forwards (see
        :meth:`DynamicTreeDraft._level_pays`; not with ``fixed_size``).
    growth_check : bool
        ``False`` skips that question and always grows (to measure what it saves).
    fallback : bool
        Decode without drafting while drafting does not pay (see :meth:`_plan`): the steps it
        skips propose nothing, so the engine runs them as one-slot forwards, and the draft
        forward that ends the pause catches its cache up on every token committed meanwhile.
        Not with ``fixed_size``.
    max_skip : int
        The longest pause, in steps, taken only while drafted steps lose by far (see
        :meth:`_longest_pause`).
    refresh : int
        Drafted steps between two plain steps that re-measure the plain rate.
    lookup : int
        Also offer up to this many tokens of prompt lookup (the continuation of the last
        earlier match of the sequence's last ``lookup_ngram`` tokens, see
        :func:`~glide.speculative.drafts.lookup_continuation`) as a chain under the root,
        merged into the candidates before sizing: where a lookup token equals a candidate under
        the same parent, that candidate's ``v`` becomes the larger of the two estimates; else
        the token joins as a new candidate. A lookup token's ``v`` is its parent's times the
        rate at which lookup tokens at its depth, found by a suffix match of the same length,
        matched the target (after matches above them), counted over every step so far (prior
        1/2). Lookup chains may reach deeper than ``depth`` (at most ``max_nodes`` tokens); 0: off.
    lookup_ngram : int
        Longest suffix the lookup matches.
    ngrams : NgramTable, optional
        Where a sequence's history has no continuation, the lookup chain is this corpus
        table's (:meth:`NgramTable.continuation`, up to ``lookup`` tokens), with its own
        rates (the suffix-length-0 row of the rate table). Shipped drafts carry one built from
        their training corpus (``ngrams.npz``).
    """

    _chain_graph = None  # its steps are its own, not the chain's
    _level_graphs_failed = False  # set when a level's capture failed (see _level_step)

    def __init__(self, model, depth: int = 6, top_k: int = 8, beam: int = 4, max_nodes: int = 48,
                 cost: VerifyCost | None = None, calibration: Calibration | None = None,
                 record: Calibration | None = None, fixed_size: int | None = None, min_expand: float = 0.05,
                 growth_check: bool = True, fallback: bool = True, max_skip: int = 64, refresh: int = 32,
                 lookup: int = LOOKUP, lookup_ngram: int = 3, ngrams: NgramTable | None = None):
        check_count("depth", depth)  # before the chain's own check, which would name gamma
        super().__init__(model, gamma=depth)
        if ngrams is not None and not isinstance(ngrams, NgramTable):
            raise TypeError(f"ngrams must be an NgramTable or None, got {type(ngrams).__name__}")
        if ngrams is not None:
            ngrams.check_vocab(model.config.target.vocab_size)
        self.ngrams = ngrams
        for name, value in (("top_k", top_k), ("beam", beam), ("max_nodes", max_nodes),
                            ("max_skip", max_skip), ("refresh", refresh), ("lookup_ngram", lookup_ngram)):
            check_count(name, value)
        check_count("lookup", lookup, 0)
        self.depth, self.beam = depth, beam
        self.top_k = min(top_k, model.config.vocab_out)
        self.beam = min(beam, self.top_k)
        self.max_nodes = max_nodes
        self.cost, self.calibration, self.record, self.fixed_size = cost, calibration, record, fixed_size
        self.min_expand = min_expand
        self.growth_check = growth_check
        self.fallback = bool(fallback) and fixed_size is None
        self.max_skip, self.refresh = max_skip, refresh
        self.lookup, self.lookup_ngram = min(lookup, max_nodes), lookup_ngram
        self._reach = max(depth, self.lookup)  # the deepest node a tree can hold
        # lookup tokens whose ancestors matched, by suffix length and depth: (seen, matched),
        # (2, lookup_ngram + 1, lookup) on the device
        self._lookup_counts = None
        self._clock = time.perf_counter  # times the steps (tests replace it)
        self.sizes = []  # chosen tree sizes, for reports
        self.skipped = 0  # steps decoded without drafting, for reports
        # wall seconds of the measured steps by kind (True: drafted, False: plain), for reports:
        # the time from one propose to the next, the host's read of the step included
        self.step_seconds = {True: [], False: []}
        # what the pause policy learnt, kept across generations: batch size -> (rates, backoff,
        # since_plain) of the sizes not in use
        self._memory, self._batch = {}, None
        self._rates = {}  # True (drafted) / False (plain) -> smoothed (tokens, seconds, steps)
        self._backoff = 0  # the last pause's length
        self._since_plain = 0  # drafted steps since the last plain one
        self._new_generation()

    def _new_generation(self, batch: int | None = None) -> None:
        """Reset the step state for a new generation; with ``batch``, switch the learnt rates
        to that batch size's (empty for a size not seen yet)."""
        self._skip = 0  # steps left in the current pause
        self._probe = False  # the step after a pause drafts
        self._gap = 0  # steps skipped since the last catch-up (each commits one token a row)
        self._prev = None  # (drafted, clock, committed tokens, live rows) at the last proposal
        self._warm = set()  # the kinds of step (drafted, plain) already run once
        if batch is not None and batch != self._batch:
            if self._batch is not None:
                self._memory[self._batch] = (self._rates, self._backoff, self._since_plain)
            self._rates, self._backoff, self._since_plain = self._memory.pop(batch, ({}, 0, 0))
            self._batch = batch
        if batch is not None and True in self._rates:
            # acceptance is the prompts' own: the drafted rate carries over as a weak prior
            tok, sec, n = self._rates[True]
            self._rates[True] = (self.CARRY * tok, self.CARRY * sec, n)

    def cache_extra(self) -> int:
        # scratch slots for the expanded nodes, and the catch-up window's padding (at most
        # _reach rows past the root, see propose)
        return max(self.max_nodes, (self.depth - 1) * self.beam) + self._reach + 2

    def begin(self, ctx: DraftContext) -> None:
        super().begin(ctx)
        self._level_graphs_failed = False
        self.trusted = (ctx.lengths - 1).clone()  # positions whose draft K/V are right
        self._last = None
        self._t_level = None  # seconds of the last grown level's draft forward
        self._new_generation(int(ctx.lengths.shape[0]))
        if self.cost is None and self.fixed_size is None:
            # the verify forwards run as the engine runs them: replayed graphs when it said so
            self.cost = VerifyCost.cached(ctx.model, ctx.lengths.shape[0], int(ctx.lengths.max()),
                                          graphs=self._graph_mode is True)
        if self._graph_mode is True:
            self._capture_levels(ctx)

    def _capture_levels(self, ctx: DraftContext) -> None:
        """Capture the graph of every level width now, in the set-up (as the chain drafts do):
        ``beam`` to ``beam * (depth - 1)`` run rows, on placeholder inputs. Their draft K/V
        land in rows from the root's position on, which the first catch-up rewrites."""
        B = ctx.root.shape[0]
        root_pos = ctx.lengths - 1
        self.cache.lens.copy_(root_pos)
        cross = self._cross(ctx)
        glimpse = self._glimpse_rows(ctx, root_pos[:, None])
        glimpse = None if glimpse is None else glimpse[:, 0]
        for level in range(1, self.depth):
            R = self.beam * level
            ids = ctx.root[:, None].expand(B, R).contiguous()
            pos = (root_pos[:, None] + 1).expand(B, R).contiguous()
            mask = torch.eye(R, dtype=torch.bool, device=ids.device).expand(B, R, R).contiguous()
            self._level_step(ctx, ids, pos, mask, cross, glimpse)

    # ------------------------------------------------------------------ one step
    def propose(self, ctx: DraftContext) -> Proposal:
        t0 = time.perf_counter()
        m, cache = self.model, self.cache
        B, dev = ctx.root.shape[0], ctx.root.device
        if self.fallback and not self._plan(ctx):  # a pause: nothing to verify but the root
            self._gap += 1
            self.skipped += 1
            self.sizes.append(0)
            self._last = None
            empty = ctx.root.new_zeros(B, 0)
            return Proposal(empty, empty.clone(), empty.bool(), empty.float())
        root_pos = ctx.lengths - 1
        cross = self._cross(ctx)
        # 1. catch up: positions trusted .. root (c rows a sequence), right-padded to W rows,
        # W known on the host (no device read): a sequence still decoding committed 1 token a
        # skipped step and 1 .. reach + 1 in the last drafted one (reach: the deepest node, a
        # grown one or lookup's), so c <= W = reach + 1 + gap, and its padding ends at most
        # reach rows past its root. A finished one (nothing
        # committed) starts its window earlier instead, rewriting committed rows nobody reads
        # again. So the scratch needs no room for pauses.
        W = self._reach + 1 + self._gap
        self._gap = 0
        start = torch.minimum(self.trusted, root_pos + 1 + self._reach - W).clamp(min=0)
        c = root_pos - start + 1
        cache.lens.copy_(start)
        j = torch.arange(W, device=dev)
        pos = start[:, None] + j
        cap = ctx.tokens.shape[1]
        ids = torch.where(j < c[:, None], ctx.tokens.gather(1, pos.clamp(max=cap - 1)), 0)
        causal = torch.ones(W, W, dtype=torch.bool, device=dev).tril().expand(B, W, W)
        glimpse = self._glimpse_rows(ctx, pos)
        logits = m.step(ids, pos, causal, cache, cross, logits_index=c - 1, glimpse=glimpse)
        # every tree node reads the root's glimpse (row c - 1 of the catch-up)
        glimpse = None if glimpse is None else glimpse[torch.arange(B, device=dev), c - 1]
        cache.lens.copy_(root_pos + 1)
        self.trusted = root_pos + 1
        # 2. grow
        K, beam = self.top_k, self.beam
        p, col = torch.softmax(logits, -1).topk(K, -1)
        tok, v = m.vocab_ids[col], p  # candidates (B, C)
        parent = torch.full((B, K), -1, dtype=torch.int64, device=dev)  # candidate index, -1: root
        depth = torch.ones(B, K, dtype=torch.int64, device=dev)
        run_cand = torch.zeros(B, 0, dtype=torch.int64, device=dev)  # expanded candidates, in run order
        level_lo = 0
        deepest = 1  # the candidates' depth, known on the host
        # Asked once, before the first level (asking before each one measured as a loss). The
        # root's candidates come sorted from topk: its best `beam` are the first. A level's cost
        # is guessed at the last one measured (the catch-up forward, wider, until there is one).
        guess = self._t_level if self._t_level is not None else time.perf_counter() - t0
        grow = self._level_pays(v, v[:, :beam], time.perf_counter() - t0, guess, ctx.active,
                                levels=self.depth - 1)
        t_start = None  # when the last grown level began
        for _ in range(2, self.depth + 1 if grow else 2):
            level = torch.arange(level_lo, v.shape[1], device=dev)
            best = float(v[:, level].max())  # a host read (free on the CPU): after the last level
            if t_start is not None:  # so its time includes its GPU work (a replay queues in µs)
                self._t_level = time.perf_counter() - t_start
            if best < self.min_expand:
                break
            pick = v[:, level].topk(beam, -1).indices + level_lo  # (B, beam) best of the last level
            t_start = time.perf_counter()
            run_cand = torch.cat([run_cand, pick], 1)
            R = run_cand.shape[1]
            run_tok = tok.gather(1, run_cand)
            run_depth = depth.gather(1, run_cand)
            # parent's run index (-1: the root, which is in the prefix)
            cand_run = torch.full_like(tok, -1).scatter(1, run_cand, torch.arange(R, device=dev).expand(B, R))
            par = parent.gather(1, run_cand)
            run_par = torch.where(par >= 0, cand_run.gather(1, par.clamp(min=0)), -1)
            mask = ancestor_mask(run_par)
            out = self._level_step(ctx, run_tok, root_pos[:, None] + run_depth, mask, cross, glimpse)
            cp, ccol = torch.softmax(out, -1).topk(K, -1)  # (B, beam, K)
            level_lo = v.shape[1]
            tok = torch.cat([tok, m.vocab_ids[ccol].reshape(B, -1)], 1)
            v = torch.cat([v, (v.gather(1, pick)[:, :, None] * cp).reshape(B, -1)], 1)
            parent = torch.cat([parent, pick[:, :, None].expand(B, beam, K).reshape(B, -1)], 1)
            depth = torch.cat([depth, (depth.gather(1, pick) + 1)[:, :, None].expand(B, beam, K).reshape(B, -1)], 1)
            deepest += 1  # (a last level at the depth limit stays untimed: no read follows it here)
        lookup = None
        if self.lookup:
            tok, v, parent, depth, lookup = self._merge_lookup(ctx, tok, v, parent, depth, deepest)
        # 3. size: keep the N best, N by expected tokens per second
        order = torch.sort(-v, dim=1, stable=True).indices  # parents first (never outranked)
        v_sorted = v.gather(1, order)
        measured = None if lookup is None else lookup[3].gather(1, order)  # lookup's estimates
        if self.fixed_size is not None:
            N = min(self.fixed_size, self.max_nodes, v_sorted.shape[1])
        else:
            N = self._best_size(v_sorted, time.perf_counter() - t0, ctx.active, measured)[0]
        sel = order[:, :N]
        slot = torch.full_like(tok, -1).scatter(1, sel, torch.arange(1, N + 1, device=dev).expand(B, N))
        sel_parent = parent.gather(1, sel)
        parents = torch.where(sel_parent >= 0, slot.gather(1, sel_parent.clamp(min=0)), 0)
        valid = ctx.active[:, None] & (v_sorted[:, :N] >= 0)  # columns not offered (v < 0) sort last
        proposal = Proposal(tok.gather(1, sel), parents, valid, v_sorted[:, :N].float())
        self.sizes.append(N)
        self._last = (proposal, root_pos.clone(), depth.gather(1, sel), None if lookup is None else lookup[:3],
                      None if lookup is None else measured[:, :N])
        return proposal

    def _level_step(self, ctx: DraftContext, ids, pos, mask, cross, glimpse):
        """One grown level's draft forward over the run so far, ``(batch, R)`` rows: the logits
        of its last ``beam`` rows. Eager without CUDA graphs; with them (``use_cuda_graphs``),
        replayed from one graph per run width ``R`` and generation, its inputs copied into
        static buffers (``capture=False``, the CPU tests' mode, runs the same path eagerly). A
        capture that fails turns the graphs off for the rest of the generation, with a
        warning: the level then runs eagerly, as it did before graphs."""
        m, beam = self.model, self.beam

        def eager():
            return m.step(ids, pos, mask, self.cache, cross, last_rows=beam, glimpse=glimpse)
        if self._graph_mode is None or self._level_graphs_failed:
            return eager()
        from glide.model.graphs import CapturedCall

        if ctx is not self._graph_ctx:  # the graphs hold this context's tensors
            self._graphs, self._graph_ctx = {}, ctx
        key = ("level", ids.shape[1])
        entry = self._graphs.get(key)
        if entry is None:
            # the inputs' static copies, and the step's cross-attention: a captured graph keeps
            # the first (on CUDA it reads the target's lengths on the device); an eager run
            # (capture=False) takes each step's own
            static = [ids.clone(), pos.clone(), mask.clone(), None if glimpse is None else glimpse.clone(), cross]
            cache = self.cache

            def body(s=static):
                return m.step(s[0], s[1], s[2], cache, s[4], last_rows=beam, checked=False, glimpse=s[3])
            entry = self._graphs[key] = (static, CapturedCall(body, self._graph_mode, ids.device))
        static, call = entry
        for dst, src in zip(static, (ids, pos, mask, glimpse)):
            if dst is not None:
                dst.copy_(src)
        static[4] = cross
        try:
            return call.run()
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # a capture the CUDA runtime refused: stay eager
            if call.graph is not None or not self._graph_mode:
                raise
            import warnings

            warnings.warn(f"draft: the dynamic tree's level forwards run eagerly, a CUDA graph "
                          f"capture failed: {exc}", RuntimeWarning, stacklevel=2)
            self._level_graphs_failed = True
            return eager()

    def _merge_lookup(self, ctx: DraftContext, tok, v, parent, depth, deepest: int | None = None):
        """Merge the prompt-lookup chain into the candidates ``(tok, v, parent, depth)``, each
        (batch, C): returns them extended by ``lookup`` columns (a column not offered, or
        merged into an equal candidate, gets ``v = -1``), and ``(chain, valid, n, touched)``:
        the lookup tokens, their validity, the suffix length matched, and which candidates
        carry lookup's estimate (created, or raised above the draft's own ``v``).
        ``deepest``, when the caller knows it, bounds the candidates' depth (``self.depth``
        otherwise): the walk up their ancestors takes that many steps, no more."""
        B, dev = tok.shape[0], tok.device
        k = self.lookup
        chain, ok, n = lookup_continuation(ctx.tokens, ctx.lengths, ctx.active, self.lookup_ngram, k)
        if self.ngrams is not None:  # rows whose history has no continuation take the corpus's
            # the walk's one host read also carries which rows missed (it walks only those)
            miss = ctx.active & ~ok[:, 0]
            corpus, corpus_ok = self.ngrams.continuation(ctx.tokens, ctx.lengths, miss, k)
            chain = torch.where(miss[:, None], corpus, chain)
            ok = torch.where(miss[:, None], corpus_ok, ok)
            # n is 0 on those rows: the rate table's bucket 0 (no history match) rates the corpus
        if self._lookup_counts is None or self._lookup_counts.device != dev:
            self._lookup_counts = torch.zeros(2, self.lookup_ngram + 1, k, dtype=torch.float64, device=dev)
        seen, matched = self._lookup_counts
        rate = ((matched[n] + 1) / (seen[n] + 2)).to(v.dtype)  # (B, k): each row's suffix length
        C = tok.shape[1]
        # the candidates that spell a prefix of the chain: their token is the chain's at their
        # depth and so are their ancestors' (draft candidates are at most `depth` deep)
        at = (depth - 1).clamp(max=k - 1)
        spell = (depth <= k) & (tok == chain.gather(1, at)) & ok.gather(1, at)
        for _ in range(min(self.depth if deepest is None else deepest, k) - 1):
            spell = spell & torch.where(parent >= 0, spell.gather(1, parent.clamp(min=0)), True)
        levels = torch.arange(1, k + 1, device=dev)
        hit = spell[:, :, None] & (depth[:, :, None] == levels)  # (B, C, k): siblings are distinct
        found = hit.any(1)  # a prefix of each row's chain
        # each chain token's column: the equal candidate, or a new one after the candidates
        node = torch.where(found, hit.int().argmax(1), C + levels - 1)
        own = v.gather(1, node.clamp(max=C - 1))
        est, want = chain_estimates(rate, own, found, ok)
        raised = found & (want > own)  # the candidate now carries lookup's estimate
        mine = raised | (~found & (est >= 0))  # raised, or new
        v = torch.cat([v, v.new_full((B, k), -1.0)], 1).scatter(1, node, est)
        touched = torch.zeros(B, C + k, dtype=torch.bool, device=dev).scatter(1, node, mine)
        tok = torch.cat([tok, chain], 1)
        parent = torch.cat([parent, torch.full((B, 1), -1, dtype=parent.dtype, device=dev), node[:, :-1]], 1)
        depth = torch.cat([depth, levels.expand(B, k).to(depth.dtype)], 1)
        return tok, v, parent, depth, (chain, ok, n, touched)

    def _plan(self, ctx: DraftContext) -> bool:
        """Whether this step drafts: times the last step (see :meth:`_account`), then asks
        :meth:`_decide`."""
        now = self._clock()
        # the engine's host counts (no device read): tokens emitted so far, rows still decoding
        committed, rows = ctx.emitted, ctx.live
        if self._prev is not None:
            drafted, then, before, live = self._prev
            if drafted not in self._warm:  # a generation's first step of each kind runs cold
                self._warm.add(drafted)  # (new shapes: measured 30% slow for plain steps at batch 4)
            elif live > 0:
                # tokens a row still decoding: a step's time hardly shrinks as rows finish
                self._account(drafted, (committed - before) / live, now - then)
                self.step_seconds[drafted].append(now - then)
        draft = self._decide()
        self._prev = (draft, now, committed, rows)
        return draft

    # A pause starts when drafted steps run below this fraction of the plain rate. Drafted
    # steps emit 1 to depth + 1 tokens a row, so their smoothed rate wanders by ~15% at batch 1:
    # at 1.0 a draft that paid 1.25x paused often enough to cost 3% greedy at batch 1
    # (profiles/cpu-amd-epyc-2c/draft-eval-pause-v2.json).
    PAUSE_BELOW = 0.9
    # Drafted steps measured before the first pause (one step's tokens say little).
    WARM_UP = 4
    # The share of its weight the drafted rate keeps into the next generation: there the first
    # drafted steps count as much as the whole past (a new prompt may suit the draft better).
    CARRY = 0.25
    # The deficit below PAUSE_BELOW at which pauses may reach max_skip (see _longest_pause).
    # Measured deficits at the pause decisions (held-out prompts, 2-core CPU): batch 4 greedy,
    # median ratio 0.73; batch 1 at temperature 1, 0.81; batch 1 greedy, 1.08 (10% below 0.89).
    DEEP = 0.2

    def _account(self, drafted: bool, tokens: float, seconds: float) -> None:
        """Add a step that emitted ``tokens`` (a row's) in ``seconds`` to its kind's
        smoothed rate: exponentially weighted sums of tokens and of seconds, with weight 1/8
        for the noisy drafted steps and 1/2 for plain ones. Both sums start at zero, so their
        ratio is a weighted mean of the steps so far (the first step counts no more than the
        others)."""
        a = 0.125 if drafted else 0.5
        tok, sec, n = self._rates.get(drafted, (0.0, 0.0, 0))
        self._rates[drafted] = ((1 - a) * tok + a * tokens, (1 - a) * sec + a * seconds, n + 1)

    def _decide(self) -> bool:
        """The pause policy. A pause's steps are plain; the step after a pause drafts (a probe).
        The first ``WARM_UP`` measured steps draft. Then, with no plain step measured yet, or
        ``refresh`` drafted steps since the last, one plain step measures the plain rate. Then
        drafted steps at a smoothed tokens per second below ``PAUSE_BELOW`` times the plain
        one start a pause: 1 step, twice the last after each probe that still loses, up to
        :meth:`_longest_pause` of the deficit (``max_skip`` when it is deep); a step that
        drafts on the rates halves the back-off (one lucky probe near the threshold would
        otherwise restart the doubling from 1). A probe is timed with
        its catch-up over the pause's tokens, which makes it look a little slower than a
        drafted step in a run (a bias towards pausing, small beside a step's verification)."""
        if self._skip > 0:
            self._skip -= 1
            return self._plain()
        if self._probe:
            self._probe = False
            return self._drafted()
        drafted, plain = self._rates.get(True), self._rates.get(False)
        if drafted is None or drafted[2] < self.WARM_UP:
            return self._drafted()
        if plain is None or self._since_plain >= self.refresh:
            return self._plain()
        if drafted[0] * plain[1] < self.PAUSE_BELOW * plain[0] * drafted[1]:
            ratio = drafted[0] * plain[1] / max(plain[0] * drafted[1], 1e-30)
            self._backoff = min(max(1, 2 * self._backoff), self._longest_pause(ratio))
            self._skip, self._probe = self._backoff - 1, True
            return self._plain()
        self._backoff //= 2
        return self._drafted()

    def _longest_pause(self, ratio: float) -> int:
        """The longest pause while drafted steps run at ``ratio`` times the plain rate: from 1
        step just below ``PAUSE_BELOW`` up to ``max_skip`` at ``DEEP`` below it. A probe's
        chance of finding drafting worth it again falls with the deficit, and its cost stays."""
        share = min(1.0, max(0.0, (self.PAUSE_BELOW - ratio) / self.DEEP))
        return max(1, min(self.max_skip, round(self.max_skip * share)))

    def _plain(self) -> bool:
        self._since_plain = 0
        return False

    def _drafted(self) -> bool:
        self._since_plain += 1
        return True

    def _expected(self, v: torch.Tensor, active: torch.Tensor, measured: torch.Tensor | None = None) -> torch.Tensor:
        """Expected acceptance of candidates with path probabilities ``v`` (calibrated), 0 for
        finished sequences and for lookup columns not offered (``v < 0``). Candidates marked
        ``measured`` carry lookup's estimate, a measured rate already: not calibrated."""
        f = self.calibration.mapping(v.clamp(min=0)) if self.calibration is not None else v
        if measured is not None:
            f = torch.where(measured, v.to(f.dtype), f)
        return torch.where(active[:, None] & (v >= 0), f, 0.0)

    def _best_size(self, v_sorted: torch.Tensor, t_draft: float, active: torch.Tensor,
                   measured: torch.Tensor | None = None):
        """``(N, expected tokens, seconds)`` of the step's best tree from candidates ``v_sorted``
        (best first) after ``t_draft`` seconds of drafting: ``N`` maximises their ratio
        (``measured``: see :meth:`_expected`)."""
        limit = min(self.max_nodes, v_sorted.shape[1])
        f = self._expected(v_sorted, active, measured)
        # expected tokens of the batch for N = 0..limit: one bonus per active sequence plus the nodes
        gain = active.sum() + torch.cat([f.new_zeros(f.shape[0], 1), f[:, :limit].cumsum(1)], 1).sum(0)
        gain = gain.double().cpu().numpy()
        seconds = t_draft + self.cost(np.arange(limit + 1) + 1)
        n = int(np.argmax(gain / seconds))
        return n, float(gain[n]), float(seconds[n])

    def _level_pays(self, v_sorted: torch.Tensor, v_expand: torch.Tensor, t_draft: float, t_level: float,
                    active: torch.Tensor, levels: int = 1) -> bool:
        """Whether growing more levels can raise the step's expected tokens per second, given
        the candidates ``v_sorted`` (batch, C), best first.

        The children of the ``v_expand`` nodes hold at most their parents' probability mass,
        and so does every later level, so ``L`` more levels add about ``L * sum f(v_expand)``
        expected tokens at best (``f`` the calibration), for ``L`` more draft forwards (each
        guessed at ``t_level``, the last one's time) and, at best, a tree only ``L`` nodes
        wider. It does not pay when that bound loses to the best tree already in hand for
        every ``L`` up to ``levels``.
        """
        if not self.growth_check or self.fixed_size is not None or self.cost is None:
            return True
        n, gain, seconds = self._best_size(v_sorted, t_draft, active)
        bound = float(self._expected(v_expand, active).sum())
        for L in range(1, levels + 1):
            wider = min(n + L, self.max_nodes)  # at best, one node a level carries it all
            if (gain + L * bound) / (t_draft + L * t_level + float(self.cost(wider + 1))) > gain / seconds:
                return True
        return False

    def observe(self, ctx: DraftContext) -> None:
        if self._last is None:
            return
        prop, root_pos, depth, lookup, touched = self._last
        cap = ctx.tokens.shape[1]
        emitted = ctx.lengths - 1 - root_pos  # tokens committed after the old root
        if lookup is not None:
            # a lookup token is judged where the target's token is known (the bonus included),
            # after every lookup token above it matched
            chain, ok, n = lookup
            j = torch.arange(chain.shape[1], device=chain.device)
            right = chain == ctx.tokens.gather(1, (root_pos[:, None] + 1 + j).clamp(max=cap - 1))
            above = torch.cat([torch.ones_like(right[:, :1]), right[:, :-1].int().cummin(1).values.bool()], 1)
            seen = ok & above & (j < emitted[:, None])
            self._lookup_counts.index_add_(1, n, torch.stack([seen, seen & right]).to(torch.float64))
        if self.record is None:
            return
        B, N = prop.tokens.shape
        if N == 0:
            return
        want = ctx.tokens.gather(1, (root_pos[:, None] + depth).clamp(max=cap - 1))
        match = (prop.tokens == want) & (depth < emitted[:, None]) & prop.valid
        # a node is accepted when it and all its ancestors carry the committed tokens; the last
        # emitted token is the bonus, never a node (depth < emitted)
        minus = torch.full((B, 1), -1, dtype=torch.int64, device=prop.tokens.device)
        anc = ancestor_mask(torch.cat([minus, torch.where(prop.valid, prop.parents, -1)], 1))[:, 1:, 1:]
        ok = ~(anc & ~match[:, None, :]).any(-1)
        # the calibration is the draft's: nodes lookup made or raised carry another estimate
        mine = prop.valid if touched is None else prop.valid & ~touched
        self.record.add(prop.draft_probs[mine], ok[mine])


# ---------------------------------------------------------------------------- shipped calibration
CALIBRATION = "calibration.json"


def chain_estimates(rate: torch.Tensor, own: torch.Tensor, found: torch.Tensor, ok: torch.Tensor):
    """Lookup's estimates down a chain of ``k`` tokens.

    Chain token ``j`` gets ``x_j = max(a_j, x_{j-1} * rate_j)`` with ``x_{-1} = 1``: ``a_j`` is
    the own ``v`` of the draft candidate equal to it (``found``), else 0 (a new node gets the
    product alone). A token past the valid prefix gets -1 (``ok`` is a prefix of each row, and
    ``found`` implies ``ok``). With ``P_j = rate_0 * ... * rate_j`` the recurrence unrolls to
    ``P_j * max(1, max_{i <= j} a_i / P_i)``: one cumulative product and one cumulative max,
    not a loop down the chain (a dozen small ops per token on the host). In float64, with P
    kept above 0: at a rate of 1e-4 a token, P_11 is 1e-48, which float32 rounds to 0.

    Parameters
    ----------
    rate : torch.Tensor, shape (batch, k), floating
        Measured acceptance rate of each chain position, in (0, 1].
    own : torch.Tensor, shape (batch, k), floating, >= 0 where ``found``
    found, ok : torch.Tensor, shape (batch, k), bool

    Returns
    -------
    est : torch.Tensor, shape (batch, k), dtype of ``rate``
        ``x_j``, or -1 past the valid prefix.
    want : torch.Tensor, shape (batch, k), dtype of ``rate``
        ``x_{j-1} * rate_j``: lookup's own estimate, before the max with ``a_j`` (meaningful
        where ``ok``).
    """
    r64 = rate.double()
    P = r64.cumprod(1).clamp(min=1e-300)
    a = torch.where(found, own.double(), 0.0)
    x = P * torch.cummax(a / P, 1).values.clamp(min=1.0)
    want = torch.cat([r64[:, :1], x[:, :-1] * r64[:, 1:]], 1)
    return torch.where(ok, x, -1.0).to(rate.dtype), want.to(rate.dtype)


def record_calibration(target, net, prompts, max_new_tokens: int = 128, temperature: float = 0.0,
                       seed: int = 0, eos_token_ids=(), progress: bool = False) -> tuple[Calibration, list]:
    """Decode ``prompts`` one at a time with the uncalibrated dynamic tree and record, for every
    proposed node, its predicted acceptance ``v`` and whether the target accepted it.

    Parameters
    ----------
    target : LlamaModel
    net : GlideDraftModel
        Attached to ``target``.
    prompts : list of list of int
        Prompt token ids (chat template applied). Use prompts from the training distribution,
        never the held-out evaluation prompts.
    max_new_tokens, temperature, seed, eos_token_ids
        As in :func:`glide.speculative.engine.generate_ids`.

    Returns
    -------
    (Calibration, list of int, VerifyCost)
        The table, the tree size chosen at every step, and the verify-cost curve the trees were
        sized with (measured or read at the first prompt, then kept).
    """
    from tqdm.auto import tqdm

    from glide.speculative.engine import generate_ids

    if not prompts:
        raise ValueError("prompts: need at least one prompt to calibrate on")
    rec = Calibration()
    # every step drafts (no pauses): the table should see every kind of step; one draft, so that
    # its verify-cost curve is looked up once
    d = DynamicTreeDraft(net, record=rec, fallback=False, lookup=0)  # the draft's own estimates
    for ids in tqdm(prompts, desc=f"calibrate T={temperature:g}", disable=not progress):
        generate_ids(target, [list(ids)], d, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, eos_token_ids=eos_token_ids)
    return rec, d.sizes, d.cost


def _calibration_key(temperature: float) -> str:
    return "greedy" if temperature == 0 else "sampled"


def save_calibration(draft_path, tables: dict, info: dict | None = None) -> Path:
    """Write ``tables`` (``{"greedy": Calibration, "sampled": Calibration}``, either may be
    missing) to ``calibration.json`` in the draft folder, atomically; returns the file."""
    from glide.train.corpus import atomic_write

    from .checkpoint import _folder

    bad = set(tables) - {"greedy", "sampled"}
    if bad:
        raise ValueError(f"tables: unknown key(s) {sorted(bad)}; use 'greedy' and 'sampled'")
    path = _folder(draft_path) / CALIBRATION
    body = {"format": "glide-calibration", "version": 1, "info": info or {},
            "tables": {k: c.to_dict() for k, c in tables.items()}}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1) + "\n"))
    return path


def load_ngrams(draft_path, vocab_size: int) -> NgramTable | None:
    """The corpus n-gram table a draft folder ships (``ngrams.npz``), or ``None`` when it has none.

    Raises
    ------
    ValueError
        Naming ``draft``, for a damaged table or one built for another vocabulary than
        ``vocab_size`` (the target's).
    """
    from glide.speculative.ngrams import NGRAMS

    from .checkpoint import _folder

    path = _folder(draft_path) / NGRAMS
    if not path.is_file():
        return None
    try:
        table = NgramTable.load(path)
        table.check_vocab(vocab_size)
    except ValueError as exc:
        raise ValueError(f"draft: {path}: {str(exc).removeprefix('ngrams: ')}") from None
    return table


def load_calibration(draft_path, temperature: float) -> Calibration | None:
    """The calibration a draft folder ships for ``temperature`` (``greedy`` at 0, ``sampled``,
    recorded at temperature 1, above), or ``None`` when it has none.

    Raises
    ------
    ValueError
        Naming ``draft``, for a damaged ``calibration.json``.
    """
    from .checkpoint import _folder

    path = _folder(draft_path) / CALIBRATION
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("format") != "glide-calibration":
            raise ValueError(f"format is {body.get('format')!r}, not 'glide-calibration'")
        table = body["tables"].get(_calibration_key(temperature))
        if table is None:
            return None
        cal = Calibration.from_dict(table)
        n = len(cal.edges) - 1
        if n < 1 or not (len(cal.predicted) == len(cal.accepted) == len(cal.count) == n):
            raise ValueError("its bucket lists differ in length")
        return cal
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"draft: cannot read {path}: {exc}") from None
