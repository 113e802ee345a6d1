"""Draft trees: the :class:`Proposal` a draft returns and the :class:`Tree` the target verifies.

Slot 0 of a tree is the *root*: the last emitted token, whose K/V are not in the cache yet.
Proposal ``n`` sits in slot ``n + 1`` and names its parent slot in ``[0, n]``, so parents
always come before their children. Trees in a batch may be ragged: ``valid`` marks the real
nodes, and an invalid node's descendants must be invalid too.

In a built :class:`Tree`, invalid nodes get parent ``-1`` (like the root): they see only
themselves, have depth 0 and are nobody's child, so the verifier can never accept them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Proposal", "Tree", "empty_proposal", "build_tree", "ancestor_mask", "depths"]


@dataclass
class Proposal:
    """What a draft proposes for one step.

    Attributes
    ----------
    tokens : torch.Tensor, shape (batch, num_nodes), int64
    parents : torch.Tensor, shape (batch, num_nodes), int64
        Tree slot of each node's parent: node ``n`` is slot ``n + 1`` and its parent is in
        ``[0, n]`` (slot 0 is the root).
    valid : torch.Tensor, shape (batch, num_nodes), bool
        Real nodes. A node whose parent is invalid must be invalid.
    draft_probs : torch.Tensor, shape (batch, num_nodes), optional
        The draft's probability of each node's token given its parent (informational; the
        lossless verifier does not need it).
    draft_dists : torch.Tensor, shape (batch, num_nodes, vocab), optional
        For a chain whose tokens the draft *sampled*: the distribution each node's token was
        drawn from. With it, sampling verification uses the residual rule (accept with
        ``min(1, p/q)``, see :func:`~glide.speculative.verify.verify_residual`), which accepts
        more often than the rule for fixed candidates.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    valid: torch.Tensor
    draft_probs: torch.Tensor | None = None
    draft_dists: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def check_shapes(self, batch_size: int | None = None) -> None:
        """Check shapes and dtypes (no device sync).

        Raises
        ------
        TypeError, ValueError
            Naming the offending field, with the shape or dtype seen and expected.
        """
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, num_nodes), got shape {tuple(self.tokens.shape)}")
        shape = tuple(self.tokens.shape)
        if batch_size is not None and shape[0] != batch_size:
            raise ValueError(f"tokens must have batch size {batch_size}, got shape {shape}")
        fields = [("tokens", self.tokens, torch.int64), ("parents", self.parents, torch.int64),
                  ("valid", self.valid, torch.bool)]
        if self.draft_probs is not None:
            fields.append(("draft_probs", self.draft_probs, None))
        for name, t, dtype in fields:
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} like tokens, got {tuple(t.shape)}")
            if dtype is not None and t.dtype != dtype:
                raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
            if t.device != self.tokens.device:
                raise ValueError(f"{name} is on {t.device}, tokens on {self.tokens.device}")
        if self.draft_dists is not None:
            d = self.draft_dists
            if d.dim() != 3 or tuple(d.shape[:2]) != shape or not d.is_floating_point():
                raise ValueError(f"draft_dists must be floating, (batch, num_nodes, vocab) with (batch, "
                                 f"num_nodes) = {shape}, got {d.dtype} {tuple(d.shape)}")
            if d.device != self.tokens.device:
                raise ValueError(f"draft_dists is on {d.device}, tokens on {self.tokens.device}")

    def problems(self, vocab_size: int | None = None) -> torch.Tensor:
        """A 0-d bool tensor per check, stacked: which value checks fail (no device sync).

        Order: parents out of ``[0, n]``, valid child of an invalid parent, token out of
        ``[0, vocab_size)``. Lets a caller fold the checks into a sync it already makes.
        """
        B, N = self.tokens.shape
        dev = self.tokens.device
        if N == 0:
            return torch.zeros(3, dtype=torch.bool, device=dev)
        n = torch.arange(N, device=dev)
        bad_parent = (self.parents < 0) | (self.parents > n)
        # Slot validity, root first: a valid node needs a valid parent slot.
        slot_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), self.valid], 1)
        parent_valid = slot_valid.gather(1, self.parents.clamp(0, N))
        orphan = self.valid & ~parent_valid
        bad_token = self.tokens < 0
        if vocab_size is not None:
            bad_token = bad_token | (self.tokens >= vocab_size)
        return torch.stack([
            (bad_parent & self.valid).any(), orphan.any(), (bad_token & self.valid).any()
        ])

    def validate(self, batch_size: int | None = None, vocab_size: int | None = None) -> None:
        """Check shapes, dtypes and values (one device sync).

        Raises
        ------
        TypeError, ValueError
            Naming the offending field.
        """
        self.check_shapes(batch_size)
        raise_problems(self.problems(vocab_size).tolist(), vocab_size)


