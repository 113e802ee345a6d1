"""``LlamaModel``: our Llama-family decoder, with prefill, decode and tree verification in one forward.

Every attention call is :func:`glide.kernels.tree_attention` over the static :class:`KVCache`:

- prefill: a causal ``tree_mask`` with ``lens = 0`` (ragged prompts right-padded);
- decode: ``T = 1``;
- verification: the tree's ancestor mask, with ``position_ids = lens + depth``.

The maths is transformers' ``LlamaForCausalLM`` (RMSNorm in float32, rotate-half RoPE, GQA,
SwiGLU), with q/k/v fused into one matmul and gate/up into another. The forward syncs with the
device only when the cache's host-side length bound cannot vouch that ``T`` more tokens fit
(the attention launcher may sync on its own).

On CUDA (by default; with ``LlamaModel.fused_kernels = True`` also on CPU tensors under
``TRITON_INTERPRET=1``) a decoder layer launches four fused kernels around its four
matmuls and its attention instead of torch's elementwise ops (:meth:`DecoderLayer.forward_fused`):
:func:`~glide.kernels.add_rms_norm` twice (a block's residual add with the norm that follows),
:func:`~glide.kernels.rope_store` (RoPE on q and k, and the K/V cache write) and
:func:`~glide.kernels.silu_mul`. Elsewhere the layer runs the references of those kernels
(:mod:`glide.kernels.reference`), which are this module's own torch code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from glide.kernels import add_rms_norm, reference, rope_store, silu_mul, tree_attention
from glide.kernels._dispatch import BACKENDS, use_triton
from glide.kernels.norm import MAX_HIDDEN

from .cache import KVCache
from .config import ModelConfig

__all__ = ["LlamaModel", "RMSNorm", "DecoderLayer", "FastLinear", "rope_tables", "apply_rope", "kv_writer",
           "tree_attender"]


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.int64, torch.int32)


_linear_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # None: a build without it


def _mkldnn_ok(dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or _linear_pointwise is None:
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def rope_tables(config: ModelConfig, dtype, device):
    """cos and signed sin tables, shape (max_position_embeddings, head_dim).

    Built in float32 like transformers (float64 for a float64 model), scaled by the attention
    scaling, then cast once to ``dtype``. The first half of ``sin`` is negated so that
    ``rotate_half(x) * sin == roll(x, D/2) * signed_sin`` (see :func:`apply_rope`).
    """
    c = config
    inv_freq, scaling = c.rope_frequencies()
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    pos = torch.arange(c.max_position_embeddings, dtype=torch.int64).to(tdt)
    freqs = pos[:, None] * inv_freq.to(tdt)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    half = c.head_dim // 2
    sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE with a signed ``sin`` table (:func:`rope_tables`), out of place.

    ``x`` is ``(..., head_dim)``; ``cos``/``sin`` broadcast to it. This is
    :func:`glide.kernels.reference.rotate_half_rope`.
    """
    return reference.rotate_half_rope(x, cos, sin)


def kv_writer(lens, same_len, B, T):
    """The K/V write of every layer of one forward: token ``j`` of sequence ``b`` to ``lens[b] + j``.

    Returns ``store(kv_layer, kv)`` with ``kv_layer`` (2, B, Hkv, max_seq, D) and ``kv``
    (B, T, 2, Hkv, D). When every sequence has the host-known length ``same_len`` (decode with
    one sequence) that is one slice copy, ``[same_len, same_len + T)``, instead of an index_put
    (7 vs 11 us a layer at decode shapes on the 2-core EPYC).
    """
    if same_len is not None:
        def store(kv_layer, kv):  # kv (B, T, 2, Hkv, D) -> slice (2, B, Hkv, T, D)
            kv_layer.narrow(3, same_len, T).copy_(kv.permute(2, 0, 3, 1, 4))
    else:
        slots = reference.kv_slots(lens, B, T, lens.device)  # once for every layer

        def store(kv_layer, kv):
            reference.store_kv(kv_layer, kv, slots)
    return store


