"""``GlideDraftModel``: GliDe's draft, decoder layers whose cross-attention reads the target's cache.

Each of the ``N`` layers runs, in order (as in the paper's code):

1. pre-norm self-attention over the draft's own tokens (RoPE, GQA, its own small KV cache);
2. cross-attention, without a pre-norm: the query is projected to the target's
   ``num_heads x head_dim`` and gets RoPE at its own absolute position; keys and values are the
   target's cached K/V of target layer ``L - N + i`` (already rotated), read in place;
3. a pre-norm SwiGLU MLP.

With ``hidden_input`` (as EAGLE feeds its draft), each token's input is its embedding plus a
projection of the target's final hidden state at the last verified position before its step's
root, the "glimpse" (:meth:`GlideDraftModel.glimpse`): the state that predicted the root. All
tokens of a step share it. The projection starts at zero, so a draft that gains it keeps its
predictions until training moves it.

Then a final RMSNorm and the LM head. The embedding and the head are the target's, shared and
frozen (not part of the draft's state), unless ``own_embeddings``; the head may cover only a
subset of the vocabulary (``draft_vocab``), which on the CPU is most of a draft step's cost.

Two entry points share the layers: :meth:`GlideDraftModel.forward` (training: whole sequences, with
the block-wise cross mask) and :meth:`GlideDraftModel.step` (decoding, over the
draft's :class:`~glide.model.cache.KVCache`, with any cross-attention the caller binds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glide.kernels import reference
from glide.model.cache import KVCache
from glide.model.llama import FastLinear, RMSNorm, apply_rope, kv_writer, rope_tables, tree_attender

from .config import DraftConfig

__all__ = ["GlideLayer", "GlideDraftModel", "block_cross_mask", "states_at"]


def block_cross_mask(seq_len: int, block: int, shift=0, device="cpu") -> torch.Tensor:
    """Which target positions each draft query may read in training: GliDe's block-wise mask.

    Positions are cut into blocks of ``block = gamma + 1`` tokens (starting at ``shift``); a query
    at ``q`` sees target positions ``k < start(q)``, the start of its block. This is what the
    draft sees while decoding: every draft query of a step reads the verified cache, which ends
    just before the step's root. Queries before the first block start (and those of the first
    block when ``shift = 0``) see nothing; they carry no loss in our corpora, whose prompts are
    longer than a block (the chat template alone is 30 tokens), so the paper code's causal first
    block would change nothing.

    Parameters
    ----------
    seq_len, block : int
    shift : int or torch.Tensor, shape (batch,)
        Offset of the block grid, per sequence; training draws it at random so that every
        position is seen at every offset from its root.

    Returns
    -------
    torch.Tensor, shape (seq_len, seq_len) or (batch, seq_len, seq_len), bool
    """
    pos = torch.arange(seq_len, device=device)
    shift = torch.as_tensor(shift, device=device)
    if shift.dim() == 1:
        q = pos[None, :] - shift[:, None]  # (B, S)
        start = torch.div(q, block, rounding_mode="floor") * block + shift[:, None]
        return pos[None, None, :] < start[:, :, None]
    start = torch.div(pos - shift, block, rounding_mode="floor") * block + shift
    return pos[None, :] < start[:, None]


def states_at(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The target states a hidden-input draft reads: ``states[b, index[b, j]]``.

    Parameters
    ----------
    states : torch.Tensor, shape (batch, S, hidden)
    index : torch.Tensor, shape (batch, n), int64
        Zeros where ``index < 0`` (no verified position before); an index past ``S - 1`` reads
        the last row (padding rows, whose output nobody uses).

    Returns
    -------
    torch.Tensor, shape (batch, n, hidden)
    """
    out = states.gather(1, index.clamp(0, states.shape[1] - 1)[:, :, None].expand(-1, -1, states.shape[-1]))
    return out * (index >= 0)[:, :, None].to(out.dtype)