def raise_problems(flags: list[bool], vocab_size: int | None) -> None:
    """Raise the ValueError for the first flag set by :meth:`Proposal.problems`."""
    if flags[0]:
        raise ValueError("parents: a valid node n must have its parent slot in [0, n]")
    if flags[1]:
        raise ValueError("valid: a valid node has an invalid parent (descendants of invalid "
                         "nodes must be invalid)")
    if flags[2]:
        raise ValueError(f"tokens: a valid node's token is outside [0, {vocab_size})")


def empty_proposal(batch_size: int, device: torch.device | str = "cpu") -> Proposal:
    """A proposal with no nodes: the tree is just the root (autoregressive decoding)."""
    z = torch.zeros(batch_size, 0, dtype=torch.int64, device=device)
    return Proposal(z, z.clone(), torch.zeros(batch_size, 0, dtype=torch.bool, device=device))


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """Which slots each slot may attend to inside the tree.

    Parameters
    ----------
    parents : torch.Tensor, shape (batch, tree_len), integer
        Parent slot of each slot, ``-1`` for the root and for invalid nodes. Parents come
        before their children.

    Returns
    -------
    torch.Tensor, shape (batch, tree_len, tree_len), bool
        ``mask[b, i, j]`` is true iff ``j == i`` or ``j`` is an ancestor of ``i``. A slot with
        parent ``-1`` sees only itself.
    """
    B, T = parents.shape
    dev = parents.device
    eye = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T)
    has_parent = parents >= 0
    step = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    step.scatter_(2, parents.clamp(min=0)[:, :, None], has_parent[:, :, None])
    reach = eye | step
    # Squaring "reachable in <= k steps" doubles k: ceil(log2 T) products cover every depth.
    # Counts stay <= T, exact in float32.
    for _ in range(max(1, math.ceil(math.log2(max(T, 2))))):
        r = reach.float()
        reach = torch.bmm(r, r) > 0
    return reach


def depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of each slot (root 0; invalid nodes, with parent ``-1``, also 0).

    Parameters
    ----------
    parents : torch.Tensor, shape (batch, tree_len), integer

    Returns
    -------
    torch.Tensor, shape (batch, tree_len), int64
    """
    return ancestor_mask(parents).sum(-1) - 1


@dataclass
class Tree:
    """A built tree, ready for one verification forward.

    Attributes
    ----------
    tokens : torch.Tensor, shape (batch, tree_len), int64
        Slot 0 is the root token.
    parents : torch.Tensor, shape (batch, tree_len), int64
        ``-1`` for the root and for invalid (or cut) nodes.
    mask : torch.Tensor, shape (batch, tree_len, tree_len), bool
        :func:`ancestor_mask` of ``parents``.
    depth : torch.Tensor, shape (batch, tree_len), int64
        Position offsets: node ``i`` sits at position ``cache.lens + depth[:, i]``.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def build_tree(root: torch.Tensor, proposal: Proposal, max_depth: torch.Tensor | None = None) -> Tree:
    """Put the root in slot 0 and the proposal after it.

    Parameters
    ----------
    root : torch.Tensor, shape (batch,), int64
    proposal : Proposal, with ``num_nodes = N``
    max_depth : torch.Tensor, shape (batch,), integer, optional
        Nodes deeper than this are cut (treated as invalid), e.g. so that a sequence never
        accepts more tokens than it may still emit.

    Returns
    -------
    Tree, with ``tree_len = N + 1``
    """
    B = root.shape[0]
    proposal.check_shapes(B)
    dev = root.device
    minus_one = torch.full((B, 1), -1, dtype=torch.int64, device=dev)
    # invalid nodes may carry any id (e.g. -1 padding): give them a harmless one for the forward
    tokens = torch.cat([root[:, None].to(torch.int64), torch.where(proposal.valid, proposal.tokens, 0)], 1)
    parents = torch.cat([minus_one, torch.where(proposal.valid, proposal.parents, -1)], 1)
    mask = ancestor_mask(parents)
    depth = mask.sum(-1) - 1
    if max_depth is not None:
        # Ancestors are never deeper than their descendants, so kept rows are unchanged.
        cut = depth > max_depth[:, None]
        eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=dev)
        mask = (mask & ~cut[:, None, :] & ~cut[:, :, None]) | eye
        parents = torch.where(cut, -1, parents)
        depth = torch.where(cut, 0, depth)
    return Tree(tokens, parents, mask, depth)