def tree_attender(lens, same_len, tree_mask, backend="auto"):
    """Tree attention for every layer of one forward: ``attend(q, k_cache, v_cache, sm_scale)``.

    The Triton launcher, or on the reference path the reference itself with its dense
    visibility mask built once for all layers instead of once per layer (which with the
    launcher's checks cost ~40% of a CPU decode step's non-matmul time; unmeasured
    elsewhere), as an additive mask when every node sees some key (always, in verification).
    When every sequence has the host-known length ``same_len`` and ``tree_mask`` is all true
    (a decode step), every new token sees the first ``same_len + T`` positions
    and the reference runs with no mask at all. The caller checks the cache's room first:
    the launcher is called without its length sync.
    """
    if use_triton(lens.device, backend):
        def attend(q, k, v, sm_scale):
            return tree_attention(q, k, v, lens, tree_mask, sm_scale, check_lens=False, backend=backend)
    else:
        if same_len is not None and bool(tree_mask.all()):  # one host sync a forward
            allowed = same_len + tree_mask.shape[-1]
        else:
            allowed = reference.tree_visibility(lens, tree_mask)
        biases = {}  # compute dtype -> the additive form of `allowed`, built on first use

        def attend(q, k, v, sm_scale):
            mask = allowed
            if isinstance(allowed, torch.Tensor):
                cdt = reference._compute_dtype(q.dtype)
                if cdt not in biases:  # None when a row sees nothing (then the bool mask)
                    biases[cdt] = reference.visibility_bias(allowed, cdt)
                if biases[cdt] is not None:
                    mask = biases[cdt]
            return reference.masked_attention(q, k, v, mask, sm_scale)
    return attend