class GlideLayer(nn.Module):
    """One GliDe draft layer (see the module docstring)."""

    def __init__(self, config: DraftConfig, dtype, device):
        super().__init__()
        t = config.target
        H = t.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.sm_scale = 1.0 / math.sqrt(t.head_dim)
        self.input_layernorm = RMSNorm(H, t.rms_norm_eps, dtype, device)
        self.qkv_proj = FastLinear(H, (t.num_heads + 2 * t.num_kv_heads) * t.head_dim, dtype, device)
        self.o_proj = FastLinear(t.num_heads * t.head_dim, H, dtype, device)
        if config.cross_attention:
            self.cross_q_proj = FastLinear(H, t.num_heads * t.head_dim, dtype, device)
            self.cross_o_proj = FastLinear(t.num_heads * t.head_dim, H, dtype, device)
        else:
            self.cross_q_proj = self.cross_o_proj = None
        self.post_attention_layernorm = RMSNorm(H, t.rms_norm_eps, dtype, device)
        self.gate_up_proj = FastLinear(H, 2 * t.intermediate_size, dtype, device)
        self.down_proj = FastLinear(t.intermediate_size, H, dtype, device)

    def forward(self, x, cos, sin, self_attend, cross_attend):
        """
        Parameters
        ----------
        x : torch.Tensor, shape (batch, T, hidden)
        cos, sin : torch.Tensor, shape (batch, T, 1, head_dim)
            RoPE at each token's absolute position (signed sin, see ``rope_tables``).
        self_attend : callable(q, k, v) -> out
            q (batch, T, heads, head_dim), k/v (batch, T, kv_heads, head_dim), already rotated.
        cross_attend : callable(q) -> out
            q (batch, T, target heads, head_dim), rotated; over the target's K/V.
        """
        B, T, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x)).view(B, T, Hq + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, : Hq + Hkv], cos, sin)
        attn = self_attend(qk[:, :, :Hq], qk[:, :, Hq:], qkv[:, :, Hq + Hkv:])
        x = x + self.o_proj(attn.reshape(B, T, Hq * D))
        if self.cross_q_proj is not None:
            cq = apply_rope(self.cross_q_proj(x).view(B, T, Hq, D), cos, sin)
            x = x + self.cross_o_proj(cross_attend(cq).reshape(B, T, Hq * D))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class GlideDraftModel(nn.Module):
    """The GliDe draft network.

    Parameters
    ----------
    config : DraftConfig
    dtype : torch.dtype
    device : torch.device or str
    init_std : float or None
        ``N(0, init_std)`` weights (norms at one); ``None`` leaves them for a loader.

    Notes
    -----
    With shared embeddings, call :meth:`attach` with the target before use: the draft then reads
    the target's embedding and LM head (or the rows of ``draft_vocab``) without owning them.
    """

    def __init__(self, config: DraftConfig, dtype=torch.float32, device="cpu", init_std=0.02):
        super().__init__()
        if not isinstance(config, DraftConfig):
            raise TypeError(f"config must be a DraftConfig, got {type(config).__name__}")
        self.config = c = config
        t = c.target
        self.attn_backend = "auto"
        self.layers = nn.ModuleList(GlideLayer(c, dtype, device) for _ in range(c.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype, device)
        if c.own_embeddings:
            self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size, dtype=dtype, device=device)
            self.lm_head = FastLinear(t.hidden_size, c.vocab_out, dtype, device)
        else:
            self.embed_tokens = self.lm_head = None
        if c.hidden_input:
            self.hidden_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype, device)
            self.hidden_proj = FastLinear(t.hidden_size, t.hidden_size, dtype, device)
        else:
            self.hidden_norm = self.hidden_proj = None
        cos, sin = rope_tables(t, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        ids = torch.arange(t.vocab_size) if c.draft_vocab is None else torch.tensor(c.draft_vocab)
        index = torch.full((t.vocab_size,), -1, dtype=torch.int64)
        index[ids] = torch.arange(len(ids))
        self.register_buffer("vocab_ids", ids.to(device=device, dtype=torch.int64), persistent=False)
        self.register_buffer("vocab_index", index.to(device), persistent=False)
        if init_std is not None:
            for name, p in self.named_parameters():
                if "norm" not in name:
                    nn.init.normal_(p, std=init_std)
            if self.hidden_proj is not None:
                # Zero: the glimpse adds nothing at first. A small norm weight keeps Adam's first
                # steps on the projection small beside the embeddings (RMS ~0.14 for SmolLM2).
                nn.init.zeros_(self.hidden_proj.weight)
                nn.init.constant_(self.hidden_norm.weight, 0.1)
        self._shared = None  # (embedding, head) borrowed from the target; not in state_dict

    # ------------------------------------------------------------------ sharing
    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def attach(self, target) -> "GlideDraftModel":
        """Borrow the target's embedding and LM head (no copy for the full vocabulary; the
        ``draft_vocab`` rows of the head are copied once). Returns ``self``.

        Parameters
        ----------
        target : LlamaModel, or a pair ``(embedding_weight, head_weight)`` of tensors
        """
        if self.config.own_embeddings:
            return self
        if isinstance(target, tuple):
            embed_w, head_w = target
            head = None
        else:
            embed_w, head_w, head = target.embed_tokens.weight, target.lm_head.weight, target.lm_head
        t = self.config.target
        if tuple(embed_w.shape) != (t.vocab_size, t.hidden_size):
            raise ValueError(f"draft: the target's embedding has shape {tuple(embed_w.shape)}, "
                             f"expected {(t.vocab_size, t.hidden_size)}")
        if self.config.draft_vocab is None and head is not None and head_w.dtype == self.dtype:
            out = head  # the target's own module: its packed CPU weight is reused too
        else:
            rows = head_w.detach()[self.vocab_ids.to(head_w.device)]
            out = FastLinear(t.hidden_size, len(self.vocab_ids), self.dtype, self.device)
            out.weight.requires_grad_(False)
            with torch.no_grad():
                out.weight.copy_(rows)
        self._shared = (embed_w.detach(), out)
        return self

    def _embed_head(self):
        if self.config.own_embeddings:
            return self.embed_tokens.weight, self.lm_head
        if self._shared is None:
            raise RuntimeError("draft: call attach(target) before running a draft with shared embeddings")
        return self._shared

    def _head(self, h):
        logits = self._embed_head()[1](self.norm(h))
        return logits if logits.dtype == torch.float64 else logits.float()

    # ------------------------------------------------------------------ training
    def forward(self, input_ids, target_kv, cross_visible, rows=None, target_hidden=None):
        """Whole sequences at once, teacher-forced: the draft's logits (training).

        ``forward`` so that ``DistributedDataParallel`` can wrap the draft; see :meth:`step`
        for decoding.

        Parameters
        ----------
        input_ids : torch.Tensor, shape (batch, S), int64
            Right-padded; padding is never seen by real positions (causal self-attention).
        target_kv : list of (k, v), one per draft layer
            The target's rotated keys and values of layer ``target_layer(i)``, each
            (batch, kv_heads, S, head_dim).
        cross_visible : torch.Tensor, shape (batch, S, S) or (S, S), bool
            Target positions each query may read (:func:`block_cross_mask`).
        rows : torch.Tensor, shape (batch, S), bool, optional
            Compute the head only at these positions (those that carry a loss).
        target_hidden : torch.Tensor, shape (batch, S, hidden), optional
            With ``hidden_input`` (and only then): for each query, the target's final hidden
            state at the last target position it reads in ``cross_visible`` (the position before
            its block's start), zeros where it reads none (:func:`states_at`).

        Returns
        -------
        torch.Tensor, float32
            Logits over ``draft_vocab`` (``vocab_ids`` maps a column to a token id):
            (batch, S, vocab_out), or (rows.sum(), vocab_out) with ``rows``.
        """
        B, S = input_ids.shape
        embed_w, _ = self._embed_head()
        h = F.embedding(input_ids, embed_w)
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        self._check_hidden(target_hidden, (B, S))
        if target_hidden is not None:
            h = h + self.glimpse(target_hidden).to(h.dtype)
        cos = self.rope_cos[:S][None, :, None, :]
        sin = self.rope_sin[:S][None, :, None, :]
        allowed = cross_visible if cross_visible.dim() == 3 else cross_visible.expand(B, S, S)

        def self_attend(q, k, v):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True)
            return out.transpose(1, 2)

        for layer, (tk, tv) in zip(self.layers, target_kv):
            def cross_attend(q, tk=tk, tv=tv):
                return reference.masked_attention(q, tk.to(q.dtype), tv.to(q.dtype), allowed)
            h = layer(h, cos.to(h.dtype), sin.to(h.dtype), self_attend, cross_attend)
        return self._head(h if rows is None else h[rows])

    def glimpse(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """What a hidden-input draft adds to a token's embedding.

        Parameters
        ----------
        target_hidden : torch.Tensor, shape (..., hidden)
            The target's final hidden states (the LM head's input).

        Returns
        -------
        torch.Tensor, shape (..., hidden)
        """
        if self.hidden_proj is None:
            raise ValueError("draft: this draft reads no target hidden state (hidden_input is off)")
        return self.hidden_proj(self.hidden_norm(target_hidden.to(self.hidden_proj.weight.dtype)))

    def _check_hidden(self, target_hidden, lead, name: str = "target_hidden") -> None:
        """``target_hidden`` (or a step's glimpse, ``name``) is given with ``hidden_input`` and
        only then; ``lead`` its leading shape, ``None`` not to check it."""
        want = self.config.hidden_input
        if want and target_hidden is None:
            raise ValueError(f"draft: a hidden-input draft needs the target's hidden states ({name})")
        if not want and target_hidden is not None:
            raise ValueError(f"draft: {name} given to a draft without hidden_input")
        if target_hidden is not None and lead is not None:
            H = self.config.target.hidden_size
            if tuple(target_hidden.shape) != (*lead, H):
                raise ValueError(f"draft: target_hidden must have shape {(*lead, H)}, got "
                                 f"{tuple(target_hidden.shape)}")

    # ------------------------------------------------------------------ decoding
    def new_cache(self, batch_size: int, max_seq: int) -> KVCache:
        """The draft's own self-attention cache (one layer per draft layer)."""
        t = self.config.target
        if max_seq > t.max_position_embeddings:
            raise ValueError(f"draft: needs {max_seq} positions, the model has {t.max_position_embeddings}")
        cache = KVCache(self.config.num_layers, batch_size, t.num_kv_heads, max_seq, t.head_dim,
                        dtype=self.dtype, device=self.device)
        cache.compact_backend = self.attn_backend
        return cache

    @torch.no_grad()
    def step(self, input_ids, position_ids, tree_mask, cache: KVCache, cross_attend, logits_index=None,
             need_logits=True, last_rows=None, checked=True, glimpse=None):
        """Run ``T`` new tokens over the draft's cache; their K/V go to ``cache.lens + j``.

        Like the target's forward, ``cache.lens`` is not advanced.

        Parameters
        ----------
        input_ids : torch.Tensor, shape (batch, T), int64
        position_ids : torch.Tensor, shape (batch, T), int64
        tree_mask : torch.Tensor, shape (batch, T, T), bool
            Which new tokens each new token sees (causal, or a tree's ancestors).
        cache : KVCache
            From :meth:`new_cache`.
        cross_attend : callable(layer_index, q) -> out
            The cross-attention of draft layer ``i`` (``q`` (batch, T, heads, head_dim)), e.g.
            :func:`glide.kernels.cross_attention` over the target's cache.
        logits_index : torch.Tensor, shape (batch,), int64, optional
            Compute the head only at this row of each sequence.
        need_logits : bool
            ``False`` only fills the cache.
        last_rows : int, optional
            Compute the head only at the last ``last_rows`` rows.
        checked : bool
            ``False`` skips the cache's room check and writes K/V by index at ``cache.lens``:
            no host sync, so the step can be captured in a CUDA graph (the caller guarantees
            the room).
        glimpse : torch.Tensor, shape (batch, hidden) or (batch, T, hidden), optional
            :meth:`glimpse` of the target's hidden state each token reads; required with
            ``hidden_input`` and only then. (batch, hidden) serves every token of the step.

        Returns
        -------
        torch.Tensor or None
            float32 logits over ``draft_vocab``: (batch, T, vocab_out), (batch, vocab_out) with
            ``logits_index``, or (batch, last_rows, vocab_out).
        """
        B, T = input_ids.shape
        if checked:
            cache.check_room(T, f"draft step with T={T} tokens")
            same_len = cache.uniform_length()
        else:
            same_len = None
        store = kv_writer(cache.lens, same_len, B, T)
        attend = tree_attender(cache.lens, same_len, tree_mask, self.attn_backend)
        h = F.embedding(input_ids, self._embed_head()[0])
        self._check_hidden(glimpse, None, "glimpse")
        if glimpse is not None:
            h = h + (glimpse[:, None] if glimpse.dim() == 2 else glimpse).to(h.dtype)
        cos = self.rope_cos[position_ids].unsqueeze(2)
        sin = self.rope_sin[position_ids].unsqueeze(2)
        for i, (layer, kv_layer) in enumerate(zip(self.layers, cache.kv.unbind(0))):
            def self_attend(q, k, v, kv_layer=kv_layer, sm_scale=layer.sm_scale):
                store(kv_layer, torch.stack([k, v], 2))
                return attend(q, kv_layer[0], kv_layer[1], sm_scale)

            def cross(q, i=i):
                return cross_attend(i, q)
            h = layer(h, cos, sin, self_attend, cross)
        if not need_logits:
            return None
        if logits_index is not None:
            h = h[torch.arange(B, device=h.device), logits_index]
        elif last_rows is not None:
            h = h[:, T - last_rows:]
        return self._head(h)
