"""The draft's training loop: teacher-forced, block-wise cross mask, resumable, DDP-ready.

One step takes a global batch of corpus samples (split across ranks under ``torchrun``), runs
the draft over whole sequences against the stored target features, and minimises, per
position ``q`` that carries a loss,

- ``kl``: the cross-entropy from the teacher's top-k next-token distribution (renormalised over
  the draft vocabulary) to the draft's, i.e. the KL divergence up to the teacher's entropy;
- ``ce``: the cross-entropy of the corpus token at ``q + 1``;
- ``mix``: their mean.

Only positions ``q >= prompt_len - 1`` carry a loss: they predict response tokens, which is all
the draft does while decoding (the features hold the teacher there only). The loss is a sum
divided by the global number of those positions in the batch, so a run on ``W`` ranks computes the same
gradient as one process on the whole batch (``DistributedDataParallel`` averages over ranks; we
multiply by ``W``).

Determinism and resuming: batch order, block offsets and everything random derive from
``(seed, step)``, so the state saved every ``save_every`` steps (weights, optimiser, step) is all
a resumed run needs; a killed run continues where its last checkpoint left it, bit for bit on
the same machine and thread count. Checkpoints are written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from glide.draft.checkpoint import new_draft_config, save_draft
from glide.draft.model import GlideDraftModel, block_cross_mask, states_at

from .corpus import Sample, atomic_write
from .features import Features, FeatureSet

__all__ = ["TrainSettings", "train_draft", "evaluate", "draft_vocabulary", "init_from_target", "batch_plan",
           "grow_state"]

LOSSES = ("kl", "ce", "mix")
INITS = ("random", "target-first", "target-last")


@dataclass
class TrainSettings:
    """A training recipe (stored in the checkpoint; a resumed run must match it).

    Attributes
    ----------
    gamma : int
        Draft tokens per step at decoding time; the cross mask's blocks are ``gamma + 1`` long.
    num_layers : int
    cross_attention : bool
        ``False`` trains the vanilla ablation.
    draft_vocab_size : int or None
        Head rows: the most frequent corpus tokens; ``None`` for the whole vocabulary.
    loss : {"kl", "ce", "mix"}
    epochs : float
    batch_size : int
        Sequences per optimiser step, over all ranks.
    max_len : int
        Longer samples are cut.
    lr, warmup_steps, weight_decay, clip : optimiser settings (AdamW, linear warm-up, cosine
        decay to 10%).
    init : {"random", "target-first", "target-last"}
        ``random`` draws the layers' weights and starts the final norm's weight at 0.1 (near
        uniform predictions). ``target-first`` copies the target's first layer into the
        self-attention and MLP (their input is the embedding, as in the target) and the target's
        final norm, with the cross-attention's output projection at zero: the draft starts as
        an early exit after the target's layer 0. ``target-last`` starts from the target's
        last layer (self-attention, MLP, norms; the cross-attention from its q and o
        projections).
    seed : int
    save_every : int
        Steps between checkpoints.
    bf16 : bool
        Run the forward and backward under bfloat16 autocast (master weights stay float32);
        ``False`` computes in float32.
    init_from : str, optional
        A draft folder to start from instead of ``init`` (to train a draft further with a new
        schedule); its cross-attention and head size must be this run's, and the run keeps its
        head rows (its card goes into the new card as ``prior``). A draft with fewer layers
        than ``num_layers`` is grown by :func:`grow_state`, starting from the same predictions.
    hidden_input : bool
        The draft also reads the target's final hidden state at the last verified position
        (see :class:`~glide.draft.model.GlideDraftModel`); the features must hold it
        (:func:`~glide.train.features.build_hidden`). A prior draft without it gains it with
        its projection at zero, so it starts from the prior's predictions.
    """

    gamma: int = 4
    num_layers: int = 1
    cross_attention: bool = True
    draft_vocab_size: int | None = 16384
    loss: str = "kl"
    epochs: float = 2.0
    batch_size: int = 8
    max_len: int = 640
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    init: str = "random"
    seed: int = 0
    save_every: int = 50
    bf16: bool = True
    init_from: str | None = None
    hidden_input: bool = False

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for name in ("gamma", "num_layers", "batch_size", "max_len", "save_every", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ValueError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def draft_vocabulary(samples: list[Sample], vocab_size: int, size: int | None,
                     always=()) -> list[int] | None:
    """The ``size`` most frequent token ids of the corpus (ties by id), ``always`` first.

    ``None`` when ``size`` is ``None`` or covers the vocabulary.
    """
    if size is None or size >= vocab_size:
        return None
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in samples:
        np.add.at(counts, np.asarray(s.tokens, dtype=np.int64), 1)
    order = np.lexsort((np.arange(vocab_size), -counts))
    head = [int(t) for t in always if 0 <= t < vocab_size]
    rest = [int(t) for t in order if int(t) not in set(head)]
    return (head + rest)[:size]


def init_from_target(draft: GlideDraftModel, target, which: str = "target-last") -> None:
    """Start from one of the target's layers (see :class:`TrainSettings`, ``init``)."""
    if which == "target-first":
        first = target.layers[0]
        with torch.no_grad():
            for layer in draft.layers:
                for name in ("input_layernorm", "qkv_proj", "o_proj", "post_attention_layernorm",
                             "gate_up_proj", "down_proj"):
                    getattr(layer, name).weight.copy_(getattr(first, name).weight)
                if layer.cross_o_proj is not None:
                    layer.cross_o_proj.weight.zero_()  # the draft starts as the target's layer 0
            draft.norm.weight.copy_(target.norm.weight)
        return
    last = target.layers[-1]
    t = draft.config.target
    Hq_D = t.num_heads * t.head_dim
    with torch.no_grad():
        for layer in draft.layers:
            layer.input_layernorm.weight.copy_(last.input_layernorm.weight)
            layer.qkv_proj.weight.copy_(last.qkv_proj.weight)
            layer.o_proj.weight.copy_(last.o_proj.weight)
            layer.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
            layer.gate_up_proj.weight.copy_(last.gate_up_proj.weight)
            layer.down_proj.weight.copy_(last.down_proj.weight)
            if layer.cross_q_proj is not None:
                # no pre-norm on the cross query: fold the last layer's norm weight into it
                wq = last.qkv_proj.weight[:Hq_D] * last.input_layernorm.weight[None, :]
                layer.cross_q_proj.weight.copy_(wq)
                layer.cross_o_proj.weight.copy_(last.o_proj.weight)
        draft.norm.weight.copy_(target.norm.weight)


