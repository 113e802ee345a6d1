"""``GlideDraft``: the GliDe draft behind the engine's :class:`~glide.speculative.drafts.Draft` interface.

Each step it drafts a greedy chain of ``gamma`` tokens under the root. Its own cache holds the
draft's self-attention K/V; its cross-attention reads the target's cache in place
(:func:`glide.kernels.cross_attention`, or the reference on the CPU), so every draft query sees
the whole verified target cache, which ends just before the root.

Keeping the draft's cache right without bookkeeping: a step writes the K/V of positions
``r - 1 .. r + gamma - 1`` (the token before the root, the root at ``r``, then ``d_1 ..
d_{gamma-1}``). After verification accepts ``a`` draft tokens the new root sits at ``r + a + 1``,
and every position below ``r + a`` holds the K/V of the committed token there: positions below
``r - 1`` by induction, and ``r - 1 .. r + min(a, gamma - 1)`` were just written with committed
tokens. So each step starts by trusting positions ``< r' - 1`` of the new root ``r'`` and
rewrites ``r' - 1`` and ``r'`` in one two-row forward: no host sync, no ragged catch-up, and
nothing to do in :meth:`GlideDraft.observe`.
"""

from __future__ import annotations

import torch

from glide.kernels import cross_attention, reference
from glide.kernels._dispatch import use_triton
from glide.speculative.drafts import Draft, DraftContext
from glide.speculative.tree import Proposal
from glide.speculative.verify import counter_uniforms, process_logits, sample

from .config import check_fingerprint
from .model import GlideDraftModel, states_at

__all__ = ["GlideDraft"]


