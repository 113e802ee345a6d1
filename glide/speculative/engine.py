"""The decode loop: prefill, then draft -> one tree-verification forward -> accept -> compact.

Autoregressive decoding is the same loop with no draft (the tree is just the root), on a
lean path: one ``model.decode`` per step and no compaction.

Each step makes one host sync, to learn how many tokens each sequence emitted and whether all
are done; sequences that finished stay in the batch but commit nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from glide.model.graphs import CudaGraphs, graphs_for

from .drafts import Draft, DraftContext
from .tree import Tree, build_tree, raise_problems
from .verify import (ACCEPT_STREAM, DRAFT_STREAM, check_sampling, counter_uniforms, process_logits, sample, stream_keys,
                     substream_keys, verify_greedy, verify_logits, verify_residual)

__all__ = ["SequenceOutput", "generate_ids"]


@dataclass
class SequenceOutput:
    """One sequence's result.

    Attributes
    ----------
    output_ids : list of int
        New tokens only, EOS included if emitted, at most ``max_new_tokens``.
    target_forwards : int
        Target forwards after the prefill while this sequence was active.
    seconds : float
        Wall time from the end of the prefill until this sequence finished.
    accepted : list of int
        New tokens after each of those forwards (the first token, from the prefill, is not
        in it).
    """

    output_ids: list[int] = field(default_factory=list)
    target_forwards: int = 0
    seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """New tokens per target forward (``nan`` if there was none)."""
        return sum(self.accepted) / len(self.accepted) if self.accepted else math.nan


class _Batch:
    """Device-side state of the batch: committed tokens, lengths, who is still active."""

    def __init__(self, prompts, capacity, max_new_tokens, eos_token_ids, device):
        B = len(prompts)
        # One extra "sink" column takes the writes of tokens that are not kept.
        padded = [list(p) + [0] * (capacity + 1 - len(p)) for p in prompts]
        self.tokens = torch.tensor(padded, dtype=torch.int64).to(device)
        self.lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        self.num_new = torch.zeros(B, dtype=torch.int64, device=device)
        self.active = torch.ones(B, dtype=torch.bool, device=device)
        self.root = torch.zeros(B, dtype=torch.int64, device=device)
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64, device=device)
        self.max_new = max_new_tokens
        self.rows = torch.arange(B, device=device)
        # the target's hidden state at every committed position, with the same sink column, for
        # a draft that reads it (start_hidden); None otherwise
        self.hidden = None

    def start_hidden(self, prompt_hidden: torch.Tensor) -> None:
        """Keep hidden states from the prefill's (batch, longest prompt, H) on."""
        B, P, H = prompt_hidden.shape
        self.hidden = prompt_hidden.new_zeros(B, self.tokens.shape[1], H)
        self.hidden[:, :P] = prompt_hidden

    def context(self, model, cache) -> DraftContext:
        # Views of the state: updated in place, so one context serves the whole run.
        return DraftContext(model, cache, self.tokens[:, :-1], self.lengths, self.root, self.active,
                            hidden_states=None if self.hidden is None else self.hidden[:, :-1])

    def keep_hidden(self, step_hidden, slots, count) -> None:
        """Write the target's hidden states of the committed slots: ``hidden[b, r + j] =
        step_hidden[b, slots[b, j]]`` for ``j < count[b]``, ``r`` the old root's position (call
        before :meth:`emit`); the other slots go to the sink column."""
        n = slots.shape[1]
        j = torch.arange(n, device=slots.device)
        pos = torch.where(j < count[:, None], self.lengths[:, None] - 1 + j, self.hidden.shape[1] - 1)
        rows = step_hidden.gather(1, slots[:, :, None].expand(-1, -1, step_hidden.shape[-1]))
        self.hidden.scatter_(1, pos[:, :, None].expand_as(rows), rows.to(self.hidden.dtype))

    def emit(self, new: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Append ``new[b, :count[b]]`` (B, A), cut at EOS and ``max_new_tokens``; return the kept
        counts (0 for finished sequences)."""
        A = new.shape[1]
        slots = torch.arange(A, device=new.device)
        count = torch.where(self.active, torch.minimum(count, self.max_new - self.num_new), 0)
        is_eos = torch.isin(new, self.eos) & (slots < count[:, None])
        hit = is_eos.any(-1)
        count = torch.where(hit, is_eos.int().argmax(-1) + 1, count)
        pos = torch.where(slots < count[:, None], self.lengths[:, None] + slots, self.tokens.shape[1] - 1)
        self.tokens.scatter_(1, pos, new)
        self.lengths += count
        self.num_new += count
        self.root.copy_(self.tokens[self.rows, self.lengths - 1])
        self.active &= ~hit & (self.num_new < self.max_new)
        return count

    def emit_one(self, new: torch.Tensor) -> torch.Tensor:
        """:meth:`emit` of one token a sequence (``new`` (B, 1), every count 1), the AR step's
        case, in about half the ops: an active sequence always has room for one more token
        (``active`` drops when ``num_new`` reaches ``max_new_tokens``), and one token is cut at
        EOS only after itself. Same state and result as ``emit(new, ones)``."""
        tok = new[:, 0]
        count = self.active.long()
        hit = torch.isin(tok, self.eos) & self.active
        pos = torch.where(self.active, self.lengths, self.tokens.shape[1] - 1)
        self.tokens.scatter_(1, pos[:, None], new)
        self.lengths += count
        self.num_new += count
        self.root.copy_(torch.where(self.active, tok, self.root))
        self.active &= ~hit & (self.num_new < self.max_new)
        return count


def room(draft: Draft | None) -> int:
    """Positions a request needs past its longest prompt plus ``max_new_tokens``: the root's
    slot for AR, else :meth:`Draft.reserve` (the verification tree, and a draft's own scratch
    rows)."""
    return draft.reserve() if isinstance(draft, Draft) else 1


def _check_inputs(model, prompts, draft, max_new_tokens, temperature, top_p, reserve):
    check_sampling(temperature, top_p)
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in p):
            raise ValueError(f"prompts[{i}] holds a token id outside [0, {vocab})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    need = max(len(p) for p in prompts) + max_new_tokens + reserve
    limit = model.config.max_position_embeddings
    if need > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is too long: the longest prompt plus max_new_tokens plus "
            f"{reserve} positions of room (the verification tree, the draft's scratch) needs {need} positions, "
            f"the model has {limit}"
        )
    if draft is not None:
        if not isinstance(draft, Draft):
            raise TypeError(f"draft must be a glide.speculative.drafts.Draft, got {type(draft).__name__}")
        draft.check(model)


def _check_row_ids(row_ids, batch, seed) -> list[int]:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if row_ids is None:
        return list(range(batch))
    if isinstance(row_ids, torch.Tensor):
        row_ids = row_ids.tolist()
    row_ids = list(row_ids)
    if len(row_ids) != batch:
        raise ValueError(f"row_ids must hold one id per prompt ({batch}), got {len(row_ids)}")
    if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 2 ** 63 for r in row_ids):
        raise ValueError("row_ids must be ints in [0, 2**63)")
    return row_ids


def generate_ids(model, prompts, draft: Draft | None = None, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_ids=(), seed: int = 0,
                 row_ids=None, on_tokens=None, cuda_graphs=None) -> list[SequenceOutput]:
    """Generate from a batch of prompts, speculatively with ``draft`` or autoregressively.

    Greedy speculative output equals greedy autoregressive output token for token; sampled
    output has the same law (see :mod:`glide.speculative.verify`).

    Parameters
    ----------
    model : LlamaModel
    prompts : list of list of int
        ``batch`` non-empty prompts of any lengths.
    draft : Draft, optional
        ``None`` decodes autoregressively.
    max_new_tokens : int
        Per sequence, the first token (from the prefill) included.
    temperature : float
        ``0`` is greedy.
    top_p : float, in (0, 1]
    eos_token_ids : iterable of int
        A sequence stops after emitting any of these.
    seed : int
        With ``row_ids``, fixes all sampling: the token at output position ``k`` of prompt
        ``b`` is drawn by inverse CDF at a uniform hashed from ``(seed, row_ids[b], k)``, so a
        prompt's sample depends neither on the other prompts in the batch nor on the draft
        (up to floating-point differences between forwards).
    row_ids : sequence of int, optional
        ``batch`` non-negative ints naming each prompt's random stream, e.g. its index in the
        whole input; ``range(batch)`` by default. Equal ids with equal prompts give equal
        samples.
    on_tokens : callable, optional
        ``on_tokens(seq_index, new_token_ids)`` after every step that emitted tokens (on
        CUDA without a draft, one step later: the AR loop reads its tokens a step behind,
        see :func:`_ar_steps_lagged`).
    cuda_graphs : bool or CudaGraphs, optional
        Replay the target's decode and verification forwards from CUDA graphs
        (:mod:`glide.model.graphs`). ``None`` (the default) turns them on for a model on
        CUDA; ``False`` runs every forward eagerly. A :class:`CudaGraphs` is used as given
        (tests pass one with ``capture=False``). The prefill runs eagerly; the draft is told
        through :meth:`Draft.use_cuda_graphs` (the GliDe drafts capture their chain).

    Returns
    -------
    list of SequenceOutput, one per prompt

    Raises
    ------
    ValueError
        Naming ``prompts``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``,
        ``row_ids`` or ``draft``.
    """
    tree_size = 1 + (draft.max_nodes if draft is not None else 0)
    _check_inputs(model, prompts, draft, max_new_tokens, temperature, top_p, room(draft))
    B, dev = len(prompts), model.device
    row_ids = _check_row_ids(row_ids, B, seed)
    target = cuda_graphs if isinstance(cuda_graphs, CudaGraphs) else graphs_for(model, cuda_graphs)
    if target is None:
        target = model
    elif target.model is not model:
        raise ValueError("cuda_graphs holds the graphs of another model")
    capacity = max(len(p) for p in prompts) + max_new_tokens
    cache = target.new_cache(B, capacity + tree_size)
    state = _Batch(prompts, capacity, max_new_tokens, eos_token_ids or (), dev)
    keys = stream_keys(seed, row_ids, device=dev)
    greedy = temperature == 0.0
    try:
        return _decode(model, target, cache, prompts, draft, state, keys, greedy, temperature, top_p,
                       on_tokens)
    finally:
        if target is not model:
            target.release(cache)


def _decode(model, target, cache, prompts, draft, state, keys, greedy, temperature, top_p, on_tokens):
    """:func:`generate_ids` after its checks: prefill, then steps until every sequence is done."""
    B, dev = len(prompts), model.device

    def pick(logits):  # (B, V) -> (B,), the token at output position num_new
        if greedy:
            return logits.argmax(-1)
        u = counter_uniforms(keys, state.num_new)
        return sample(process_logits(logits, temperature, top_p), uniforms=u)

    accept_keys = None if greedy else substream_keys(keys, ACCEPT_STREAM)[:, None]

    def verify(tree, logits, dists=None):  # (B, T, V) -> Verdict; depth d picks position num_new + d
        if greedy:
            return verify_greedy(tree, logits)
        at = state.num_new[:, None] + tree.depth
        if dists is not None:  # a sampled chain: the residual rule, with a second uniform a slot
            return verify_residual(tree, logits, dists, temperature, top_p, counter_uniforms(keys[:, None], at),
                                   counter_uniforms(accept_keys, at))
        return verify_logits(tree, logits, temperature, top_p, counter_uniforms(keys[:, None], at))

    outputs = [SequenceOutput() for _ in range(B)]
    want_hidden = draft is not None and draft.needs_hidden
    logits = target.prefill([list(p) for p in prompts], cache, return_hidden=want_hidden)
    if want_hidden:
        logits, prompt_hidden = logits
        state.start_hidden(prompt_hidden)
    if logits.device.type == "cuda":  # keep the asynchronous prefill out of the decode time
        torch.cuda.synchronize(logits.device)
    start = time.perf_counter()
    first = pick(logits)[:, None]
    emitted, live = _report(outputs, state.emit_one(first), first, state.active, None, start, on_tokens)
    ctx = state.context(model, cache)
    ctx.emitted, ctx.live = emitted, live
    if not greedy:
        ctx.temperature, ctx.top_p, ctx.num_new = temperature, top_p, state.num_new
        ctx.draft_keys = substream_keys(keys, DRAFT_STREAM)
    if draft is not None and live:
        t0 = time.perf_counter()
        draft.use_cuda_graphs(None if target is model else target.capture)
        draft.begin(ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        # the draft's prefill (and its graph capture) is set-up, like the target's prefill
        start += time.perf_counter() - t0
    if draft is None and ctx.live and _lagged_ar(dev):
        _ar_steps_lagged(target, cache, state, ctx, outputs, pick, start, on_tokens)
    while ctx.live:
        was_active = state.active.clone()
        if draft is None:  # AR: the tree is just the root, so commit it without compaction
            new = pick(target.decode(state.root, cache))[:, None]
            count, problems = state.emit_one(new), None
        else:
            new, count, problems = _speculative_step(model, target, cache, draft, ctx, state, verify, pick)
        emitted, ctx.live = _report(outputs, count, new, state.active, was_active, start, on_tokens, problems,
                                    model.config.vocab_size)
        ctx.emitted += emitted
    return outputs


def _lagged_ar(device: torch.device) -> bool:
    """Whether the AR loop reads each step's tokens one step late: on CUDA, where the forward
    runs asynchronously (from a CUDA graph by default), so the host's work of one step can
    overlap the next step's forward. On the CPU every op runs as it is issued: nothing to gain."""
    return device.type == "cuda"


def _ar_steps_lagged(target, cache, state, ctx, outputs, pick, start, on_tokens):
    """The AR loop with its one host read a step behind.

    A step's next input is ``state.root``, a device tensor, so step ``k + 1``'s forward, pick
    and emit are queued before the host reads step ``k``'s tokens (:func:`_hand_out`). That
    read must not wait for the whole stream (``tolist`` would, and so would wait for step
    ``k + 1``'s forward): step ``k``'s packed tokens go to a pinned host buffer by an
    asynchronous copy queued right after its emit, and the host waits on that copy's event.
    So the host hands out step ``k`` and queues step ``k + 2`` while the GPU runs step
    ``k + 1``: the per-step host work hides behind the forward instead of adding to it.

    The tokens and counts equal the plain loop's. The differences: ``on_tokens`` is called
    one step later (each sequence's ``seconds`` is stamped once its last step's tokens have
    reached the host, as in the plain loop), and one extra step runs after the last sequence
    finished. That step emits nothing (every sequence is inactive, so its writes go
    to the sink column) and its cache commit stays within the cache's spare slot.
    """
    dev = state.rows.device
    cuda = dev.type == "cuda"
    # Two (pinned host buffer, event) slots, alternating: step k's tokens land in one while the
    # host still reads step k - 1's from the other. The copy is queued right after step k's
    # emit and waited on through its event, so the wait ends before step k + 1's forward does.
    slots, pending = [], None
    while True:
        was_active = state.active.clone()
        new = pick(target.decode(state.root, cache))[:, None]
        packed = _pack(state.emit_one(new), new, state.active, was_active)
        if not slots:  # made once, shaped like the packed rows
            slots = [(torch.empty(packed.shape, dtype=packed.dtype, pin_memory=cuda),
                      torch.cuda.Event() if cuda else None) for _ in range(2)]
        buf, done = slots[0]
        buf.copy_(packed, non_blocking=cuda)
        if done is not None:
            done.record(torch.cuda.current_stream(dev))
        if pending is not None:
            if pending[1] is not None:
                pending[1].synchronize()
            emitted, ctx.live = _hand_out(outputs, pending[0].flatten().tolist(), packed.shape[1], False, start,
                                          on_tokens)
            ctx.emitted += emitted
            if not ctx.live:  # so the step just queued found no active sequence
                return
        pending = slots[0]
        slots.reverse()


def _speculative_step(model, target, cache, draft, ctx, state, verify, pick):
    """Draft a tree, verify it in one forward of ``target`` (the model or its CUDA graphs), keep
    the accepted path. Returns the emitted tokens (B, T), how many of them each sequence kept,
    and the draft's validity flags. A proposal with no nodes at all (a paused dynamic tree)
    runs as an AR step, ``pick`` on a one-token forward: the root's token is the one the
    tree's verification would pick (the same position's uniforms when sampling). Unlike the
    AR loop's decode it commits nothing for finished sequences, as compaction would not.
    For a draft that reads the target's hidden states, those of the committed positions go to
    ``state.hidden``."""
    want_hidden = state.hidden is not None
    proposal = draft.propose(ctx)
    if proposal.num_nodes > draft.max_nodes:
        raise ValueError(f"draft proposed {proposal.num_nodes} nodes, more than its max_nodes {draft.max_nodes}")
    if proposal.tokens.shape[1] == 0:
        # Every row still active (the host's count says so): commit 1, which keeps the cache's
        # common length too. Else only the active rows keep their token, and the cache is told
        # that no row keeps more than one: its host-side length bound stays known, so the next
        # graphed forward needs no device read of the lengths.
        all_live = ctx.live == state.rows.shape[0]
        logits = target.decode(state.root, cache, commit=1 if all_live else 0, return_hidden=want_hidden)
        if not all_live:
            cache.commit(state.active.long(), most=1)
        if want_hidden:
            logits, step_hidden = logits
            state.keep_hidden(step_hidden[:, None], state.rows[:, None] * 0, state.active.long())
        new = pick(logits)[:, None]
        count = state.emit_one(new)  # == the commit above: 1 for each sequence still active
        draft.observe(ctx)
        return new, count, None
    problems = proposal.problems(model.config.vocab_size)
    # never accept more than a sequence may still emit: this also bounds the positions used
    tree = build_tree(state.root, proposal, max_depth=(state.max_new - state.num_new - 1).clamp(min=0))
    if tree.tokens.device.type == "cpu":  # a host read is free here; it costs a sync on a GPU
        tree = _trim(tree)
    dists = proposal.draft_dists
    if dists is not None:
        dists = dists[:, :tree.tokens.shape[1] - 1]
    logits = target.forward(tree.tokens, cache.lens[:, None] + tree.depth, tree.mask, cache,
                            return_hidden=want_hidden)
    if want_hidden:
        logits, step_hidden = logits
    verdict = verify(tree, logits, dists)
    if want_hidden:  # before emit moves the lengths; a finished sequence's writes are moot
        state.keep_hidden(step_hidden, verdict.path_idx, verdict.path_lens * state.active)
    count = state.emit(verdict.tokens, verdict.path_lens)
    cache.compact(verdict.path_idx, count)  # the root and the accepted nodes, cut at EOS
    draft.observe(ctx)
    return verdict.tokens, count, problems


def _trim(tree: Tree) -> Tree:
    """Drop the trailing tree slots that no sequence uses (invalid or cut in every row).

    A draft with nothing to propose (a prompt-lookup miss) then costs a one-token forward, not
    a full-width one: on the 2-core CPU a 6-slot forward takes ~1.15x a 1-slot one
    (bench/verify_cost.py).
    """
    T = tree.tokens.shape[1]
    live = (tree.parents >= 0).any(0)  # the root (slot 0) has parent -1 and is always kept
    n = int(torch.where(live, torch.arange(T, device=live.device), 0).max()) + 1
    if n == T:
        return tree
    return Tree(tree.tokens[:, :n], tree.parents[:, :n], tree.mask[:, :n, :n], tree.depth[:, :n])


def _report(outputs, count, new, active, was_active, start, on_tokens, problems=None, vocab=None) -> tuple[int, int]:
    """The step's one host sync: hand out the emitted tokens, note who finished, and return
    the tokens emitted (all sequences) and the sequences still active. ``was_active`` is
    ``None`` for the prefill's token."""
    packed = _pack(count, new, active, was_active)
    flat = packed.flatten()
    if problems is not None:  # the draft's validity checks ride on the same transfer
        flat = torch.cat([flat, problems.long()])
    flat = flat.tolist()
    if problems is not None:
        raise_problems(flat[packed.numel():], vocab)
    return _hand_out(outputs, flat, packed.shape[1], was_active is None, start, on_tokens)


def _pack(count, new, active, was_active) -> torch.Tensor:
    """One (B, 3 + A) int64 tensor of what :func:`_hand_out` reads: per sequence the kept count,
    whether it is still active, whether this step ran a forward for it, and the tokens."""
    forward = was_active if was_active is not None else torch.zeros_like(active)
    return torch.cat([count[:, None], active[:, None].long(), forward[:, None].long(), new], 1)


def _hand_out(outputs, flat, width, prefill, start, on_tokens) -> tuple[int, int]:
    """:func:`_report`'s host side, on the rows of :func:`_pack` read as one flat list."""
    now = time.perf_counter()
    B = len(outputs)
    for b in range(B):
        n, still, counted = flat[b * width: b * width + 3]
        out = outputs[b]
        if counted:
            out.target_forwards += 1
            out.accepted.append(n)
        if n:
            ids = flat[b * width + 3: b * width + 3 + n]
            out.output_ids.extend(ids)
            if on_tokens is not None:
                on_tokens(b, ids)
        if (counted or prefill) and not still:
            out.seconds = now - start
    return sum(flat[b * width] for b in range(B)), sum(flat[b * width + 1] for b in range(B))
