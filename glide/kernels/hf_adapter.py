"""Run glide's kernels inside a transformers decoder: tree verification through ``tree_attention``.

transformers (>= 4.56) looks attention up by name in ``AttentionInterface``. Registering
:func:`tree_attention_forward` under ``"glide_tree"`` lets any model that follows that
interface (Llama, Qwen2, Mistral, ...) verify a token tree with our kernel:

>>> enable_tree_attention(model)                       # doctest: +SKIP
>>> logits = verify_tree_hf(model, tree_ids, tree_mask, cache)  # doctest: +SKIP
>>> compact_hf_cache(cache, prefix_len, path_idx, path_lens)    # doctest: +SKIP

The tree mask travels to every layer as the extra keyword ``glide_tree_mask`` that
transformers forwards from ``model(...)`` down to the attention function. Without it the
function attends causally, so prefill and plain decoding run through the same kernel. Pass the
cache to your own forward calls with ``**cache_kwargs(model, cache)``: transformers renamed that
argument within 5.x and silently ignores the name it does not know.

Limits: sequences of a batch share one prefix length (a ``DynamicCache`` has one length), so
left-padded batches are not supported and a padding mask with zeros is refused.
"""

from __future__ import annotations

import inspect

import torch

from .attention import tree_attention
from .compact import compact_kv

__all__ = [
    "ATTN_IMPLEMENTATION",
    "register_tree_attention",
    "enable_tree_attention",
    "tree_attention_forward",
    "verify_tree_hf",
    "compact_hf_cache",
    "cache_kwargs",
]

#: The name under which the attention function is registered.
ATTN_IMPLEMENTATION = "glide_tree"


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    glide_tree_mask: torch.Tensor | None = None,
    glide_backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function backed by :func:`glide.kernels.tree_attention`.

    The last ``T`` positions of ``key`` / ``value`` are the new tokens (the cache update has
    already appended them); everything before is the committed prefix, visible to all.

    Parameters
    ----------
    module : torch.nn.Module
        The calling attention layer (unused).
    query : torch.Tensor, shape (batch, num_q_heads, T, head_dim)
    key, value : torch.Tensor, shape (batch, num_kv_heads, prefix_len + T, head_dim)
    attention_mask : None
        Our mask function always builds ``None``; a ready-made 4D mask is refused because the
        tree mask is given by ``glide_tree_mask``.
    scaling : float, optional
        Softmax scale; defaults to ``1 / sqrt(head_dim)``.
    dropout : float
        Must be 0 (inference only).
    glide_tree_mask : torch.Tensor, shape (batch, T, T) or (T, T), bool, optional
        ``[b, i, j]``: new token ``j`` is token ``i`` or one of its ancestors. Default: causal.
    glide_backend : {"auto", "triton", "reference"}
        Passed to :func:`~glide.kernels.tree_attention`.

    Returns
    -------
    out : torch.Tensor, shape (batch, T, num_q_heads, head_dim)
    weights : None
    """
    if dropout:
        raise ValueError(f"dropout must be 0 with {ATTN_IMPLEMENTATION!r} attention, got {dropout}")
    if attention_mask is not None:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION!r} attention takes its mask from glide_tree_mask; got an "
            f"attention_mask of shape {tuple(attention_mask.shape)}"
        )
    batch, _, new, _ = query.shape
    if key.shape[2] < new:
        raise ValueError(f"key must hold at least the {new} new positions, got shape {tuple(key.shape)}")
    if glide_tree_mask is None:
        tree_mask = torch.ones(new, new, dtype=torch.bool, device=query.device).tril()
    else:
        tree_mask = glide_tree_mask.to(device=query.device, dtype=torch.bool)
    if tree_mask.dim() == 2:
        tree_mask = tree_mask.expand(batch, new, new)
    prefix = torch.full((batch,), key.shape[2] - new, dtype=torch.int32, device=query.device)
    out = tree_attention(
        query.transpose(1, 2), key, value, prefix, tree_mask, sm_scale=scaling, backend=glide_backend
    )
    return out, None


def _tree_mask_builder(*args, attention_mask=None, **kwargs):
    """Mask function for transformers' mask registry: the real mask comes with the call."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION!r} attention does not support padding: attention_mask of shape "
            f"{tuple(attention_mask.shape)} has masked positions"
        )
    return None


def register_tree_attention(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register :func:`tree_attention_forward` (and a matching mask builder) with transformers.

    Safe to call more than once. Returns ``name``, to pass to
    ``model.set_attn_implementation`` or ``from_pretrained(attn_implementation=...)``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, tree_attention_forward)
    AttentionMaskInterface.register(name, _tree_mask_builder)
    return name