def _read_prior(target, settings: TrainSettings):
    """The ``init_from`` draft (read by :func:`load_draft`, so it must fit ``target`` and pass
    its checks) and its card; it must have this run's layers, cross-attention and head size.
    Errors name ``init_from``."""
    from glide.draft.checkpoint import load_draft, read_draft_config

    path = settings.init_from
    try:
        card = read_draft_config(path)[1]
        prior = load_draft(path, target)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"init_from: {str(exc).removeprefix('draft: ')}") from None
    c, size = prior.config, settings.draft_vocab_size
    want = None if size is None or size >= target.config.vocab_size else size
    have = None if c.draft_vocab is None else len(c.draft_vocab)
    if (c.cross_attention, have) != (settings.cross_attention, want) or c.num_layers > settings.num_layers:
        raise ValueError(f"init_from: the draft in {path} differs from this run (cross-attention or head "
                         f"size), or has more layers ({c.num_layers}) than --layers ({settings.num_layers})")
    if c.hidden_input and not settings.hidden_input:
        raise ValueError(f"init_from: the draft in {path} reads the target's hidden state; train it further "
                         "with --hidden-input")
    return prior, card


def grow_state(prior: GlideDraftModel, num_layers: int) -> dict:
    """A ``num_layers``-layer draft's state that computes exactly what ``prior`` computes.

    Growing keeps every layer of ``prior`` on the target layer it reads: draft layer ``i`` reads
    target layer ``L - N + i``, so the prior's layer ``j`` becomes layer ``j + k`` with
    ``k = num_layers - prior layers``, and the ``k`` new layers go in front. Each new layer starts
    as a copy of the prior's first layer with its three output projections (self-attention,
    cross-attention, MLP) at zero: it adds nothing to the residual stream until training moves
    them, so the grown draft begins with the prior's predictions and acceptance.

    Parameters
    ----------
    prior : GlideDraftModel
    num_layers : int
        At least ``prior.config.num_layers``.

    Returns
    -------
    dict
        State dict (``prior``'s dtype) for a draft of ``num_layers`` layers with ``prior``'s
        cross-attention and head.
    """
    have = prior.config.num_layers
    if num_layers < have:
        raise ValueError(f"num_layers: cannot shrink a draft of {have} layers to {num_layers}")
    k = num_layers - have
    state = {}
    for name, v in prior.state_dict().items():
        v = v.detach().clone()
        if not name.startswith("layers."):
            state[name] = v
            continue
        _, j, rest = name.split(".", 2)
        state[f"layers.{int(j) + k}.{rest}"] = v
        if int(j) == 0:
            for i in range(k):
                zero = rest.split(".")[0] in ("o_proj", "cross_o_proj", "down_proj")
                state[f"layers.{i}.{rest}"] = torch.zeros_like(v) if zero else v.clone()
    return state