class FastLinear(nn.Module):
    """``y = x @ weight.T`` without bias, with CPU layouts chosen for speed.

    ``weight`` keeps transformers' ``(out_features, in_features)`` layout (drafts share it);
    derived copies are made lazily and rebuilt whenever the weight changes (new storage, dtype
    or an in-place write). On CPU:

    - bfloat16: a oneDNN-prepacked weight (``mkldnn._linear_pointwise``), ~1.75x faster than
      ``F.linear`` for 1 and 16 rows (7.1 vs 12.6 ms for 30 streamed 3072x576 weights, 1 thread,
      this 2-core EPYC);
    - float32: the oneDNN-prepacked weight too: 20.9 vs 39.0 ms at 16 rows (same setup), and for
      one row (decode) 8.3 ms for 30 streamed 3072x576 weights against 9.3 for
      ``x @ weight.T.contiguous()`` and 18.7 for ``F.linear``; on the embedded model, float32
      decode took 31.6 ms/token against 37.5 with the transposed weight (same tokens).

    Anything else (float64, CUDA, no oneDNN) uses ``F.linear``. Set ``FastLinear.enabled = False``
    to force ``F.linear`` everywhere.
    """

    enabled = True
    _PACK_ROWS = 16  # oneDNN's batch-size hint; 1, 16 and 64 rows all ran as fast with it

    def __init__(self, in_features, out_features, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self._key = None  # the weight's (data_ptr, dtype, _version) that the fields below describe
        self._fast = False  # CPU weight with oneDNN support for its dtype
        self._packed = None  # the oneDNN-prepacked weight, built on first use

    def forward(self, x):
        # Runs ~120 times a decode step: the per-call checks are kept to a few attribute reads.
        w = self.weight
        if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):  # training a draft
            return F.linear(x, w)
        if w.is_inference():
            # made under inference_mode: no version counter tells when a derived copy goes stale
            return F.linear(x, w)
        key = (w.data_ptr(), w.dtype, w._version)
        if key != self._key:
            self._key, self._packed = key, None
            self._fast = w.device.type == "cpu" and _mkldnn_ok(w.dtype)
        if not (self._fast and self.enabled) or x.dtype != w.dtype:
            return F.linear(x, w)
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self._PACK_ROWS)
        return _linear_pointwise(x, self._packed, None, "none", [], "")

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 for half inputs (as transformers).

    Parameters
    ----------
    hidden_size : int
    eps : float
    """

    def __init__(self, hidden_size, eps, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x):
        # reference.rms_norm_ref: F.rms_norm, bit-identical to transformers' weight * (x *
        # rsqrt(mean(x^2) + eps)) in fewer ops. For half inputs it normalises in float32 and
        # rounds once, as transformers' x.float() ... .to(dtype) does (checked bit for bit),
        # without those two copies; the weight is then applied in the half dtype, as
        # transformers does. glide.kernels.add_rms_norm rounds at the same places.
        return reference.rms_norm_ref(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block: fused-QKV tree attention, then fused gate/up SwiGLU."""

    def __init__(self, config: ModelConfig, dtype, device):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.sm_scale = 1.0 / math.sqrt(c.head_dim)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.qkv_proj = FastLinear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, dtype, device)
        self.o_proj = FastLinear(c.num_heads * c.head_dim, c.hidden_size, dtype, device)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.gate_up_proj = FastLinear(c.hidden_size, 2 * c.intermediate_size, dtype, device)
        self.down_proj = FastLinear(c.intermediate_size, c.hidden_size, dtype, device)

    def forward(self, x, cos, sin, kv_layer, store, attend):
        """
        Parameters
        ----------
        x : torch.Tensor, shape (batch, T, hidden)
        cos, sin : torch.Tensor, shape (batch, T, 1, head_dim)
            ``sin`` carries the sign of rotate-half on its first half (see ``LlamaModel``).
        kv_layer : torch.Tensor, shape (2, batch, num_kv_heads, max_seq, head_dim)
            This layer's cache.
        store : callable(kv_layer, kv) -> None
            Writes ``kv``, shape (batch, T, 2, num_kv_heads, head_dim), at each new token's
            cache position (:func:`kv_writer`).
        attend : callable(q, k_cache, v_cache, sm_scale) -> out
            Tree attention with this forward's lengths and mask bound in (:func:`tree_attender`).
        """
        B, T, _ = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(self.input_layernorm(x)).view(B, T, Hq + 2 * Hkv, D)
        # RoPE on q and k together: rotate_half(x) * sin == roll(x, D/2) * (sin with its first
        # half negated), one op instead of slice/neg/cat.
        qk = qkv[:, :, : Hq + Hkv]
        qk.copy_(apply_rope(qk, cos, sin))
        store(kv_layer, qkv[:, :, Hq:].view(B, T, 2, Hkv, D))
        attn = attend(qkv[:, :, :Hq], kv_layer[0], kv_layer[1], self.sm_scale)
        x = x + self.o_proj(attn.reshape(B, T, Hq * D))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(x))
        return x + self.down_proj(reference.silu_mul_ref(gate_up))  # F.silu(gate) * up

    def forward_fused(self, x, delta, cos, sin, kv_layer, lens, attend):
        """The layer with fused Triton kernels; its output is ``h + delta``, the add left to the next.

        The same maths as :meth:`forward`, with the residual add of the previous block fused
        into this block's first norm (:func:`~glide.kernels.add_rms_norm`), RoPE and the K/V
        write in one kernel (:func:`~glide.kernels.rope_store`, at ``lens`` on the device: no
        host sync, so a CUDA graph replays it at any length), the attention residual fused into
        the second norm, and :func:`~glide.kernels.silu_mul`. Only for the Triton path.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, T, hidden)
            The residual stream before the previous block's update.
        delta : torch.Tensor, shape (batch, T, hidden), or None
            The previous block's update (``down_proj`` output), or ``None`` for the first layer.
        cos, sin : torch.Tensor, shape (batch, T, head_dim)
            ``sin`` signed, as in :meth:`forward`.
        kv_layer : torch.Tensor, shape (2, batch, num_kv_heads, max_seq, head_dim)
        lens : torch.Tensor, shape (batch,), int64
            Token ``t`` of sequence ``b`` goes to cache slot ``lens[b] + t``; the caller checked
            the room.
        attend : callable(q, k_cache, v_cache, sm_scale) -> out
            As in :meth:`forward`.

        Returns
        -------
        h, delta : torch.Tensor, shape (batch, T, hidden)
            The residual stream after attention and this block's MLP update; the layer's output
            is ``h + delta``.
        """
        B, T, hidden = x.shape
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        rows = B * T
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        d = None if delta is None else delta.reshape(rows, hidden)
        h, y = add_rms_norm(x.reshape(rows, hidden), d, n1.weight, n1.eps, backend="triton")
        qkv = self.qkv_proj(y).view(B, T, Hq + 2 * Hkv, D)
        rope_store(qkv, cos, sin, kv_layer, lens, check_lens=False, backend="triton")
        attn = attend(qkv[:, :, :Hq], kv_layer[0], kv_layer[1], self.sm_scale)
        h, y = add_rms_norm(h, self.o_proj(attn.reshape(rows, Hq * D)), n2.weight, n2.eps, backend="triton")
        delta = self.down_proj(silu_mul(self.gate_up_proj(y), backend="triton"))
        return h.view(B, T, hidden), delta.view(B, T, hidden)


