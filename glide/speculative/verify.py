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

Where the randomness comes from
-------------------------------
The engine picks by inverse CDF (:func:`sample`) at a uniform that depends only on the seed,
the prompt's index in the input and the *output position* of the token being picked
(:func:`stream_keys`, :func:`counter_uniforms`): a node at depth ``d`` in a tree whose root
follows ``n`` emitted tokens uses the uniform of position ``n + d``. The walk visits one node a
depth, so the uniforms it uses are distinct and independent of the choices made before them,
and the argument above holds. Moreover token ``k`` of the output is then the inverse CDF of
``p(. | prefix, first k tokens)`` at the uniform of position ``k``, which is exactly what
autoregressive sampling emits with the same uniforms: a seed gives the same sample whatever the
draft, the batch size, or the prompt's batch neighbours (up to floating-point differences
between the forwards, which move a pick only when a uniform lands within rounding of a CDF
step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree import Tree

__all__ = ["Verdict", "process_logits", "sample", "verify_greedy", "verify_sampling", "verify_sampling_path", "verify_logits", "walk",
           "verify_residual", "check_sampling", "stream_keys", "substream_keys", "counter_uniforms",
           "ACCEPT_STREAM", "DRAFT_STREAM"]


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


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row.

    With ``uniforms`` the draw is the inverse CDF of ``probs`` at ``u``: the first token whose
    cumulative mass exceeds ``u * total``, the masses summed in float64. A token of
    probability 0 (cut by top-p) is never picked: its cumulative mass equals its
    predecessor's, so it is never the *first* to exceed the threshold, and the threshold stays
    below the total.

    Parameters
    ----------
    probs : torch.Tensor, shape (..., vocab)
        Non-negative, each row with a positive sum (it need not be exactly 1).
    generator : torch.Generator, optional
        Drives the randomness when ``uniforms`` is not given; on the device of ``probs``.
    uniforms : torch.Tensor, shape (...), floating, optional
        One value in ``[0, 1)`` a row (:func:`counter_uniforms`); on the device of ``probs``.
        The draw is then a deterministic function of ``probs`` and ``uniforms``.

    Returns
    -------
    torch.Tensor, shape (...), int64
    """
    if uniforms is None:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    if uniforms.shape != probs.shape[:-1]:
        raise ValueError(f"uniforms must have shape {tuple(probs.shape[:-1])} (probs without its "
                         f"vocab dim), got {tuple(uniforms.shape)}")
    p = probs.to(torch.float64)
    cdf = p.cumsum(-1)
    # Pin a zero-mass token's cumulative mass to its predecessor's, bit for bit, whatever the
    # order in which a parallel scan added the terms; cummax keeps the result sorted.
    cdf = torch.where(p > 0, cdf, torch.zeros((), dtype=cdf.dtype, device=cdf.device)).cummax(-1).values
    total = cdf[..., -1:]
    # The threshold must stay strictly below the total (u * total cannot round up to it for a
    # u < 1 on the 2**-53 grid, but this keeps any u <= 1 safe).
    below = torch.nextafter(total, torch.zeros_like(total))
    x = torch.minimum(uniforms.to(torch.float64)[..., None] * total, below)
    idx = torch.searchsorted(cdf.contiguous(), x.contiguous(), right=True)
    return idx.squeeze(-1).clamp(max=probs.shape[-1] - 1)


# splitmix64 (Steele, Lea and Flood, 2014) as signed int64 tensor ops: + and * wrap modulo
# 2**64, and a logical right shift is an arithmetic one with the copied sign bits masked off.
def _s64(x: int) -> int:
    """The int64 with the bits of ``x mod 2**64``."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_GAMMA = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def stream_keys(seed: int, row_ids, device=None) -> torch.Tensor:
    """The key of each row's random stream: a hash of ``(seed, row_id)``.

    Parameters
    ----------
    seed : int
        Any Python int (taken modulo ``2**64``).
    row_ids : sequence of int or torch.Tensor, shape (batch,)
        Non-negative ints; equal ids give equal streams.
    device : torch.device, optional

    Returns
    -------
    torch.Tensor, shape (batch,), int64
    """
    rows = torch.as_tensor(row_ids, dtype=torch.int64, device=device)
    base = _mix64(torch.full_like(rows, _s64(seed + 0x9E3779B97F4A7C15)))
    return _mix64(base ^ rows)


ACCEPT_STREAM = 1  # substream of the residual rule's acceptance tests (verify_residual)
DRAFT_STREAM = 2  # substream of a sampling draft's own draws