def batch_plan(num_samples: int, lengths, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Global batches for the whole run, a pure function of its arguments.

    Each epoch is a seeded permutation, cut into groups of ``16 * batch_size`` samples that are
    sorted by length (little padding), cut into batches, and the epoch's batches shuffled.
    """
    lengths = np.asarray(lengths)
    total = math.ceil(epochs * num_samples / batch_size)
    plan, epoch = [], 0
    while len(plan) < total:
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(num_samples)
        batches = []
        group = 16 * batch_size
        for g in range(0, num_samples, group):
            part = perm[g:g + group]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
        order = rng.permutation(len(batches))
        plan += [batches[i] for i in order]
        epoch += 1
    return plan[:total]


def _lr_at(step: int, total: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    frac = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class _Batch:
    ids: torch.Tensor  # (b, S)
    kv: list  # per draft layer (k, v), each (b, Hkv, S, D) bfloat16
    rows: torch.Tensor  # (b, S) bool: positions with a loss
    weight: torch.Tensor  # (n,) per selected row
    labels: torch.Tensor  # (n,) corpus next token (draft index, -1 if outside)
    t_idx: torch.Tensor  # (n, k) teacher top-k (draft index, -1 if outside)
    t_logp: torch.Tensor  # (n, k)
    t_top1: torch.Tensor  # (n,) teacher argmax token id
    shift: torch.Tensor  # (b,)
    states: torch.Tensor | None = None  # (b, S, hidden): the target's final hidden state per position


def _block_shifts(s: TrainSettings, step: int, n: int) -> torch.Tensor:
    """The cross-mask block offsets of a step's ``n`` global samples, a function of (seed, step):
    drawn for the whole global batch, so that any split over ranks sees the same."""
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    return torch.randint(0, s.gamma + 1, (n,), generator=g)


def _make_batch(plan_batch, lo, hi, samples, feats: Features | FeatureSet, s: TrainSettings, vocab_index,
                shifts) -> _Batch:
    """Samples ``plan_batch[lo:hi]`` (a rank's share of the global batch) as tensors;
    ``shifts`` holds the block offsets of the whole ``plan_batch``."""
    idx = plan_batch[lo:hi]
    b = len(idx)
    lens = [min(len(samples[i].tokens), s.max_len) for i in idx]
    S = max(lens)
    # the features hold the target's last ``num_layers`` layers or more; the draft reads the last
    # ``s.num_layers`` of them (draft layer i reads target layer L - N + i)
    N, first = s.num_layers, feats.meta["num_layers"] - s.num_layers
    Hkv, D = feats.meta["num_kv_heads"], feats.meta["head_dim"]
    ids = torch.zeros(b, S, dtype=torch.int64)
    kv = torch.zeros(N, 2, b, Hkv, S, D, dtype=torch.bfloat16)
    w = torch.zeros(b, S)
    nxt = torch.zeros(b, S, dtype=torch.int64)
    K = feats.meta["topk"]
    tid = torch.zeros(b, S, K, dtype=torch.int64)
    tlp = torch.zeros(b, S, K)
    for r, i in enumerate(idx):
        smp, L = samples[i], lens[r]
        tok = torch.as_tensor(smp.tokens[:L], dtype=torch.int64)
        ids[r, :L] = tok
        kv[:, :, r, :, :L] = feats.sample_kv(i)[first:, :, :, :L]
        a, c = feats.sample_topk(i)
        tid[r, :L], tlp[r, :L] = a[:L], c[:L]
        nxt[r, : L - 1] = tok[1:]
        P = smp.prompt_len
        w[r, max(P - 1, 0): L - 1] = 1.0
    rows = w > 0
    shift = torch.as_tensor(shifts)[lo:hi]
    t_id = tid[rows]
    t_idx = torch.where(t_id >= 0, vocab_index[t_id.clamp(min=0)], -1)
    hid = None
    if s.hidden_input:
        for r, i in enumerate(idx):
            h = feats.sample_hidden(i)
            if hid is None:
                hid = torch.zeros(b, S, h.shape[-1], dtype=torch.bfloat16)
            hid[r, :lens[r]] = h[:lens[r]]
    return _Batch(ids, [(kv[l, 0], kv[l, 1]) for l in range(N)], rows, w[rows],
                  vocab_index[nxt[rows]], t_idx, tlp[rows], t_id[:, 0], shift, hid)


def _target_hidden(batch: _Batch, cross: torch.Tensor):
    """What each query's glimpse reads: the target state at the last position its cross mask
    shows (the position before its block's start for the training mask; masks are prefixes),
    or ``None`` for a batch without states."""
    if batch.states is None:
        return None
    seen = cross if cross.dim() == 3 else cross.expand(batch.ids.shape[0], *cross.shape)
    return states_at(batch.states, seen.sum(-1) - 1)


def _loss_terms(logits, batch: _Batch, kind: str):
    """Per-row losses (n,), the draft's top-1 (draft index) and its log-probabilities (n, vocab_out)."""
    logq = torch.log_softmax(logits.float(), -1)
    terms = []
    if kind in ("kl", "mix"):
        inside = batch.t_idx >= 0
        p = torch.where(inside, batch.t_logp, float("-inf")).softmax(-1)
        p = torch.nan_to_num(p)  # a row with no teacher token inside the draft vocabulary
        terms.append(-(p * logq.gather(1, batch.t_idx.clamp(min=0))).sum(-1))
    if kind in ("ce", "mix"):
        ok = batch.labels >= 0
        ce = -logq.gather(1, batch.labels.clamp(min=0)[:, None])[:, 0]
        terms.append(torch.where(ok, ce, torch.zeros_like(ce)))
    return sum(terms) / len(terms), logq.argmax(-1), logq


CONFIDENCE_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)  # buckets of the teacher's top-1 probability (evaluate)
RECALL_AT = (1, 4, 8)  # draft top-k sizes whose recall of the teacher's argmax evaluate reports


def evaluate(model: GlideDraftModel, samples: list[Sample], feats: Features | FeatureSet, settings: TrainSettings,
             batch_size: int | None = None, *, limit: int | None = None, cross_mask=None) -> dict:
    """The draft's loss and teacher agreement on samples it does not train on (validation).

    Every batch uses the same block offsets at every call (sample ``i`` starts its grid at
    ``i mod (gamma + 1)``), so successive calls differ only by the weights.

    Parameters
    ----------
    model : GlideDraftModel
        Attached to its target.
    samples : list of Sample
    feats : Features or FeatureSet
        Built from ``samples``.
    settings : TrainSettings
        The run's loss, gamma, max_len and bf16.
    batch_size : int, optional
        Default ``settings.batch_size``.
    limit : int, optional
        Score only the first ``limit`` samples.
    cross_mask : callable(seq_len, shift) -> torch.Tensor, optional
        The target positions each query reads, instead of the training block mask
        (:func:`block_cross_mask` with the offsets above), e.g. to measure the draft with a
        fresher or staler view of the target's cache (``bench.draft_depth``).

    Returns
    -------
    dict
        ``loss`` (the training loss, mean over response positions), ``top1`` (agreement of the
        draft's argmax with the teacher's), ``tokens`` (positions scored), and
        ``top1_by_depth`` / ``tokens_by_depth``: the agreement and the positions scored at
        each position of the ``gamma + 1`` block (0: a step's first draft token), by the
        offsets above; ``confidence_edges`` with ``top1_by_confidence`` /
        ``tokens_by_confidence``: the same by the teacher's own probability of its argmax
        (bucket ``i`` holds ``edges[i] <= p < edges[i + 1]``, the last one ``p <= 1``); and
        ``recall``: for each ``k`` in :data:`RECALL_AT`, how often the teacher's argmax is among
        the draft's ``k`` most likely tokens (what a tree with ``k`` children can catch); and
        ``sampled_acceptance``: the mean chance that a one-token draft is accepted when the
        target samples at temperature 1, for two ways of drafting it. ``greedy_token``: the
        draft proposes its argmax and the target must sample that token, ``p(argmax q)`` (the
        engine's rule); ``sampled_token``: the draft samples its token from its own ``q`` and
        the target accepts it with ``min(1, p/q)`` (the residual rule of speculative sampling),
        ``sum_v min(p_v, q_v)``. Both sum over the teacher's stored top-k only, so both are
        lower bounds (exact when the features hold the whole vocabulary).
    """
    if len(samples) != len(feats):
        raise ValueError("data: the validation features were made from another corpus")
    bs = batch_size or settings.batch_size
    block = settings.gamma + 1
    n_scored = len(samples) if limit is None else min(limit, len(samples))
    order = sorted(range(n_scored), key=lambda i: (min(len(samples[i].tokens), settings.max_len), i))
    vocab_index = model.vocab_index.cpu()
    total = 0.0
    agree, count = torch.zeros(block, dtype=torch.float64), torch.zeros(block, dtype=torch.float64)
    edges = torch.tensor(CONFIDENCE_EDGES, dtype=torch.float64)
    c_agree = torch.zeros(len(CONFIDENCE_EDGES) - 1, dtype=torch.float64)
    c_count = torch.zeros_like(c_agree)
    caught = torch.zeros(len(RECALL_AT), dtype=torch.float64)
    accept = torch.zeros(2, dtype=torch.float64)  # greedy-token, sampled-token (see Returns)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(order), bs):
                idx = order[b:b + bs]
                batch = _make_batch(idx, 0, len(idx), samples, feats, settings, vocab_index,
                                    [i % block for i in idx])
                S = batch.ids.shape[1]
                cross = (block_cross_mask(S, block, batch.shift) if cross_mask is None
                         else cross_mask(S, batch.shift))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
                    logits = model(batch.ids, batch.kv, cross, batch.rows, _target_hidden(batch, cross))
                per_row, top1, logq = _loss_terms(logits, batch, settings.loss)
                total += float((per_row * batch.weight).sum())
                ok = (model.vocab_ids[top1] == batch.t_top1).double() * batch.weight
                pos = torch.arange(S)[None, :]
                depth = ((pos - batch.shift[:, None]) % block).expand(len(idx), S)[batch.rows]
                agree.index_add_(0, depth, ok)
                count.index_add_(0, depth, batch.weight.double())
                conf = batch.t_logp[:, 0].double().exp()  # the teacher's top-k come sorted
                bucket = (torch.bucketize(conf, edges[1:-1], right=True))
                c_agree.index_add_(0, bucket, ok)
                c_count.index_add_(0, bucket, batch.weight.double())
                best = logits.topk(min(max(RECALL_AT), logits.shape[-1]), -1).indices  # draft indices, best first
                # t_idx -1 (outside the draft vocabulary) never hits; hits within the first k, per k
                within = (best == batch.t_idx[:, :1]).double().cumsum(-1)
                k_at = torch.tensor(RECALL_AT).clamp(max=best.shape[-1]) - 1
                caught += (within[:, k_at] * batch.weight.double()[:, None]).sum(0)
                p = batch.t_logp.double().exp()  # the teacher's top-k probabilities (n, K)
                inside = batch.t_idx >= 0
                q = torch.where(inside, logq.gather(1, batch.t_idx.clamp(min=0)).double().exp(), 0.0)
                mine = inside & (batch.t_idx == top1[:, None])  # the draft's argmax among them
                accept += torch.stack([(p * mine).sum(-1), torch.minimum(p, q).sum(-1)], 1).mul(
                    batch.weight.double()[:, None]).sum(0)
    finally:
        model.train(was_training)
    n = float(count.sum())
    return {"loss": round(total / max(n, 1e-9), 5), "top1": round(float(agree.sum()) / max(n, 1e-9), 4),
            "tokens": int(n),
            "top1_by_depth": [round(float(a) / max(float(c), 1e-9), 4) for a, c in zip(agree, count)],
            "tokens_by_depth": [int(c) for c in count],
            "confidence_edges": list(CONFIDENCE_EDGES),
            "top1_by_confidence": [round(float(a) / max(float(c), 1e-9), 4) for a, c in zip(c_agree, c_count)],
            "tokens_by_confidence": [int(c) for c in c_count],
            "recall": {k: round(float(c) / max(n, 1e-9), 4) for k, c in zip(RECALL_AT, caught)},
            "sampled_acceptance": {k: round(float(a) / max(n, 1e-9), 4)
                                   for k, a in zip(("greedy_token", "sampled_token"), accept)}}


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_draft(target, samples: list[Sample], feats: Features | FeatureSet, out_dir, settings: TrainSettings,
                max_steps: int | None = None, progress: bool = True, card: dict | None = None,
                export_dir=None, validation=None, eval_every: int = 200) -> dict:
    """Train a GliDe draft (or the vanilla ablation) and export it; resumes from ``out_dir``.

    Parameters
    ----------
    target : LlamaModel
        The frozen target (its embedding and head are shared; its config and fingerprint go
        into the draft's config).
    samples : list of Sample
    feats : Features or FeatureSet
        From :func:`glide.train.features.build_features` (or ``build_shard_features``) over
        the same samples.
    out_dir : path
        Holds ``state.pt`` (the resumable checkpoint), ``log.jsonl`` and, at the end,
        ``draft/`` (the exported draft) unless ``export_dir`` says otherwise.
    settings : TrainSettings
    max_steps : int, optional
        Stop after this many steps in all (a checkpoint is saved there); the run can be resumed
        later to the end of its plan.
    validation : (list of Sample, Features or FeatureSet), optional
        Samples never trained on: :func:`evaluate` runs on them before the first step, every
        ``eval_every`` steps and at the end, on rank 0, and writes ``val.jsonl``.
    eval_every : int

    Returns
    -------
    dict
        Summary: steps, tokens, seconds, final loss, top-1 agreement with the teacher, and
        ``val_loss`` / ``val_top1`` with ``validation``.
    """
    settings.check()
    if settings.hidden_input and not feats.has_hidden:
        raise ValueError("data: the features hold no target hidden states; run the features stage "
                         "with --hidden-input")
    if feats.meta["num_layers"] < settings.num_layers:
        raise ValueError(f"data: the features hold {feats.meta['num_layers']} target layers, the "
                         f"draft needs {settings.num_layers}")
    if len(samples) != len(feats):
        raise ValueError("data: the features were made from another corpus")
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    rank, world = _rank_world()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    V = target.config.vocab_size
    eos = list(target.config.eos_token_ids)
    prior, prior_card = _read_prior(target, settings) if settings.init_from is not None else (None, None)
    if prior is not None:  # a continued draft keeps its head rows, even if the corpus grew
        vocab = prior.config.draft_vocab
    else:
        vocab = draft_vocabulary(samples, V, settings.draft_vocab_size, always=eos)
    config = new_draft_config(target, settings.num_layers, settings.cross_attention, vocab,
                              hidden_input=settings.hidden_input)
    model = GlideDraftModel(config, dtype=torch.float32, device="cpu")
    if prior is not None:
        own = model.state_dict()
        grown = {k: v for k, v in grow_state(prior, settings.num_layers).items() if k in own}
        # a prior without hidden input keeps the new glimpse at its start: zero projection
        missing = model.load_state_dict(grown, strict=False).missing_keys
        if any(not k.startswith("hidden_") for k in missing):
            raise ValueError(f"init_from: the draft in {settings.init_from} lacks {missing}")
        del prior
    elif settings.init != "random":
        init_from_target(model, target, settings.init)
    else:
        # Start near a uniform prediction: with unit norm weights the shared head turns the
        # residual stream (at first the root's own embedding) into very confident logits, a
        # cross-entropy of ~20 that training spends its first hundred steps undoing.
        with torch.no_grad():
            model.norm.weight.fill_(0.1)
    model.attach(target)
    vocab_index = model.vocab_index.cpu()

    lengths = [min(len(x.tokens), settings.max_len) for x in samples]
    plan = batch_plan(len(samples), lengths, settings.batch_size, settings.epochs, settings.seed)
    total = len(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                            weight_decay=settings.weight_decay)
    step, elapsed, tokens_seen = 0, 0.0, 0
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["settings"] != asdict(settings):
            raise ValueError(f"resume: {state_path} was made with other settings; use another "
                             "output folder or the same settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
    stop = total if max_steps is None else min(total, max_steps)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=stop, initial=step, desc="train-draft", unit="step")
    log_path = out / "log.jsonl"
    last, val = {}, {}
    t_start = time.perf_counter() - elapsed

    def validate():
        nonlocal val
        if validation is None or rank != 0:
            return
        val = {"step": step, **evaluate(model, *validation, settings)}
        with open(out / "val.jsonl", "a") as fh:
            fh.write(json.dumps(val) + "\n")
        if bar is not None:
            bar.write(f"[train-draft] step {step}: validation loss {val['loss']:.4f}, top-1 {val['top1']:.4f}")

    if step == 0:
        validate()
    while step < stop:
        idx = plan[step]
        per = math.ceil(len(idx) / world)
        lo, hi = rank * per, min((rank + 1) * per, len(idx))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, settings)
        batch = _make_batch(idx, lo, hi, samples, feats, settings, vocab_index,
                            _block_shifts(settings, step, len(idx)))
        # the global weight: each rank's share of the mean, so W ranks == one process
        wsum = torch.tensor([float(batch.weight.sum())])
        if world > 1:
            dist.all_reduce(wsum)
        opt.zero_grad(set_to_none=True)
        cross = block_cross_mask(batch.ids.shape[1], settings.gamma + 1, batch.shift)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            logits = ddp(batch.ids, batch.kv, cross, batch.rows, _target_hidden(batch, cross))
        per_row, top1, _ = _loss_terms(logits, batch, settings.loss)
        loss = (per_row * batch.weight).sum() / wsum.clamp(min=1e-9) * world
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        step += 1
        agree = (model.vocab_ids[top1] == batch.t_top1).float().mean()
        ntok = int(batch.rows.sum())
        stats = torch.tensor([float(loss.detach()) / world, float(agree) / world, float(ntok)])
        if world > 1:
            dist.all_reduce(stats)
        tokens_seen += int(stats[2])
        last = {"step": step, "loss": round(float(stats[0]), 5), "top1": round(float(stats[1]), 4),
                "lr": _lr_at(step - 1, total, settings), "grad_norm": round(float(gnorm), 4),
                "tokens": tokens_seen, "seconds": round(time.perf_counter() - t_start, 2)}
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1']:.3f}",
                                tok_s=f"{tokens_seen / max(last['seconds'], 1e-9):.0f}")
        if step % eval_every == 0 or step == total:
            validate()
        if step % settings.save_every == 0 or step == stop:
            _save_state(state_path, model, opt, step, time.perf_counter() - t_start, tokens_seen,
                        settings, rank)
    if bar is not None:
        bar.close()
    summary = {"steps": step, "planned_steps": total, "tokens": tokens_seen,
               "seconds": round(time.perf_counter() - t_start, 1), **{k: last.get(k) for k in ("loss", "top1")}}
    if val:
        summary.update(val_step=val["step"], val_loss=val["loss"], val_top1=val["top1"])
    if rank == 0 and step == total:
        full_card = {"training": asdict(settings), "result": summary, **(card or {})}
        if prior_card is not None:
            full_card["prior"] = prior_card
        save_draft(model, export_dir or out / "draft", card=full_card)
    return summary


def _save_state(path: Path, model, opt, step, elapsed, tokens, settings, rank) -> None:
    if rank != 0:
        return
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
             "tokens": tokens, "settings": asdict(settings)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
