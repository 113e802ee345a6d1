"""CUDA graphs for the target's decode step and its tree verification.

An eager forward of the embedded model launches ~580 kernels and spends most of its time on
the host (13.9 ms eager against 1.5 ms captured on an H100 at batch 1, ctx 512: see
../shared/measurements/h100-ef05f09). :class:`CudaGraphs` captures
:meth:`LlamaModel.run_unchecked` once per ``(batch, tree bucket, logits mode)`` over static
input buffers, and replays it at every step.

What makes one capture serve every step:

- **One cache per batch size.** A graph holds the addresses of the K/V cache and of its
  ``lens``, so :meth:`CudaGraphs.new_cache` hands out one pooled :class:`KVCache` per batch size
  (grown when a longer one is asked for, which drops its graphs). At most one generation may
  use a pooled cache at a time.
- **Lengths read on the device.** The captured forward writes K/V at ``lens[b] + j`` with an
  indexed write and runs the attention kernel with ``check_lens=False``: no host sync, no
  host-to-device copy, and the same graph serves any length.
- **Tree buckets.** ``T`` new tokens run in the graph of the smallest bucket ``>= T``
  (:data:`BUCKETS`). Padding nodes are token 0 at position ``lens``, see only themselves, and
  no real node sees them; their K/V land in uncommitted slots, which the pooled cache sizes for.
  A tree longer than the largest bucket, or a cache without room for the padding, runs eagerly.

With ``capture=False`` the same static-buffer path runs without capturing (CPU tests of the
padding and bookkeeping); :func:`graphs_for` captures exactly when the model is on CUDA.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .llama import _first_row

__all__ = ["BUCKETS", "CapturedCall", "CudaGraphs", "graphs_for", "bucket_for"]

# Tree sizes with a graph of their own. Drafts propose fixed-width trees (GliDe's chain: 5,
# CaPE: up to ~20, dynamic trees: up to max_nodes + 1), so small sizes are exact and larger
# ones round up to a power of two; padding rows cost little next to the weight reads.
BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
_SEQ_ROUND = 256  # a pooled cache grows in steps of this many positions


def bucket_for(T: int) -> int | None:
    """The smallest bucket ``>= T``, or ``None`` above the largest."""
    for b in BUCKETS:
        if b >= T:
            return b
    return None


class CapturedCall:
    """``fn()`` captured once in a CUDA graph, then replayed.

    ``fn`` must read and write only tensors whose addresses stay fixed, and make no host sync.
    The first :meth:`run` calls it once eagerly on a side stream (Triton compiles, the
    allocator warms up; ``fn`` must tolerate running twice), captures it, and replays it;
    later calls replay. Returns what the captured call returned: static tensors, overwritten
    by the next replay. A capture that fails raises, with the caller's stream current again
    and nothing captured (the next :meth:`run` tries again). With ``capture=False`` every :meth:`run` calls ``fn`` eagerly (CPU
    tests of the static-buffer logic).

    Parameters
    ----------
    fn : callable() -> object
    capture : bool
    device : torch.device
    pool : optional
        A ``torch.cuda.graph_pool_handle()`` to share memory with other graphs.
    """

    def __init__(self, fn, capture: bool, device, pool=None):
        self.fn = fn
        self.capture = capture
        self.device = torch.device(device)
        self.pool = pool
        self.graph = None
        self.out = None

    def run(self):
        if not self.capture:
            self.out = self.fn()
            return self.out
        if self.graph is None:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            stream = torch.cuda.current_stream(self.device)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    self.out = self.fn()
            except BaseException:
                # a capture the runtime invalidated can fail on exit before the capture
                # stream is swapped back: leave the caller on its own stream
                torch.cuda.set_stream(stream)
                self.out = None
                raise
            self.graph = graph
        self.graph.replay()
        return self.out


class _Graph:
    """One captured forward with its static inputs and output."""

    def __init__(self, model, cache: KVCache, B: int, T: int, last_only: bool, capture: bool, pool,
                 hidden: bool = False):
        dev = cache.device
        self.T = T
        self.ids = torch.zeros(B, T, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(B, T, dtype=torch.int64, device=dev)
        self.eye = torch.eye(T, dtype=torch.bool, device=dev).expand(B, T, T).contiguous()
        self.mask = self.eye.clone()
        self.index = torch.zeros(B, dtype=torch.int64, device=dev) if last_only else None
        # The warm-up run before the capture writes K/V only into uncommitted slots.
        self._call = CapturedCall(
            lambda: model.run_unchecked(self.ids, self.pos, self.mask, cache, None, self.index,
                                        return_hidden=hidden),
            capture, dev, pool)

    @property
    def graph(self):
        return self._call.graph

    def run(self) -> torch.Tensor:
        return self._call.run()


class CudaGraphs:
    """Captured target forwards of one :class:`LlamaModel`, one pooled cache per batch size.

    It offers the three calls the engine makes on the target, with the same meaning:
    :meth:`new_cache`, :meth:`prefill` (eager: one call per generation, of any length),
    :meth:`decode` and :meth:`forward` (replayed graphs).

    Parameters
    ----------
    model : LlamaModel
    capture : bool
        Capture CUDA graphs (needs a CUDA model); ``False`` runs the same static-buffer path
        eagerly, for tests on the CPU.

    Attributes
    ----------
    captures : int
        Graphs captured so far (a benchmark reports it; each costs one warm-up forward).
    replays : int
        Forwards served from a graph; forwards that ran eagerly are in ``eager_calls``.
    """

    def __init__(self, model, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA model, the model is on {model.device}")
        self.model = model
        self.capture = capture
        self.setup = _setup(model)
        self._caches: dict[int, KVCache] = {}
        self._leased: set[int] = set()  # ids of pooled caches a generation holds
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0
        self.replays = 0
        self.eager_calls = 0

    # ------------------------------------------------------------------ caches
    def new_cache(self, batch_size: int, max_seq: int) -> KVCache:
        """The pooled cache for ``batch_size``, reset, with room for ``max_seq`` positions plus
        the padding of the largest bucket.

        Parameters
        ----------
        batch_size, max_seq : int

        Returns
        -------
        KVCache
            Pooled and leased until :meth:`release`. While it is leased (another generation
            with this batch size is running, e.g. one started from a callback), a plain cache
            of the model is returned instead, and its forwards run eagerly.
        """
        limit = self.model.config.max_position_embeddings
        want = max_seq + BUCKETS[-1]
        cache = self._caches.get(batch_size)
        if cache is not None and id(cache) in self._leased:
            return self.model.new_cache(batch_size, max_seq)
        if cache is None or cache.max_seq < max(max_seq, min(want, limit)):
            # Past the model's positions the padding room is dropped (those trees run eagerly);
            # a max_seq beyond them is refused by new_cache.
            size = max(max_seq, min(-(-want // _SEQ_ROUND) * _SEQ_ROUND, limit))
            self._drop(batch_size)
            cache = self._caches[batch_size] = self.model.new_cache(batch_size, size)
        cache.reset()
        self._leased.add(id(cache))
        return cache

    def release(self, cache: KVCache) -> None:
        """End the lease of a pooled cache from :meth:`new_cache` (others are ignored)."""
        self._leased.discard(id(cache))

    def _drop(self, batch_size: int) -> None:
        old = self._caches.pop(batch_size, None)
        if old is not None:
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] is not old}

    def clear(self) -> None:
        """Free every pooled cache and graph (none may be in use)."""
        self._caches.clear()
        self._graphs.clear()
        self._leased.clear()

    # ------------------------------------------------------------------ forwards
    def prefill(self, prompts, cache: KVCache, return_hidden: bool = False):
        """:meth:`LlamaModel.prefill`, eagerly."""
        return self.model.prefill(prompts, cache, return_hidden=return_hidden)

    def decode(self, tokens: torch.Tensor, cache: KVCache, commit=1, return_hidden: bool = False):
        """:meth:`LlamaModel.decode` (same arguments and result) through the ``T = 1`` graph:
        its inputs from :meth:`LlamaModel.decode_inputs`, its forward :meth:`forward`."""
        out = self.forward(*self.model.decode_inputs(tokens, cache), cache, return_hidden=return_hidden)
        cache.commit(commit)
        return _first_row(out)

    def forward(self, input_ids, position_ids, tree_mask, cache, logits_index=None, return_hidden=False):
        """:meth:`LlamaModel.forward` through the graph of ``T``'s bucket when one applies.

        Parameters
        ----------
        input_ids, position_ids : torch.Tensor, shape (batch, T), int64
        tree_mask : torch.Tensor, shape (batch, T, T), bool
        cache : KVCache
        logits_index : torch.Tensor, shape (batch,), int64, optional
        return_hidden : bool
            Also return the final hidden states (batch, T, hidden), as :meth:`LlamaModel.forward`
            does (a graph of its own).

        Returns
        -------
        torch.Tensor, float32
            (batch, T, vocab), or (batch, vocab) with ``logits_index``; a new tensor. With
            ``return_hidden`` the pair ``(logits, hidden)``.
        """
        model = self.model
        B, T = input_ids.shape
        bucket = bucket_for(T)
        pooled = self._caches.get(B) is cache
        if (bucket is None or not pooled or _setup(model) != self.setup
                or not cache.has_room(bucket)):  # room for the padding rows too
            self.eager_calls += 1
            return model.forward(input_ids, position_ids, tree_mask, cache, logits_index,
                                 return_hidden=return_hidden)
        model._check_forward(input_ids, position_ids, tree_mask, cache, logits_index)
        key = (cache, B, bucket, logits_index is not None, bool(return_hidden))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _Graph(model, cache, B, bucket, logits_index is not None,
                                               self.capture, self._pool, bool(return_hidden))
            self.captures += 1
        graph.ids[:, :T].copy_(input_ids)
        graph.pos[:, :T].copy_(position_ids)
        if T < bucket:
            # Padding rows see only themselves and nobody sees them; their position is lens (any
            # valid one) and their token whatever the last call left.
            graph.mask.copy_(graph.eye)
            graph.pos[:, T:].copy_(cache.lens[:, None].expand(B, bucket - T))
        graph.mask[:, :T, :T].copy_(tree_mask)
        if logits_index is not None:
            graph.index.copy_(logits_index)
        out = graph.run()
        self.replays += 1
        logits, hidden = out if return_hidden else (out, None)
        logits = logits.clone() if logits_index is not None else logits[:, :T].clone()  # padding rows cut
        return (logits, hidden[:, :T].clone()) if return_hidden else logits


def _setup(model) -> tuple:
    """What a captured forward depends on besides its buffers: a change drops the graphs."""
    return (model.device, model.dtype, model.attn_backend, model.fused_kernels,
            model.embed_tokens.weight.data_ptr())


def graphs_for(model, enabled: bool | None = None) -> CudaGraphs | None:
    """The model's :class:`CudaGraphs` (made on first use and kept on the model), or ``None``.

    Graphs need the Triton attention (the reference attention reads lengths on the host). The
    object is rebuilt, its graphs and pooled caches dropped, when the model's device, dtype,
    ``attn_backend``, ``fused_kernels`` or weights (their storage) have changed since.
    ``model._cuda_graphs.clear()`` frees them by hand.

    Parameters
    ----------
    model : LlamaModel
    enabled : bool, optional
        ``None`` turns graphs on for a CUDA model whose attention runs on Triton; ``True``
        raises where that does not hold.

    Raises
    ------
    ValueError
        Naming ``cuda_graphs``: ``enabled`` is not a bool or ``None``, or is ``True`` for a
        model not on CUDA or on the reference attention.
    """
    from glide.kernels import use_triton

    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"cuda_graphs must be True, False or None, got {enabled!r}")
    on_cuda = model.device.type == "cuda"
    triton_attention = on_cuda and use_triton(model.device, model.attn_backend)
    if enabled is None:
        enabled = triton_attention
    if not enabled:
        return None
    if not on_cuda:
        raise ValueError(f"cuda_graphs=True needs a model on CUDA, this one is on {model.device}")
    if not triton_attention:
        raise ValueError(f"cuda_graphs=True needs the Triton attention; the model's attn_backend is "
                         f"{model.attn_backend!r}")
    graphs = getattr(model, "_cuda_graphs", None)
    if graphs is None or graphs.setup != _setup(model):
        graphs = model._cuda_graphs = CudaGraphs(model)
    return graphs