def substream_keys(keys: torch.Tensor, which: int) -> torch.Tensor:
    """Keys of a second, independent stream per row (``which`` >= 1; 0 gives ``keys``): for the
    uniforms that must not be the picks' own, such as a draft's draws."""
    if which == 0:
        return keys
    # Not keys + n * _GAMMA (a main-stream value): mix the key with an unrelated odd constant
    # first, then offset it by another, so a substream key is no output of any stream's counter.
    return _mix64(_mix64(keys ^ _s64(0x6A09E667F3BCC909)) + _s64(which * 0xD1B54A32D192ED03))


def counter_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms: value ``counters[i]`` of the stream ``keys[i]``, with no state.

    Element ``i`` is splitmix64's output number ``counters[i]`` from seed ``keys[i]``, cut to
    its top 53 bits. The same (key, counter) always gives the same value, on any device and in
    any batch; there is no generator whose consumption could depend on the batch.

    Parameters
    ----------
    keys : torch.Tensor, int64
        From :func:`stream_keys`; broadcast against ``counters``.
    counters : torch.Tensor, integer
        Non-negative.

    Returns
    -------
    torch.Tensor, the broadcast shape, float64
        In ``[0, 1)``, multiples of ``2**-53``.
    """
    z = _mix64(keys + (counters.to(torch.int64) + 1) * _GAMMA)
    return _srl(z, 11).to(torch.float64) * 2.0 ** -53


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


def verify_sampling(tree: Tree, probs: torch.Tensor, generator: torch.Generator | None = None,
                    uniforms: torch.Tensor | None = None) -> Verdict:
    """Lossless multi-candidate verification (see the module docstring for why it is exact).

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    probs : torch.Tensor, shape (batch, T, vocab)
        The target's processed distribution at every slot (:func:`process_logits`).
    generator : torch.Generator, optional
        On the device of ``probs``; seeded runs reproduce. Unused with ``uniforms``.
    uniforms : torch.Tensor, shape (batch, T), floating, optional
        The uniform behind each slot's inverse-CDF pick (see :func:`sample`). Exactness needs
        the values along any root-to-leaf path to be independent; the engine uses one value
        per *output position* (``num_new + depth``), so that siblings share one and the
        emitted tokens are those that autoregressive sampling with the same values emits.

    Returns
    -------
    Verdict
    """
    return walk(tree, sample(probs, generator, uniforms), first_sibling_only=True)


def verify_sampling_path(tree: Tree, logits: torch.Tensor, temperature: float, top_p: float,
                         uniforms: torch.Tensor) -> Verdict:
    """:func:`verify_sampling` that processes and samples only the slots on the walked path.

    The verdict is the one ``verify_sampling(tree, process_logits(logits, temperature, top_p),
    uniforms=uniforms)`` gives: the walk descends one depth at a time, and at each it needs the
    pick of one slot a sequence (the node it stands on) to choose the child to descend to. So
    the softmax, top-p and inverse-CDF work is ``batch x (depth + 1)`` rows instead of
    ``batch x T``: for a CaPE tree of 33 slots and depth 5, a sixth. The loop runs once per
    depth level and reads the tree's depth on the host, so the engine uses it on CPUs (where
    that read is free) and the one-pass form on GPUs.

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    logits : torch.Tensor, shape (batch, T, vocab)
        The target's raw logits at every slot.
    temperature : float, > 0
    top_p : float, in (0, 1]
    uniforms : torch.Tensor, shape (batch, T), floating
        As for :func:`verify_sampling`.

    Returns
    -------
    Verdict
    """
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    rows = torch.arange(B, device=tokens.device)
    slots = torch.arange(T, device=tokens.device)
    picked = torch.zeros(B, T, dtype=torch.int64, device=tokens.device)
    cur = torch.zeros(B, dtype=torch.int64, device=tokens.device)  # every walk starts at the root
    alive = torch.ones(B, dtype=torch.bool, device=tokens.device)
    for _ in range(int(tree.depth.max()) + 1):
        probs = process_logits(logits[rows, cur], temperature, top_p)  # (B, vocab)
        x = sample(probs, uniforms=uniforms[rows, cur])
        picked[rows, cur] = torch.where(alive, x, picked[rows, cur])
        # the first valid child of the current node that carries the pick (walk's sampling rule)
        hit = (parents == cur[:, None]) & (tokens == x[:, None]) & alive[:, None]
        found = hit.any(-1)
        first = torch.where(hit, slots[None, :], T).amin(-1)
        cur = torch.where(found, first, cur)
        alive = found
        if not bool(alive.any()):
            break
    return walk(tree, picked, first_sibling_only=True)


def verify_logits(tree: Tree, logits: torch.Tensor, temperature: float, top_p: float,
                  uniforms: torch.Tensor) -> Verdict:
    """Lossless verification from raw logits, in the form that suits the device.

    :func:`verify_sampling_path` on CPUs, where its per-depth host read is free and it samples
    a fraction of the rows; :func:`verify_sampling` over :func:`process_logits` elsewhere, with
    no host read. Both give the same verdict.

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
    logits : torch.Tensor, shape (batch, T, vocab)
    temperature : float, > 0
    top_p : float, in (0, 1]
    uniforms : torch.Tensor, shape (batch, T), floating
        As for :func:`verify_sampling`.

    Returns
    -------
    Verdict
    """
    if logits.device.type == "cpu":
        return verify_sampling_path(tree, logits, temperature, top_p, uniforms)
    return verify_sampling(tree, process_logits(logits, temperature, top_p), uniforms=uniforms)


def verify_residual(tree: Tree, logits: torch.Tensor, dists: torch.Tensor, temperature: float, top_p: float,
                    uniforms: torch.Tensor, accept_uniforms: torch.Tensor) -> Verdict:
    """Lossless verification of a *sampled* chain by the residual rule of speculative sampling.

    Node ``n`` (slot ``n + 1``) carries a token ``x`` the draft drew from ``q = dists[:, n]``.
    At the slot ``s`` above it the target's processed distribution is ``p``; the pick there is
    ``x`` when ``accept_uniforms[:, s] * q(x) < p(x)`` (probability ``min(1, p(x)/q(x))``), and
    otherwise a draw from the residual ``max(p - q, 0)`` (renormalised) at ``uniforms[:, s]``.
    Whatever ``q`` is, that pick has law ``p`` (Leviathan et al., 2023; Chen et al., 2023):
    ``q(y) min(1, p(y)/q(y)) + P(reject) (p(y) - q(y))_+ / sum (p - q)_+ = p(y)``. A slot
    without a valid child picks from ``p`` at ``uniforms[:, s]``. The picks then go to
    :func:`walk`, so the argument of the module docstring holds with these picks: each emitted
    token has the target's law given the tokens before it. The acceptance of a node is
    ``sum_y min(p(y), q(y))`` instead of :func:`verify_sampling`'s ``p(x)``.

    The two uniforms of a slot must be independent of each other and of the draft's draws
    (:func:`substream_keys` gives separate streams). The work goes one depth at a time, and on
    a CPU stops at the depth where every walk has stopped (a free host read there), as
    :func:`verify_sampling_path` does.

    Parameters
    ----------
    tree : Tree, with ``tree_len = T``
        A chain: slot ``s + 1``'s parent is ``s`` where it is valid.
    logits : torch.Tensor, shape (batch, T, vocab)
        The target's raw logits at every slot.
    dists : torch.Tensor, shape (batch, T - 1, vocab)
        The distribution each node's token was drawn from.
    temperature : float, > 0
    top_p : float, in (0, 1]
    uniforms, accept_uniforms : torch.Tensor, shape (batch, T), floating

    Returns
    -------
    Verdict
    """
    tokens, parents = tree.tokens, tree.parents
    B, T = tokens.shape
    if dists.shape[:2] != (B, T - 1) or dists.shape[-1] != logits.shape[-1]:
        raise ValueError(f"dists must have shape {(B, T - 1, logits.shape[-1])}, got {tuple(dists.shape)}")
    dev = tokens.device
    rows = torch.arange(B, device=dev)
    picked = torch.zeros(B, T, dtype=torch.int64, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)  # the walk reaches this depth
    cpu = dev.type == "cpu"  # where a host read is free: skip what no walk reads
    for s in range(T - 1):  # slot s of the chain and its child, one depth at a time
        p = process_logits(logits[:, s], temperature, top_p)  # (B, V)
        has_child = parents[:, s + 1] == s
        x, q = tokens[:, s + 1], dists[:, s].to(p.dtype)
        accept = has_child & (accept_uniforms[:, s].double() * q[rows, x].double() < p[rows, x].double())
        if cpu and not bool((alive & ~accept).any()):
            picked[:, s] = x  # every walk here goes on: no draw is read (the common case)
        else:
            residual = (p - q).clamp(min=0)
            # No residual mass means p == q (up to rounding): the ratio is 1 there, accept.
            accept = accept | (has_child & (residual.sum(-1) <= 0))
            residual = torch.where(has_child[:, None], residual, p)
            picked[:, s] = torch.where(accept, x, sample(residual, uniforms=uniforms[:, s]))
        alive = alive & accept
        if cpu and not bool(alive.any()):
            return walk(tree, picked)  # the later picks would never be read
    picked[:, T - 1] = sample(process_logits(logits[:, T - 1], temperature, top_p), uniforms=uniforms[:, T - 1])
    return walk(tree, picked)


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