def enable_tree_attention(model) -> None:
    """Register the attention function and switch ``model`` (a transformers decoder) to it."""
    model.set_attn_implementation(register_tree_attention())


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the keyword that ``model.forward`` reads its cache from.

    transformers renamed ``past_key_values`` to ``cache`` within 5.x (4.56 and 5.17 read
    ``past_key_values``, 5.24 reads ``cache`` and still accepts the old name with a warning).
    The forward takes ``**kwargs``, so the wrong name is swallowed without an error and the
    cache is silently neither read nor updated: ask the signature rather than the version.

    >>> model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))  # doctest: +SKIP
    """
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def verify_tree_hf(model, tree_ids, tree_mask, cache, *, backend: str = "auto") -> torch.Tensor:
    """Logits of every node of a token tree, in one forward of a transformers decoder.

    Node ``i`` sees the cached prefix and its ancestors (``tree_mask[b, i]``) and sits at
    position ``prefix_len + depth(i)``. The tree's K/V are appended to ``cache``; keep the
    accepted path with :func:`compact_hf_cache`.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM switched to tree attention with :func:`enable_tree_attention`.
    tree_ids : torch.Tensor, shape (batch, T), int64
        Token of each tree slot; parents come before their children.
    tree_mask : torch.Tensor, shape (batch, T, T), bool
        ``tree_mask[b, i, j]``: slot ``j`` is slot ``i`` or one of its ancestors.
    cache : transformers.Cache
        Holds the committed prefix, the same length for every sequence.
    backend : {"auto", "triton", "reference"}
        Passed to :func:`~glide.kernels.tree_attention`.

    Returns
    -------
    torch.Tensor, shape (batch, T, vocab)
    """
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"model must use {ATTN_IMPLEMENTATION!r} attention (call enable_tree_attention(model)); "
            f"it uses {model.config._attn_implementation!r}"
        )
    if not isinstance(tree_ids, torch.Tensor) or tree_ids.dim() != 2:
        shape = tuple(tree_ids.shape) if isinstance(tree_ids, torch.Tensor) else type(tree_ids).__name__
        raise ValueError(f"tree_ids must have shape (batch, T), got {shape}")
    batch, new = tree_ids.shape
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool torch.Tensor")
    if tuple(tree_mask.shape) != (batch, new, new):
        raise ValueError(f"tree_mask must have shape {(batch, new, new)}, got {tuple(tree_mask.shape)}")
    depth = tree_mask.sum(-1) - 1  # ancestors-or-self, minus self
    prefix_len = cache.get_seq_length()
    cache_arg = cache_kwargs(model, cache)
    out = model(
        input_ids=tree_ids,
        position_ids=prefix_len + depth,
        use_cache=True,
        glide_tree_mask=tree_mask,
        glide_backend=backend,
        **cache_arg,
    )
    # A cache under a name the model does not read is dropped silently and the tree never sees
    # the prefix; say so here rather than as a length mismatch in compact_hf_cache.
    if cache.get_seq_length() != prefix_len + new:
        (name,) = cache_arg
        raise RuntimeError(
            f"{type(model).__name__} did not append the tree to the cache passed as {name}=: "
            f"length {cache.get_seq_length()} after the forward, expected {prefix_len} + {new}"
        )
    return out.logits


def compact_hf_cache(cache, prefix_len: int, path_idx, path_lens, *, backend: str = "auto"):
    """Keep an accepted path of the verified tree in a transformers ``DynamicCache``.

    Moves tree slot ``path_idx[b, a]`` to position ``prefix_len + a`` in every layer's K and V
    with :func:`~glide.kernels.compact_kv`, then crops the cache to ``prefix_len + path_len``.

    Parameters
    ----------
    cache : transformers.DynamicCache
        Holds the prefix followed by the tree (as :func:`verify_tree_hf` left it).
    prefix_len : int
        Committed length before the tree.
    path_idx : torch.Tensor, shape (batch, max_path), integer
        Accepted tree slots, in order.
    path_lens : torch.Tensor, shape (batch,), integer
        All equal: a ``DynamicCache`` has one length for the whole batch.

    Returns
    -------
    cache
    """
    lens = torch.as_tensor(path_lens)
    if lens.dim() != 1 or lens.numel() == 0 or not bool((lens == lens[0]).all()):
        raise ValueError(
            "path_lens must be a non-empty (batch,) tensor with one value for the whole batch "
            f"(a DynamicCache has one length), got shape {tuple(lens.shape)}"
        )
    keep = int(lens[0])
    first = True
    for layer in cache.layers:
        seqlens = torch.full((layer.keys.shape[0],), prefix_len, dtype=torch.int64, device=layer.keys.device)
        for states in (layer.keys, layer.values):
            # states[None] is a view: (1, batch, heads, seq, dim) is compact_kv's stacked layout.
            compact_kv(
                states[None],
                seqlens,
                path_idx.to(states.device),
                path_lens.to(states.device),
                check_values=first,
                backend=backend,
            )
            first = False
    # A negative count removes that many tokens in transformers 4.x and 5.x alike.
    excess = cache.get_seq_length() - (prefix_len + keep)
    if excess > 0:
        cache.crop(-excess)
    return cache