class GlideDraft(Draft):
    """Propose a chain of ``gamma`` greedy draft tokens, with their draft probabilities.

    Parameters
    ----------
    model : GlideDraftModel
        Attached to the target (see :func:`glide.draft.checkpoint.load_draft`).
    gamma : int
        Chain length (draft tokens per step).
    sample : bool
        When the target samples (temperature > 0), draw each chain token from the draft's own
        distribution (its logits at the target's temperature and top-p, from the row's
        ``DraftContext.draft_keys``) instead of taking its argmax, and hand
        those distributions to the engine, which then verifies by the residual rule
        (:func:`~glide.speculative.verify.verify_residual`): a token is accepted with
        ``min(1, p/q)``, on average ``sum min(p, q)``, where an argmax token is accepted with
        ``p(token)``. Exact either way; greedy decoding is unchanged. A seed then no longer gives
        ``ar``'s very sample (the law is the same).
    """

    # The chain graph that begin() captures ahead (keep_logits value), None for none.
    _chain_graph = False

    def __init__(self, model: GlideDraftModel, gamma: int = 4, sample: bool = False):
        if not isinstance(model, GlideDraftModel):
            raise TypeError(f"draft: model must be a GlideDraftModel, got {type(model).__name__}")
        if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
            raise ValueError(f"gamma must be an int >= 1, got {gamma!r}")
        if not isinstance(sample, bool):
            raise TypeError(f"sample must be a bool, got {sample!r}")
        self.model = model
        self.gamma = gamma
        self.sample = sample
        self._dists = None  # (batch, gamma, vocab) the sampled chain's distributions, reused
        self.max_nodes = gamma
        self.needs_hidden = model.config.hidden_input
        self.cache = None
        self._graph_mode = None  # see use_cuda_graphs
        self._graphs = {}
        self._graph_ctx = None

    # ------------------------------------------------------------------ Draft interface
    def check(self, model) -> None:
        c = self.model.config
        check_fingerprint(c.fingerprint, model)
        if c.target.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft: vocab_size {c.target.vocab_size} differs from the target's "
                             f"{model.config.vocab_size}")
        if self.model.device != model.device or self.model.dtype != model.dtype:
            raise ValueError(f"draft: it is {self.model.dtype} on {self.model.device}, the target "
                             f"{model.dtype} on {model.device}; load it for this target")

    def use_cuda_graphs(self, capture) -> None:
        """Draft the chain through one CUDA graph per generation (``capture=True``), the same
        static path without capturing (``False``, CPU tests), or eagerly (``None``)."""
        if capture and self.model.device.type != "cuda":
            raise ValueError(f"draft: CUDA graphs need a CUDA draft, this one is on {self.model.device}")
        if capture and not use_triton(self.model.device, self.model.attn_backend):
            capture = None  # the reference attention reads lengths on the host: stay eager
        self._graph_mode = capture

    def begin(self, ctx: DraftContext) -> None:
        """Fill the draft's cache over the prompts (the prompt is ``tokens[:lengths - 1]``)."""
        B, cap = ctx.tokens.shape
        m = self.model
        self._graphs, self._graph_ctx = {}, None  # a new context: new addresses to capture
        self.cache = m.new_cache(B, cap + self.cache_extra())
        prompt_lens = ctx.lengths - 1
        P = int(prompt_lens.max())  # once a generation: a host sync is fine here
        dev = ctx.tokens.device
        ids = ctx.tokens[:, :P]
        pos = torch.arange(P, device=dev).expand(B, P)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril().expand(B, P, P)
        self.cache.reset()
        # The prompt's queries read the target's prompt positions before their own (a root's view).
        tk = [ctx.cache.k(m.config.target_layer(i)) for i in range(len(m.layers))]
        tv = [ctx.cache.v(m.config.target_layer(i)) for i in range(len(m.layers))]
        seen = (torch.arange(P, device=dev)[None, None, :] < pos[:, :, None])  # (B, P, P)

        def cross(i, q):
            return reference.masked_attention(q, tk[i], tv[i], seen)
        m.step(ids, pos, causal, self.cache, cross, need_logits=False, glimpse=self._glimpse_rows(ctx, pos))
        if self._graph_mode is True and self._chain_graph is not None:
            # capture the chain now, outside the decode steps (the engine times begin as
            # set-up); the run only writes draft K/V that the first proposal rewrites
            self.draft_chain(ctx, keep_logits=self._chain_graph)

    def propose(self, ctx: DraftContext) -> Proposal:
        dists = None
        if self._samples(ctx):
            tokens, probs, dists = self._chain(ctx, False, checked=True, sampled=True)
        else:
            tokens, probs, _ = self.draft_chain(ctx)
        B, dev = tokens.shape[0], tokens.device
        parents = torch.arange(self.gamma, device=dev).expand(B, self.gamma).contiguous()
        valid = ctx.active[:, None].expand(B, self.gamma).contiguous()
        return Proposal(tokens, parents, valid, probs, dists)

    def _samples(self, ctx: DraftContext) -> bool:
        """Whether this step's chain is sampled (``sample``, and the target samples)."""
        return self.sample and ctx.temperature > 0 and ctx.draft_keys is not None

    def draft_chain(self, ctx: DraftContext, keep_logits: bool = False):
        """The greedy chain under the root.

        Returns
        -------
        tokens : torch.Tensor, shape (batch, gamma), int64
            Target token ids.
        probs : torch.Tensor, shape (batch, gamma), float32
            The draft's probability of each chain token given the chain before it.
        logits : torch.Tensor, shape (batch, gamma, vocab_out), or None
            The draft's logits at every depth (over ``draft_vocab``), with ``keep_logits``.
        """
        if self._graph_mode is None:
            return self._chain(ctx, keep_logits, checked=True)
        from glide.model.graphs import CapturedCall

        if ctx is not self._graph_ctx:  # the graphs hold this context's tensors
            self._graphs, self._graph_ctx = {}, ctx
        call = self._graphs.get(keep_logits)
        if call is None:
            call = self._graphs[keep_logits] = CapturedCall(
                lambda: self._chain(ctx, keep_logits, checked=False), self._graph_mode, ctx.root.device)
        tokens, probs, logits = call.run()
        return tokens.clone(), probs.clone(), None if logits is None else logits.clone()

    def _chain(self, ctx: DraftContext, keep_logits: bool, checked: bool, sampled: bool = False):
        """:meth:`draft_chain`'s work. ``checked=False`` makes no host sync (the draft cache's
        room is the engine's to guarantee): the body of the captured graph. ``sampled`` draws
        the tokens (see ``sample``) and returns their distributions (batch, gamma, vocab) in
        place of the logits."""
        m, cache = self.model, self.cache
        B, dev = ctx.root.shape[0], ctx.root.device
        root_pos = ctx.lengths - 1
        cache.lens.copy_(root_pos - 1)
        cross = self._cross(ctx)
        prev = ctx.tokens.gather(1, (root_pos - 1)[:, None])
        ids = torch.cat([prev, ctx.root[:, None]], 1)
        pos = torch.stack([root_pos - 1, root_pos], 1)
        causal = torch.ones(2, 2, dtype=torch.bool, device=dev).tril().expand(B, 2, 2)
        glimpse = self._glimpse_rows(ctx, pos)
        logits = m.step(ids, pos, causal, cache, cross, logits_index=torch.ones_like(root_pos),
                        checked=checked, glimpse=glimpse)
        glimpse = None if glimpse is None else glimpse[:, 1]  # the root's: every chain token's
        self._advance(cache, 2, checked)
        tokens, probs, rows = [], [], []
        one = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        dists = self._dists_buffer(B, logits) if sampled else None
        for j in range(1, self.gamma + 1):
            if sampled:
                tok, p = self._draw(ctx, logits, j, dists[:, j - 1])
            else:
                tok, p = self._pick(logits)
            tokens.append(tok)
            probs.append(p)
            if keep_logits:
                rows.append(logits)
            if j < self.gamma:
                logits = m.step(tok[:, None], (root_pos + j)[:, None], one, cache, cross,
                                checked=checked, glimpse=glimpse)[:, 0]
                self._advance(cache, 1, checked)
        last = dists if sampled else torch.stack(rows, 1) if keep_logits else None
        return torch.stack(tokens, 1), torch.stack(probs, 1), last

    @staticmethod
    def _advance(cache, n: int, checked: bool) -> None:
        if checked:
            cache.commit(n)
        else:
            cache.lens += n  # on the device only; the host bound is re-measured if ever needed

    # ------------------------------------------------------------------ pieces
    def reserve(self) -> int:
        return max(1 + self.max_nodes, self.cache_extra())  # its cache holds cap + cache_extra()

    def cache_extra(self) -> int:
        """Draft cache slots beyond the committed tokens: the chain and the rewritten pair."""
        return self.max_nodes + 2

    def _glimpse_rows(self, ctx: DraftContext, pos: torch.Tensor):
        """The glimpse of committed rows at ``pos`` (batch, n): each reads the target's hidden
        state at ``pos - 1``, as a step's root does (zeros at position 0). ``None`` for a draft
        without hidden input."""
        if not self.needs_hidden:
            return None
        hs = ctx.hidden_states
        if hs is None:
            raise ValueError("draft: this draft reads the target's hidden states, and the context has none")
        return self.model.glimpse(states_at(hs, pos - 1))

    def _dists_buffer(self, B: int, logits) -> torch.Tensor:
        """The (batch, gamma, vocab) buffer the sampled chain's distributions go to: made once
        per batch size, zero outside the head's columns, which every step overwrites whole. A
        proposal's ``draft_dists`` is this buffer, so it holds until the next proposal."""
        V = self.model.config.target.vocab_size
        buf = self._dists
        if buf is None or buf.shape[0] != B or buf.device != logits.device:
            buf = self._dists = torch.zeros(B, self.gamma, V, dtype=torch.float32, device=logits.device)
        return buf

    def _draw(self, ctx: DraftContext, logits, depth: int, out: torch.Tensor):
        """A token drawn from the draft's distribution at the target's temperature and top-p, at
        the uniform of the row's draft stream for the output position of a node at ``depth``,
        and its probability; the distribution over the whole vocabulary goes to ``out`` (batch,
        vocab), whose columns outside the draft's head stay zero."""
        m = self.model
        q = process_logits(logits, ctx.temperature, ctx.top_p)  # over the head's tokens only
        u = counter_uniforms(ctx.draft_keys, ctx.num_new + depth - 1)
        col = sample(q, uniforms=u)
        out.scatter_(1, m.vocab_ids.expand(q.shape[0], -1), q.to(out.dtype))
        return m.vocab_ids[col], q.gather(1, col[:, None])[:, 0]

    def _pick(self, logits):
        """Greedy draft token (a target token id) and its draft probability."""
        top, col = logits.max(-1)
        p = torch.exp(top - torch.logsumexp(logits, -1))
        return self.model.vocab_ids[col], p

    def _cross(self, ctx: DraftContext):
        """Cross-attention of each draft layer over the target's verified cache, read in place."""
        m, tcache = self.model, ctx.cache
        layers = [m.config.target_layer(i) for i in range(len(m.layers))]
        lens = tcache.lens
        if use_triton(lens.device, m.attn_backend):
            def cross(i, q):
                return cross_attention(q, tcache.k(layers[i]), tcache.v(layers[i]), lens,
                                       check_lens=False, backend=m.attn_backend)
            return cross
        S = tcache.uniform_length()
        if S is None:  # ragged lengths: one mask for every step and layer of this proposal
            S = max(int(lens.max()), 1)
            allowed = (torch.arange(S, device=lens.device)[None, :] < lens[:, None])[:, None, :]
        else:
            allowed = None

        def cross(i, q):
            vis = S if allowed is None else allowed.expand(q.shape[0], q.shape[1], S)
            return reference.masked_attention(q, tcache.k(layers[i]), tcache.v(layers[i]), vis)
        return cross