def _pick_rows(x, logits_index, logits_rows):
    """The rows of ``x`` (batch, T, ...) that the LM head runs on (see :meth:`LlamaModel.forward`)."""
    if logits_index is not None:
        return x[torch.arange(x.shape[0], device=x.device), logits_index]
    if logits_rows is not None:
        return x[logits_rows]
    return x


def _first_row(out):
    """Row 0 of a one-token forward's result: logits (batch, 1, vocab), or the pair with the
    hidden states."""
    return (out[0][:, 0], out[1][:, 0]) if isinstance(out, tuple) else out[:, 0]


class LlamaModel(nn.Module):
    """A Llama-family causal LM that decodes, prefills and verifies token trees over a ``KVCache``.

    Parameters
    ----------
    config : ModelConfig
    dtype : torch.dtype
        Dtype of the weights, the activations and the cache. Logits are always float32
        (float64 for a float64 model).
    device : torch.device or str
    init_std : float or None
        Initialise weights from ``N(0, init_std)`` (norms at one), as transformers does with its
        ``initializer_range``; ``None`` leaves them uninitialised for a loader to fill.

    Attributes
    ----------
    config : ModelConfig
    embed_tokens : nn.Embedding
        Shared with drafts.
    lm_head : FastLinear
        ``lm_head.weight`` is ``embed_tokens.weight`` when the embeddings are tied.
    attn_backend : {"auto", "reference", "triton"}
        Passed to :func:`glide.kernels.tree_attention`, and to :func:`glide.kernels.compact_kv`
        through the caches that :meth:`new_cache` makes from then on.
    fused_kernels : bool or None
        Run each decoder layer's elementwise work as fused Triton kernels
        (:meth:`DecoderLayer.forward_fused`): 4 launches a layer where torch's ops made 13 in
        bfloat16/float16 and 11 in float32, so 9 launches a layer in all instead of 18 or 16
        (counted from the code, not measured). ``None`` (the class default): on CUDA tensors
        when the attention runs on Triton. ``True``: wherever the attention runs on Triton,
        the CPU interpreter included (tests; there each launch is slow and grows with the
        rows, which would skew the dynamic tree's measured verify cost). ``False``: torch's
        ops everywhere. Off the Triton path it has no effect: the CPU runs the references.
    """

    fused_kernels = None

    def __init__(self, config: ModelConfig, dtype=torch.float32, device="cpu", init_std=0.02):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.attn_backend = "auto"
        self.embed_tokens = nn.utils.skip_init(nn.Embedding, c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype, device) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.lm_head = FastLinear(c.hidden_size, c.vocab_size, dtype, device)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(c, dtype, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init_std is not None:
            for name, p in self.named_parameters():
                if "layernorm" in name or name == "norm.weight":
                    continue
                nn.init.normal_(p, std=init_std)
        self.requires_grad_(False)
        self._masks = {}

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_seq: int) -> KVCache:
        """An empty :class:`KVCache` for this model (its dtype and device).

        Parameters
        ----------
        batch_size : int
        max_seq : int
            At most ``config.max_position_embeddings`` (the RoPE tables stop there).
        """
        c = self.config
        if isinstance(max_seq, int) and max_seq > c.max_position_embeddings:
            raise ValueError(
                f"max_seq ({max_seq}) exceeds the model's max_position_embeddings "
                f"({c.max_position_embeddings})"
            )
        cache = KVCache(c.num_layers, batch_size, c.num_kv_heads, max_seq, c.head_dim,
                        dtype=self.dtype, device=self.device)
        cache.compact_backend = self.attn_backend  # one switch for every kernel the runner uses
        return cache

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, input_ids, position_ids, tree_mask, cache, logits_index=None, logits_rows=None,
                return_hidden=False):
        """Run ``T`` new tokens per sequence and write their K/V into ``cache``.

        Token ``j`` of sequence ``b`` sees the committed prefix ``[0, lens[b])`` and the new
        tokens ``i`` with ``tree_mask[b, j, i]``; its K/V go to position ``lens[b] + j`` of every
        layer. ``cache.lens`` is not advanced (see :meth:`KVCache.commit`, :meth:`KVCache.compact`).

        Parameters
        ----------
        input_ids : torch.Tensor, shape (batch, T), int64
        position_ids : torch.Tensor, shape (batch, T), int64
            RoPE positions: ``lens + j`` for a causal chunk, ``lens + depth`` for a tree.
        tree_mask : torch.Tensor, shape (batch, T, T), bool
            ``tree_mask[b, j, i]``: new token ``i`` is ``j`` or an ancestor of ``j``.
        cache : KVCache
            Needs ``lens + T <= max_seq``.
        logits_index : torch.Tensor, shape (batch,), int64, optional
            Compute the LM head only at row ``logits_index[b]`` of each sequence.
        logits_rows : torch.Tensor, shape (batch, T), bool, optional
            Compute the LM head only at these rows (e.g. a corpus pass that needs the
            teacher's logits on responses only). Not with ``logits_index``.
        return_hidden : bool
            Also return the final hidden states (after the last norm: the LM head's input) of
            every new token, whatever rows the head runs on; drafts that read the target's
            hidden state need them.

        Returns
        -------
        logits : torch.Tensor, float32 (float64 for a float64 model)
            Shape (batch, T, vocab), or (batch, vocab) with ``logits_index``, or
            (logits_rows.sum(), vocab) with ``logits_rows``.
        hidden : torch.Tensor, shape (batch, T, hidden), the model's dtype
            With ``return_hidden`` only (then the result is the pair ``(logits, hidden)``).
        """
        self._check_forward(input_ids, position_ids, tree_mask, cache, logits_index)
        if logits_rows is not None:
            B, T = input_ids.shape
            if not isinstance(logits_rows, torch.Tensor) or logits_rows.dtype != torch.bool or \
                    logits_rows.shape != (B, T):
                raise ValueError(f"logits_rows must be a ({B}, {T}) bool tensor")
        # checked by _check_forward's check_room: no sync
        return self.run_unchecked(input_ids, position_ids, tree_mask, cache, cache.uniform_length(),
                                  logits_index, logits_rows, return_hidden)

    @torch.no_grad()
    def run_unchecked(self, input_ids, position_ids, tree_mask, cache, same_len=None,
                      logits_index=None, logits_rows=None, return_hidden=False):
        """:meth:`forward` without its argument checks, for callers that checked them already.

        ``same_len`` is the length every sequence has when the host knows it (then the K/V
        write is one slice copy at that offset), else ``None`` (an indexed write at ``lens``,
        which also serves any later length: what a captured CUDA graph needs). Makes no host
        sync and no host-to-device copy on CUDA when ``same_len`` is ``None``.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        lens = cache.lens
        cos = self.rope_cos[position_ids]
        sin = self.rope_sin[position_ids]
        h = self.embed_tokens(input_ids)
        attend = tree_attender(lens, same_len, tree_mask, self.attn_backend)
        if self._fused(dev):
            return self._run_fused(h, cos, sin, cache, attend, logits_index, logits_rows, return_hidden)
        store = kv_writer(lens, same_len, B, T)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        for layer, kv_layer in zip(self.layers, cache.kv.unbind(0)):
            h = layer(h, cos, sin, kv_layer, store, attend)
        # the norm is row-wise: it runs on the head's rows only, unless every row's state is asked for
        y = self.norm(h) if return_hidden else self.norm(_pick_rows(h, logits_index, logits_rows))
        return self._head(y, logits_index, logits_rows, return_hidden)

    def _head(self, y, logits_index, logits_rows, return_hidden):
        """The LM head over the normed states ``y``: all rows with ``return_hidden`` (then the
        pair ``(logits, y)``), else the head's rows already."""
        logits = self.lm_head(_pick_rows(y, logits_index, logits_rows) if return_hidden else y)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return (logits, y) if return_hidden else logits

    def _fused(self, device) -> bool:
        """Whether :meth:`run_unchecked` runs :meth:`DecoderLayer.forward_fused` (host-only)."""
        if self.fused_kernels is False or not use_triton(device, self.attn_backend):
            return False
        if self.fused_kernels is None and torch.device(device).type != "cuda":
            return False
        return self.config.hidden_size <= MAX_HIDDEN

    def _run_fused(self, h, cos, sin, cache, attend, logits_index, logits_rows, return_hidden=False):
        """The layers and the head of :meth:`run_unchecked` on fused kernels (no host sync)."""
        delta = None
        for layer, kv_layer in zip(self.layers, cache.kv.unbind(0)):
            h, delta = layer.forward_fused(h, delta, cos, sin, kv_layer, cache.lens, attend)
        # Rows are picked before the last residual add: the add and the norm are row-wise.
        if not return_hidden and logits_rows is not None:
            picked = logits_rows.nonzero(as_tuple=True)  # the host sync of a boolean index, once
            h, delta = h[picked], delta[picked]
        elif not return_hidden:
            h, delta = _pick_rows(h, logits_index, None), _pick_rows(delta, logits_index, None)
        hidden = h.shape[-1]
        _, y = add_rms_norm(h.reshape(-1, hidden), delta.reshape(-1, hidden), self.norm.weight,
                            self.norm.eps, backend="triton")
        return self._head(y.view(h.shape), logits_index, logits_rows, return_hidden)

    def prefill(self, prompts, cache: KVCache, return_hidden: bool = False):
        """Reset ``cache`` and run the prompts; ``cache.lens`` becomes the prompt lengths.

        Parameters
        ----------
        prompts : list of list of int
            ``batch`` non-empty token lists, of any lengths (right-padded internally).
        cache : KVCache
            With ``batch_size == len(prompts)`` and ``max_seq >= max(len(p))``.

        return_hidden : bool
            Also return the final hidden states of every prompt position (see :meth:`forward`).

        Returns
        -------
        torch.Tensor, shape (batch, vocab), float32
            Logits at each prompt's last token; with ``return_hidden`` the pair
            ``(logits, hidden)``, hidden (batch, longest prompt, hidden), garbage past a prompt.
        """
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        lengths = []
        for i, p in enumerate(prompts):
            if not isinstance(p, (list, tuple)) or len(p) == 0:
                raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
            lengths.append(len(p))
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        B, T = len(prompts), max(lengths)
        if cache.batch_size != B:
            raise ValueError(f"cache has batch_size {cache.batch_size}, but prompts has {B} prompts")
        if T > cache.max_seq:
            raise ValueError(f"the longest prompt ({T} tokens) exceeds the cache's max_seq {cache.max_seq}")
        ids = torch.tensor([list(p) + [0] * (T - len(p)) for p in prompts], dtype=torch.int64)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"prompts hold token ids in [{lo}, {hi}], outside [0, {self.config.vocab_size})")
        dev = self.device
        ids = ids.to(dev)
        lens = torch.tensor(lengths, dtype=torch.int64, device=dev)
        pos = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T)
        cache.reset()
        out = self.forward(ids, pos, causal, cache, logits_index=lens - 1, return_hidden=return_hidden)
        cache.commit(lens)
        return out

    def decode(self, tokens: torch.Tensor, cache: KVCache, commit=1, return_hidden: bool = False):
        """Run one token per sequence and commit it.

        Parameters
        ----------
        tokens : torch.Tensor, shape (batch,), int64
        cache : KVCache
        commit : int or torch.Tensor, shape (batch,), integer
            Tokens to keep per sequence (:meth:`KVCache.commit`): 1 for all by default, or 0 for
            a sequence whose token is not kept (a finished one).
        return_hidden : bool
            Also return the token's final hidden state (see :meth:`forward`).

        Returns
        -------
        torch.Tensor, shape (batch, vocab), float32
            With ``return_hidden`` the pair ``(logits, hidden)``, hidden (batch, hidden).
        """
        out = self.forward(*self.decode_inputs(tokens, cache), cache, return_hidden=return_hidden)
        cache.commit(commit)
        return _first_row(out)

    def decode_inputs(self, tokens: torch.Tensor, cache: KVCache):
        """The :meth:`forward` inputs of a decode step: ``(input_ids, position_ids, tree_mask)``,
        shapes (batch, 1), (batch, 1), (batch, 1, 1); views and a mask kept per batch size, so
        no allocation. Checks ``tokens`` and ``cache``."""
        if not _is_int_tensor(tokens) or tokens.dim() != 1:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch,) int64 tensor, got {shape}")
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        B = tokens.shape[0]
        key = (B, tokens.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = self._masks[key] = torch.ones(B, 1, 1, dtype=torch.bool, device=tokens.device)
        return tokens[:, None], cache.lens[:, None], mask

    # ------------------------------------------------------------------ validation
    def _check_forward(self, input_ids, position_ids, tree_mask, cache, logits_index):
        if not _is_int_tensor(input_ids) or input_ids.dim() != 2:
            what = f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(
                input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, T) int64 tensor, got a {what}")
        B, T = input_ids.shape
        if T == 0 or B == 0:
            raise ValueError(f"input_ids must have batch >= 1 and T >= 1, got shape {(B, T)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device}, expected the model's {self.device}")
        if not _is_int_tensor(position_ids) or position_ids.shape != (B, T):
            what = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise ValueError(f"position_ids must be a ({B}, {T}) int64 tensor, got {what}")
        if not isinstance(tree_mask, torch.Tensor) or tree_mask.shape != (B, T, T):
            what = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
            raise ValueError(f"tree_mask must have shape ({B}, {T}, {T}), got {what}")
        if tree_mask.dtype != torch.bool:
            raise TypeError(f"tree_mask must have dtype torch.bool, got {tree_mask.dtype}")
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        c = self.config
        want = (c.num_layers, 2, B, c.num_kv_heads, cache.max_seq, c.head_dim)
        if tuple(cache.kv.shape) != want:
            raise ValueError(f"cache.kv has shape {tuple(cache.kv.shape)}, expected {want} for this model and batch")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(
                f"cache is {cache.dtype} on {cache.device}, expected the model's {self.dtype} on {self.device}"
            )
        cache.check_room(T, f"forward with T={T} tokens")
        if logits_index is not None and (not _is_int_tensor(logits_index) or logits_index.shape != (B,)):
            what = tuple(logits_index.shape) if isinstance(logits_index, torch.Tensor) else type(logits_index).__name__
            raise ValueError(f"logits_index must be a ({B},) int64 tensor, got {what}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")
        return B, T
