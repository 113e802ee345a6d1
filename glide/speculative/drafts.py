"""Drafts behind one small interface, and the simple ones: prompt lookup, a small model, and
test drafts that are always right, always wrong, or random.

The engine calls :meth:`Draft.begin` once after the prefill, :meth:`Draft.propose` before every
verification forward, and :meth:`Draft.observe` after every commit. A draft only reads the
:class:`DraftContext`; in particular it never writes the target's cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import Proposal, ancestor_mask, depths

__all__ = [
    "DraftContext",
    "Draft",
    "PromptLookupDraft",
    "lookup_continuation",
    "check_count",
    "ModelDraft",
    "OracleDraft",
    "WrongDraft",
    "RandomTreeDraft",
]


@dataclass
class DraftContext:
    """What a draft may read.

    Attributes
    ----------
    model : LlamaModel
        The target.
    cache : KVCache
        The target's cache (read only): the committed prefix, without the root.
    tokens : torch.Tensor, shape (batch, capacity), int64
        Committed tokens: prompt then emitted ones; entries at ``>= lengths`` are garbage.
    lengths : torch.Tensor, shape (batch,), int64
        Prompt plus emitted tokens so far; the root is ``tokens[b, lengths[b] - 1]``.
    root : torch.Tensor, shape (batch,), int64
    active : torch.Tensor, shape (batch,), bool
        Sequences still generating; proposals for the others are ignored.
    emitted, live : int
        Host copies the engine keeps from its one host read a step: tokens emitted so far
        (all sequences, the prefill's first token included) and sequences still active. A
        draft that needs them reads no device tensor for them.
    hidden_states : torch.Tensor, shape (batch, capacity, hidden), or None
        The target's final hidden state (the LM head's input) at every position of the
        verified cache, ``< lengths - 1``; later entries are garbage. Kept only for a draft
        whose :attr:`Draft.needs_hidden` is true, else ``None``.
    temperature, top_p : float
        How the target samples (``temperature`` 0: greedy).
    draft_keys : torch.Tensor, shape (batch,), int64, or None
        When sampling, the keys of each row's random stream for a draft that samples its tokens
        (:data:`~glide.speculative.verify.DRAFT_STREAM` of the row's stream), apart from the
        target's picks and acceptance tests (:func:`~glide.speculative.verify.counter_uniforms`).
    num_new : torch.Tensor, shape (batch,), int64, or None
        Tokens each row has emitted: the root's child is emitted at output position
        ``num_new``, a node at depth ``d`` at ``num_new + d - 1``.
    """

    model: object
    cache: object
    tokens: torch.Tensor
    lengths: torch.Tensor
    root: torch.Tensor
    active: torch.Tensor
    emitted: int = 0
    live: int = 0
    hidden_states: torch.Tensor | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    draft_keys: torch.Tensor | None = None
    num_new: torch.Tensor | None = None


class Draft:
    """Base class: a draft proposes a token tree under the root at every step.

    Attributes
    ----------
    max_nodes : int
        Upper bound on ``Proposal.num_nodes``: the engine sizes the cache with it.
    needs_hidden : bool
        The draft reads the target's hidden states (:attr:`DraftContext.hidden_states`).
    """

    max_nodes: int = 0
    needs_hidden: bool = False

    def reserve(self) -> int:
        """Positions this draft needs beyond the longest prompt plus ``max_new_tokens``: the
        verification tree (the root and ``max_nodes``), or more where its own cache needs it."""
        return 1 + self.max_nodes

    def check(self, model) -> None:
        """Raise ValueError naming ``draft`` if this draft cannot serve ``model``."""

    def begin(self, ctx: DraftContext) -> None:
        """Called once, after the prefill and the first emitted token."""

    def propose(self, ctx: DraftContext) -> Proposal:
        """The tree to verify under ``ctx.root``: ``(batch, N)`` with ``N <= max_nodes``."""
        raise NotImplementedError

    def observe(self, ctx: DraftContext) -> None:
        """Called after each commit, with the updated context."""

    def use_cuda_graphs(self, capture) -> None:
        """Called by the engine before :meth:`begin`: ``True`` when the target's forwards replay
        CUDA graphs (a draft may capture its own steps too), ``False`` for the same static path
        without capture (CPU tests), ``None`` when everything runs eagerly. Ignored by
        default."""


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value``, an int (not a bool) ``>= minimum``; else ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _chain_parents(batch: int, n: int, device) -> torch.Tensor:
    """Parents of a chain: node ``j`` hangs under slot ``j`` (the previous node)."""
    return torch.arange(n, device=device).expand(batch, n).contiguous()


class PromptLookupDraft(Draft):
    """Propose the continuation of the most recent earlier match of the last n-gram.

    Tries ``ngram`` tokens, then shorter suffixes down to 1, in the sequence's own history
    (prompt and output); proposes up to ``num_tokens`` following tokens as a chain.

    Parameters
    ----------
    ngram : int
        Longest suffix to match.
    num_tokens : int
        Chain length.
    """

    def __init__(self, ngram: int = 3, num_tokens: int = 5):
        self.ngram = check_count("ngram", ngram)
        self.num_tokens = check_count("num_tokens", num_tokens)
        self.max_nodes = num_tokens

    def propose(self, ctx: DraftContext) -> Proposal:
        tokens, valid, _ = lookup_continuation(ctx.tokens, ctx.lengths, ctx.active, self.ngram, self.num_tokens)
        B = tokens.shape[0]
        return Proposal(tokens, _chain_parents(B, self.num_tokens, tokens.device), valid)


def lookup_continuation(tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor, ngram: int,
                        num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The continuation of the most recent earlier match of each sequence's last n-gram.

    Tries the last ``ngram`` tokens (the root's included), then shorter suffixes down to 1, in
    the sequence's own committed history; device ops only (no host read).

    Parameters
    ----------
    tokens : torch.Tensor, shape (batch, capacity), int64
        Committed tokens; entries at ``>= lengths`` are ignored.
    lengths : torch.Tensor, shape (batch,), int64
    active : torch.Tensor, shape (batch,), bool
        Finished sequences get no continuation.
    ngram, num_tokens : int
        Longest suffix matched; tokens returned.

    Returns
    -------
    continuation : torch.Tensor, shape (batch, num_tokens), int64
        The tokens that followed the match (0 where not valid): guesses for positions
        ``lengths``, ``lengths + 1``, ...
    valid : torch.Tensor, shape (batch, num_tokens), bool
        A prefix of each row: there was a match, and its continuation lies inside the history.
    matched : torch.Tensor, shape (batch,), int64
        The length of the suffix matched, 0 where none was.
    """
    B, cap = tokens.shape
    dev = tokens.device
    g = max(0, min(ngram, cap - 1))
    # For every end position e, how many tokens ending at e equal the sequence's last ones
    # (up to g): an n-gram match ends at e iff that count is >= n. One pass for every n.
    e = torch.arange(cap, device=dev)
    i = torch.arange(g, device=dev)
    back = tokens.gather(1, (e[:, None] - i).clamp(min=0).reshape(1, -1).expand(B, -1)).view(B, cap, g)
    key = tokens.gather(1, (lengths[:, None] - 1 - i).clamp(min=0))  # (B, g): last token first
    same = (back == key[:, None, :]) & (i <= e[:, None])  # never before position 0
    run = same.int().cumprod(-1).sum(-1)  # (B, cap)
    # the suffix itself is at most lengths - 1 long, and the continuation (from e + 1) must
    # start inside the committed history
    run = torch.minimum(run, lengths[:, None] - 1).masked_fill(e[None, :] + 1 >= lengths[:, None], 0)
    matched = run.amax(-1)  # the longest suffix with an earlier match ...
    last = torch.where((run >= matched[:, None]) & (matched[:, None] > 0), e, -1).amax(-1)  # ... latest
    start = torch.where(last >= 0, last + 1, -1)
    idx = start[:, None] + torch.arange(num_tokens, device=dev)
    valid = (start[:, None] >= 0) & (idx < lengths[:, None]) & active[:, None]
    matched = torch.where(valid[:, 0], matched, 0)
    return torch.where(valid, tokens.gather(1, idx.clamp(0, cap - 1)), 0), valid, matched


class ModelDraft(Draft):
    """A small causal LM with the target's vocabulary, expanding the top-k at each level.

    The draft keeps its own cache, like the target's: the committed tokens without the root.
    Each step it runs the tokens committed since the last step plus the root, then expands
    the tree one level per forward. Meant for tests and as a baseline, not for speed.

    Parameters
    ----------
    model : LlamaModel
        The draft model (any size; the vocabulary must be the target's).
    branching : tuple of int
        Children per node at each level: ``(3, 2, 1)`` gives 3 + 6 + 6 = 15 nodes, depth 3.
    """

    def __init__(self, model, branching=(3, 2, 1)):
        if not isinstance(branching, (tuple, list)) or not branching:
            raise ValueError(f"branching must be a non-empty tuple of ints, got {branching!r}")
        self.branching = tuple(check_count("branching", k) for k in branching)
        self.model = model
        width, self.max_nodes = 1, 0
        for k in self.branching:
            width *= k
            self.max_nodes += width
        self.cache = None

    def check(self, model) -> None:
        ours, theirs = self.model.config.vocab_size, model.config.vocab_size
        if ours != theirs:
            raise ValueError(f"draft: vocab_size {ours} differs from the target's {theirs}")
        if self.model.device != model.device:
            raise ValueError(f"draft: model is on {self.model.device}, the target on {model.device}")

    def begin(self, ctx: DraftContext) -> None:
        B, cap = ctx.tokens.shape
        need = cap + self.max_nodes + 1
        limit = self.model.config.max_position_embeddings
        if need > limit:
            raise ValueError(f"draft: needs {need} positions, the draft model has {limit}")
        self.cache = self.model.new_cache(B, need)

    def _catch_up(self, ctx: DraftContext) -> torch.Tensor:
        """Run the tokens committed since the last step, root included; keep all but the root
        in the draft's cache (like the target's). Returns the logits at the root, (B, V)."""
        cache, dev = self.cache, ctx.tokens.device
        new = ctx.lengths - cache.lens  # >= 1: the root is never kept
        T = int(new.max())  # host sync: fine for a test draft
        idx = cache.lens[:, None] + torch.arange(T, device=dev)
        ids = ctx.tokens.gather(1, idx.clamp(max=ctx.tokens.shape[1] - 1))
        ids = torch.where(idx < ctx.lengths[:, None], ids, 0)  # padding: any valid id
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(ids.shape[0], T, T)
        logits = self.model.forward(ids, idx, causal, cache, logits_index=new - 1)
        cache.commit(new - 1)
        return logits

    def propose(self, ctx: DraftContext) -> Proposal:
        logits = self._catch_up(ctx)
        B, dev = logits.shape[0], logits.device
        tokens = torch.zeros(B, 0, dtype=torch.int64, device=dev)
        parents = torch.zeros_like(tokens)
        probs = torch.zeros(B, 0, dtype=logits.dtype, device=dev)
        frontier = torch.zeros(B, 1, dtype=torch.int64, device=dev)  # tree slots of the last level
        level_logits = logits[:, None, :]
        minus_one = torch.full((B, 1), -1, dtype=torch.int64, device=dev)
        for depth, k in enumerate(self.branching, start=1):
            if depth > 1:
                # Re-run the root and every node so far as a tree over the draft's prefix.
                mask = ancestor_mask(torch.cat([minus_one, parents], 1))
                pos = self.cache.lens[:, None] + mask.sum(-1) - 1
                out = self.model.forward(torch.cat([ctx.root[:, None], tokens], 1), pos, mask, self.cache)
                level_logits = out.gather(1, frontier[:, :, None].expand(-1, -1, out.shape[-1]))
            p, ids = torch.softmax(level_logits, -1).topk(k, dim=-1)  # (B, F, k)
            F = frontier.shape[1]
            tokens = torch.cat([tokens, ids.reshape(B, F * k)], 1)
            parents = torch.cat([parents, frontier[:, :, None].expand(B, F, k).reshape(B, F * k)], 1)
            probs = torch.cat([probs, p.reshape(B, F * k)], 1)
            first = tokens.shape[1] - F * k + 1
            frontier = torch.arange(first, first + F * k, device=dev).expand(B, F * k)
        valid = ctx.active[:, None].expand_as(tokens).contiguous()
        return Proposal(tokens, parents, valid, probs)


class OracleDraft(Draft):
    """Always right: proposes the known continuation (e.g. an earlier greedy AR run).

    With ``width > 1`` each level gets ``width - 1`` wrong siblings before the right node,
    a spine with side leaves.

    Parameters
    ----------
    references : list of list of int
        Per sequence, the new tokens the target will emit (the first one included).
    num_tokens : int
        Depth of the proposed spine.
    width : int
        Nodes per level.
    """

    right = True  # WrongDraft puts a wrong token on the spine too

    def __init__(self, references, num_tokens: int = 4, width: int = 1):
        if not isinstance(references, (list, tuple)) or not references:
            raise ValueError("references must be a non-empty list of token-id lists")
        self.references = [list(map(int, r)) for r in references]
        self.num_tokens = check_count("num_tokens", num_tokens)
        self.width = check_count("width", width)
        self.max_nodes = num_tokens * width

    def check(self, model) -> None:
        V = model.config.vocab_size
        if any(t < 0 or t >= V for r in self.references for t in r):
            raise ValueError(f"draft: references hold token ids outside [0, {V})")

    def begin(self, ctx: DraftContext) -> None:
        B, dev = ctx.lengths.shape[0], ctx.lengths.device
        if len(self.references) != B:
            raise ValueError(f"draft: {len(self.references)} references for a batch of {B}")
        R = max(len(r) for r in self.references) + 1
        self.ref = torch.tensor([r + [0] * (R - len(r)) for r in self.references], device=dev)
        self.ref_len = torch.tensor([len(r) for r in self.references], device=dev)
        self.prompt_len = ctx.lengths - 1  # the first new token is already emitted
        self.vocab = ctx.model.config.vocab_size

    def propose(self, ctx: DraftContext) -> Proposal:
        B, dev = ctx.lengths.shape[0], ctx.lengths.device
        D, W = self.num_tokens, self.width
        emitted = ctx.lengths - self.prompt_len
        idx = emitted[:, None] + torch.arange(D, device=dev)  # reference index of depth d + 1
        right = self.ref.gather(1, idx.clamp(max=self.ref.shape[1] - 1))
        level_ok = (idx < self.ref_len[:, None]) & ctx.active[:, None]  # (B, D)
        # Level d holds W nodes: W - 1 wrong leaves, then the spine node (slot (d + 1) * W).
        # offsets from the right token: 1..W-1 for the leaves, 0 (or W when wrong) on the spine
        offs = torch.arange(1, W + 1, device=dev)
        offs = torch.where(offs == W, 0 if self.right else W, offs)
        tokens = (right[:, :, None] + offs) % self.vocab  # (B, D, W)
        spine_parent = torch.arange(D, device=dev) * W  # slot of the spine node one level up
        parents = spine_parent[:, None].expand(D, W)
        valid = level_ok[:, :, None].expand(B, D, W)
        return Proposal(tokens.reshape(B, D * W), parents.reshape(1, D * W).expand(B, -1).contiguous(),
                        valid.reshape(B, D * W).contiguous())


class WrongDraft(OracleDraft):
    """Always wrong: the same shape as :class:`OracleDraft`, every token shifted off the
    greedy continuation, so a greedy target accepts nothing."""

    right = False

    def __init__(self, references, num_tokens: int = 4, width: int = 2):
        super().__init__(references, num_tokens, width)

    def check(self, model) -> None:
        super().check(model)
        if self.width >= model.config.vocab_size:  # offsets 1..width must stay nonzero mod vocab
            raise ValueError(f"draft: width {self.width} too large for vocab {model.config.vocab_size}")


class RandomTreeDraft(Draft):
    """Random tree shapes and random tokens, seeded: a stress test for the engine.

    Each step draws ``N`` in ``[0, max_nodes]``, a random parent in ``[0, n]`` for each node,
    random validity (closed under descent) and random tokens. With ``references`` a node at
    depth ``d`` carries, with probability ``p_correct``, the reference token ``d`` steps
    ahead, so that long paths do get accepted.

    Parameters
    ----------
    max_nodes : int
    seed : int
    p_invalid : float
    references : list of list of int, optional
        As for :class:`OracleDraft`.
    p_correct : float
    """

    def __init__(self, max_nodes: int = 8, seed: int = 0, p_invalid: float = 0.2, references=None,
                 p_correct: float = 0.5):
        self.max_nodes = check_count("max_nodes", max_nodes, 0)
        self.seed, self.p_invalid, self.p_correct = seed, p_invalid, p_correct
        self.oracle = OracleDraft(references, num_tokens=1) if references is not None else None

    def check(self, model) -> None:
        if self.oracle is not None:
            self.oracle.check(model)

    def begin(self, ctx: DraftContext) -> None:
        self.gen = torch.Generator().manual_seed(self.seed)  # CPU: the same trees on any device
        self.vocab = ctx.model.config.vocab_size
        if self.oracle is not None:
            self.oracle.begin(ctx)

    def propose(self, ctx: DraftContext) -> Proposal:
        g, B, dev = self.gen, ctx.lengths.shape[0], ctx.lengths.device
        N = int(torch.randint(0, self.max_nodes + 1, (), generator=g))
        parents = (torch.rand(B, N, generator=g) * (torch.arange(N) + 1)).long()  # uniform in [0, n]
        tokens = torch.randint(0, self.vocab, (B, N), generator=g)
        valid = torch.rand(B, N, generator=g) >= self.p_invalid
        slot_valid = torch.ones(B, N + 1, dtype=torch.bool)
        for n in range(N):
            valid[:, n] &= slot_valid.gather(1, parents[:, n:n + 1]).squeeze(1)
            slot_valid[:, n + 1] = valid[:, n]
        parents, tokens, valid = parents.to(dev), tokens.to(dev), valid.to(dev)
        if self.oracle is not None and N:
            o = self.oracle
            d = depths(torch.cat([torch.full((B, 1), -1, device=dev), parents], 1))[:, 1:]
            idx = (ctx.lengths - o.prompt_len)[:, None] + d - 1
            right = o.ref.gather(1, idx.clamp(0, o.ref.shape[1] - 1))
            use = (torch.rand(B, N, generator=g) < self.p_correct).to(dev) & (idx < o.ref_len[:, None])
            tokens = torch.where(use, right, tokens)
        return Proposal(tokens, parents, valid & ctx.active[:, None])
