"""Tree verification: which drafted tokens the target accepts, and the bonus token after them.

Both rules walk the tree from the root. At the current node ``c`` the target *picks* a token
``x_c`` (its argmax, or a sample from its processed distribution). If a valid child of ``c``
carries ``x_c``, the walk descends to it; otherwise ``x_c`` is emitted as the bonus token and
the walk stops. The emitted tokens are the accepted path's draft tokens followed by the bonus.

Everything is vectorised over the batch and the tree: the target's pick is computed at every
node at once (one argmax or one batched sample), and the accepted path is the deepest node all
of whose ancestors match.

Why the sampling rule is lossless
---------------------------------
Let ``p(. | c)`` be the target's processed distribution at node ``c`` (the context is the
prefix plus the root-to-``c`` path). The walk draws ``x_c ~ p(. | c)`` and emits ``x_c`` in
both branches: either as the token of the child it descends to, or as the bonus. So the first
emitted token is distributed as ``p(. | root)``; given it, the next emitted token is
``x_{c'} ~ p(. | c')`` at the child ``c'`` that carries it (whose context is exactly the
prefix plus the emitted tokens), or, after a bonus, the first token of the next step, drawn
from the same conditional. By induction every emitted sequence has the target's
autoregressive distribution, whatever the draft proposed and however it chose its candidates:
the samples at nodes the walk never visits are never used, so pre-drawing one sample per node
changes nothing. This matters because tree drafts usually propose *deterministic* candidate
sets (top-k, CaPE's confidence-based expansion), for which the residual-resampling rule of
sampled speculative decoding (accept with ``min(1, p/q)``) assumes candidates drawn from ``q``
and is not exact.

Why it is optimal for a fixed candidate set
-------------------------------------------
Fix the children ``S`` of ``c`` (distinct tokens). Any exact rule must emit its next token
with law ``p(. | c)``, and it can only accept a child by emitting that child's token, so
``P(accept some child) <= P(emitted token in S) = sum_{s in S} p(s | c)``. The rule above
accepts exactly when ``x_c`` is in ``S``, which has that probability: no exact rule accepts
more often. (Duplicate sibling tokens add nothing; the first valid one wins.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import Tree

__all__ = ["Verdict", "process_logits", "sample", "verify_greedy", "verify_sampling", "walk",
           "check_sampling"]


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError naming ``temperature`` or ``top_p`` when out of range."""
    if not 0.0 <= temperature < float("inf"):  # also rejects NaN
        raise ValueError(f"temperature must be finite and >= 0 (0 means greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def process_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Turn logits into the distribution the target samples from.

    The AR baseline and the verifier both call this, so they sample from the same law.

    Parameters
    ----------
    logits : torch.Tensor, shape (..., vocab)
    temperature : float
        ``> 0`` scales the logits; ``0`` means greedy (a one-hot at the first argmax).
    top_p : float, in (0, 1]
        Keep the smallest set of most likely tokens whose mass is ``>= top_p`` (ties broken
        towards the lower token id), then renormalise. ``1`` keeps everything.

    Returns
    -------
    torch.Tensor, shape (..., vocab)
        float64 for float64 logits, float32 otherwise; rows sum to 1.
    """
    check_sampling(temperature, top_p)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    if temperature == 0.0:
        top = logits.argmax(-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, top, 1.0)
    # subtracting the row max first keeps a tiny temperature finite (it tends to the one-hot)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    # A stable descending sort keeps equal probabilities in token-id order.
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p  # the first token always stays (mass before it is 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    probs = torch.where(keep, probs, torch.zeros((), dtype=dtype, device=probs.device))
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row.

    Parameters
    ----------
    probs : torch.Tensor, shape (..., vocab)
    generator : torch.Generator, optional
        Drives the randomness; on the device of ``probs``.

    Returns
    -------
    torch.Tensor, shape (...), int64
    """
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


@dataclass
class Verdict:
    """What the target accepted in each sequence's tree.

    Attributes
    ----------
    path_idx : torch.Tensor, shape (batch, tree_len), int64
        Accepted tree slots, root first (``path_idx[:, 0] == 0``); entries at
        ``a >= path_lens[b]`` are 0. Feeds ``KVCache.compact``.
    path_lens : torch.Tensor, shape (batch,), int64
        Accepted slots including the root, ``>= 1``. Also the number of emitted tokens.
    tokens : torch.Tensor, shape (batch, tree_len), int64
        Emitted tokens: the accepted draft tokens then the bonus; ``-1`` past ``path_lens``.
    """

    path_idx: torch.Tensor
    path_lens: torch.Tensor
    tokens: torch.Tensor


def verify_greedy(tree: Tree, logits: torch.Tensor) -> Verdict:
    """Greedy verification: accept the longest path that matches the target's argmax.

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    logits : torch.Tensor, shape (batch, T, vocab)
        Target logits at every slot.

    Returns
    -------
    Verdict
        Among matching paths of equal length the one ending in the lowest slot wins.
    """
    return walk(tree, logits.argmax(-1), first_sibling_only=False)


def verify_sampling(tree: Tree, probs: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
    """Lossless multi-candidate verification (see the module docstring for why it is exact).

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    probs : torch.Tensor, shape (batch, T, vocab)
        The target's processed distribution at every slot (:func:`process_logits`).
    generator : torch.Generator, optional
        On the device of ``probs``; seeded runs reproduce.

    Returns
    -------
    Verdict
    """
    return walk(tree, sample(probs, generator), first_sibling_only=True)


def walk(tree: Tree, picked: torch.Tensor, first_sibling_only: bool = True) -> Verdict:
    """Accept the deepest node whose whole root path matches the target's picks.

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    picked : torch.Tensor, shape (batch, T), int64
        The token the target picks at every slot (argmax or a sample).
    first_sibling_only : bool
        Only the first valid child carrying a token can match it (the sampling rule, which
        then accepts a single path); otherwise every matching child can, and the deepest
        matching path wins, ties to the lowest slot.

    Returns
    -------
    Verdict
    """
    tokens, parents, mask, depth = tree.tokens, tree.parents, tree.mask, tree.depth
    B, T = tokens.shape
    dev = tokens.device
    slots = torch.arange(T, device=dev)
    has_parent = parents >= 0
    match = has_parent & (tokens == picked.gather(1, parents.clamp(min=0)))
    if first_sibling_only:
        # A node loses to an earlier valid sibling with the same token.
        same = (parents[:, :, None] == parents[:, None, :]) & (tokens[:, :, None] == tokens[:, None, :])
        earlier = (slots[None, :] < slots[:, None]) & has_parent[:, None, :]
        match = match & ~(same & earlier).any(-1)
    match[:, 0] = True  # the root is always "accepted": it is the last emitted token
    ok = ~(mask & ~match[:, None, :]).any(-1)  # every ancestor (and self) matches
    score = torch.where(ok, depth * T + (T - 1 - slots), -1)
    best = score.argmax(-1)  # (B,)
    on_path = mask.gather(1, best[:, None, None].expand(B, 1, T)).squeeze(1)  # (B, T)
    path_lens = on_path.sum(-1)
    # Ancestors have lower slots than descendants, so slot order is root-to-leaf order.
    path_idx = torch.sort(on_path.to(torch.int8), dim=-1, descending=True, stable=True).indices
    live = slots[None, :] < path_lens[:, None]
    path_idx = torch.where(live, path_idx, 0)
    bonus = picked.gather(1, best[:, None])
    drafted = tokens.gather(1, torch.cat([path_idx[:, 1:], path_idx[:, :1]], 1))
    out = torch.where(slots[None, :] == (path_lens - 1)[:, None], bonus, drafted)
    out = torch.where(live, out, -1)
    return Verdict(path_idx, path_lens, out)
