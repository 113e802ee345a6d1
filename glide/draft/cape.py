"""CaPE: confidence-aware proposal expansion of the GliDe chain.

The draft drafts its greedy spine of ``gamma`` tokens. At depth ``i`` its confidence is
``p_i``, the spine token's draft probability, and the depth gets
``n_i = bins[floor(10 * p_i)]`` candidates: the spine token and the ``n_i - 1`` next most
likely tokens of the same draft distribution (one :func:`glide.kernels.cape_topk` call over
every depth), which hang as siblings off the spine node above. Low confidence gets more
candidates. The bins default to the paper code's ``[8, 8, 8, 6, 6, 6, 4, 4, 2, 2, 2, 2]``.

No extra draft forward is needed: the siblings come from the logits the spine was drafted
from. The target verifies the tree (root, spine, siblings: ``1 + sum n_i`` slots) in one
forward; the verifier walks it, so greedy output equals ``ar`` and sampling stays exact.
"""

from __future__ import annotations

import torch

from glide.kernels import cape_topk, reference
from glide.speculative.drafts import DraftContext
from glide.speculative.tree import Proposal

from .runtime import GlideDraft

__all__ = ["CapeDraft", "PAPER_BINS", "cape_widths", "check_bins"]

PAPER_BINS = (8, 8, 8, 6, 6, 6, 4, 4, 2, 2, 2, 2)
"""Candidates per depth by ``floor(10 * confidence)``, from the paper's code (11 used)."""


def check_bins(bins) -> tuple[int, ...]:
    """Validate a bin table: at least 11 ints ``>= 1`` (one per ``floor(10 p)``, p in [0, 1])."""
    if isinstance(bins, str):
        try:
            bins = [int(x) for x in bins.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"bins must be integers, got {bins!r}") from None
    bins = tuple(bins)
    if len(bins) < 11 or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in bins):
        raise ValueError(f"bins must hold at least 11 integers >= 1 (one per floor(10 * p)), got {list(bins)}")
    if max(bins) > 64:
        raise ValueError(f"bins must be <= 64 (cape_topk's limit), got {max(bins)}")
    return bins


def cape_widths(probs: torch.Tensor, bins) -> torch.Tensor:
    """Candidates per depth, ``bins[floor(10 * p)]``.

    Parameters
    ----------
    probs : torch.Tensor, shape (batch, gamma)
        Spine confidences in [0, 1].
    bins : sequence of int

    Returns
    -------
    torch.Tensor, shape (batch, gamma), int64
    """
    table = torch.tensor(bins, dtype=torch.int64, device=probs.device)
    idx = (probs.float() * 10).floor().long().clamp(0, len(bins) - 1)
    return table[idx]


class CapeDraft(GlideDraft):
    """The GliDe chain expanded by CaPE (see the module docstring).

    Parameters
    ----------
    model : GlideDraftModel
    gamma : int
        Spine length.
    bins : sequence of int
        Candidates per depth by ``floor(10 * confidence)``.

    Notes
    -----
    Proposal layout: slots ``1..gamma`` hold the spine; the siblings follow, depth by depth,
    ``max(bins) - 1`` slots a depth, the used ones first. Unused slots are invalid (trailing
    ones are never run on the CPU).
    """

    _chain_graph = True  # CaPE drafts the chain with its logits

    def __init__(self, model, gamma: int = 4, bins=PAPER_BINS):
        super().__init__(model, gamma)
        self.bins = check_bins(bins)
        self.width = min(max(self.bins), model.config.vocab_out)  # a tiny vocabulary caps it
        self.max_nodes = gamma * self.width

    def propose(self, ctx: DraftContext) -> Proposal:
        spine, probs, logits = self.draft_chain(ctx, keep_logits=True)
        B, G, W = spine.shape[0], self.gamma, self.width
        dev = spine.device
        n = cape_widths(probs, self.bins).clamp(max=W)  # (B, G), spine included
        flat = logits.reshape(B * G, -1)
        # the kernel takes 16/32-bit logits; a float64 draft (the exactness tests) uses its reference
        top_p, cols = (reference.cape_topk_ref(flat, W) if flat.dtype == torch.float64
                       else cape_topk(flat, W, backend=self.model.attn_backend))
        alt = self.model.vocab_ids[cols].view(B, G, W)[:, :, 1:]  # ranks 2..W; rank 1 is the spine
        alt_p = top_p.view(B, G, W)[:, :, 1:].to(probs.dtype)
        rank = torch.arange(W - 1, device=dev)
        used = rank[None, None, :] < (n - 1)[:, :, None]  # (B, G, W-1)
        # pack the used siblings first so that the unused tail can be trimmed
        order = torch.argsort((~used).view(B, -1).int(), dim=1, stable=True)
        depth = torch.arange(G, device=dev)[:, None].expand(G, W - 1).reshape(-1)
        sib_tok = alt.reshape(B, -1).gather(1, order)
        sib_parent = depth[order]  # the spine node one level up: slot d (slot 0 is the root)
        sib_valid = used.view(B, -1).gather(1, order) & ctx.active[:, None]
        chain_parent = torch.arange(G, device=dev).expand(B, G)
        tokens = torch.cat([spine, sib_tok], 1)
        parents = torch.cat([chain_parent, sib_parent], 1)
        valid = torch.cat([ctx.active[:, None].expand(B, G), sib_valid], 1)
        sib_prob = alt_p.reshape(B, -1).gather(1, order)
        return Proposal(tokens, parents.contiguous(), valid.contiguous(), torch.cat([probs, sib_prob], 1))
