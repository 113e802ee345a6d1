"""Target features for draft training, computed once by a frozen, no-grad target pass.

For every corpus token the target's rotated K/V of the layers the draft reads, and the
teacher's top-``k`` next-token log-probabilities (full softmax, temperature 1). Training then
never runs the target again, however many epochs it makes.

On disk (a folder, not committed: it is rebuilt from the corpus)::

    meta.json        settings, the corpus fingerprint, and ``done`` (samples written so far)
    kv.bin           (tokens, draft_layers, 2, kv_heads, head_dim), bfloat16 bits as int16
    topk_ids.bin     (tokens, k), int32; -1 where no teacher was computed
    topk_logp.bin    (tokens, k), float16
    hidden.bin       (tokens, hidden), bfloat16 bits as int16: the target's final hidden state
                     (the LM head's input), optional, for drafts that read it
                     (:func:`build_hidden`; ``hidden.json`` tracks it like ``meta.json``)

Rows follow the corpus order (:func:`glide.train.corpus.load_corpus`). The teacher is computed
only at positions that predict a response token (``q >= prompt_len - 1``): the LM head over
49152 tokens is a large part of the pass, and the draft is trained on those positions.
Samples are processed shortest first; ``done`` (a count in that order) advances only after a
chunk's rows are flushed, so a killed run resumes at the last whole chunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import Sample, atomic_write

__all__ = ["Features", "FeatureSet", "build_features", "build_hidden", "open_features", "corpus_digest",
           "build_shard_features", "open_shard_features"]


def corpus_digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode())
        h.update(np.asarray(s.tokens, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Features:
    kv: np.memmap  # (N, layers, 2, Hkv, D) int16 (bfloat16 bits)
    topk_ids: np.memmap
    topk_logp: np.memmap
    offsets: np.ndarray  # (samples + 1,)
    meta: dict
    hidden: np.memmap | None = None  # (N, hidden) int16 (bfloat16 bits), if built

    @property
    def has_hidden(self) -> bool:
        return self.hidden is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample_kv(self, i: int) -> torch.Tensor:
        """(layers, 2, Hkv, S, D) bfloat16 of sample ``i``."""
        a, b = self.offsets[i], self.offsets[i + 1]
        x = torch.from_numpy(np.array(self.kv[a:b])).view(torch.bfloat16)
        return x.permute(1, 2, 3, 0, 4)

    def sample_hidden(self, i: int) -> torch.Tensor:
        """(S, hidden) bfloat16 of sample ``i``: the target's final hidden states."""
        if self.hidden is None:
            raise ValueError("data: these features hold no hidden states; run the features stage "
                             "with --hidden-input")
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.array(self.hidden[a:b])).view(torch.bfloat16)

    def sample_topk(self, i: int):
        a, b = self.offsets[i], self.offsets[i + 1]
        return (torch.from_numpy(np.asarray(self.topk_ids[a:b], dtype=np.int64)),
                torch.from_numpy(np.asarray(self.topk_logp[a:b], dtype=np.float32)))


def _shapes(model, num_layers, k, total):
    c = model.config
    return {"kv": (total, num_layers, 2, c.num_kv_heads, c.head_dim), "topk": (total, k)}


def _open(path: Path, meta: dict, mode: str) -> Features:
    total = meta["total_tokens"]
    kv_shape = (total, meta["num_layers"], 2, meta["num_kv_heads"], meta["head_dim"])
    k = meta["topk"]
    hidden = None
    hmeta = _hidden_meta(path)
    if (hmeta is not None and hmeta["corpus"] == meta["corpus"] and hmeta.get("dtype") == meta["dtype"]
            and hmeta["done"] == len(meta["offsets"]) - 1):
        hidden = np.memmap(path / "hidden.bin", dtype=np.int16, mode="r", shape=(total, hmeta["hidden_size"]))
    return Features(
        kv=np.memmap(path / "kv.bin", dtype=np.int16, mode=mode, shape=kv_shape),
        topk_ids=np.memmap(path / "topk_ids.bin", dtype=np.int32, mode=mode, shape=(total, k)),
        topk_logp=np.memmap(path / "topk_logp.bin", dtype=np.float16, mode=mode, shape=(total, k)),
        offsets=np.array(meta["offsets"], dtype=np.int64), meta=meta, hidden=hidden)


def _hidden_meta(path: Path) -> dict | None:
    p = Path(path) / "hidden.json"
    return json.loads(p.read_text()) if p.exists() else None


def _length_batches(lengths, start, tokens_per_batch):
    """Chunks of the samples in (length, index) order from position ``start`` of that order:
    ``(order_end, chunk)`` with at most ``tokens_per_batch`` padded tokens (or one sample).

    Similar lengths batch with little padding, and the fixed order lets a pass resume exactly
    from ``done``, a count in that order."""
    n = len(lengths)
    order = sorted(range(n), key=lambda k: (lengths[k], k))
    i = start
    while i < n:
        j, longest = i, 0
        while j < n and (max(longest, lengths[order[j]]) * (j - i + 1) <= tokens_per_batch or j == i):
            longest = max(longest, lengths[order[j]])
            j += 1
        yield j, [order[k] for k in range(i, j)]
        i = j


def _chunk_inputs(model, samples: list[Sample], chunk: list[int]):
    """A causal target pass over the samples ``chunk``, right-padded: ``(ids, pos, causal,
    cache)`` on the model's device, ids (B, S)."""
    S = max(len(samples[k].tokens) for k in chunk)
    ids = torch.zeros(len(chunk), S, dtype=torch.int64)
    for b, k in enumerate(chunk):
        ids[b, : len(samples[k].tokens)] = torch.as_tensor(samples[k].tokens)
    dev = model.device
    B = len(chunk)
    pos = torch.arange(S, device=dev).expand(B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril().expand(B, S, S)
    return ids.to(dev), pos, causal, model.new_cache(B, S)


def build_hidden(model, samples: list[Sample], out_dir, tokens_per_batch: int = 4096,
                 progress: bool = True) -> Features:
    """Add the target's final hidden states (``hidden.bin``) to finished features (resumable).

    A separate pass, so that features made before drafts read hidden states gain them
    without being rebuilt; it runs the target's layers without its LM head.

    Parameters
    ----------
    model : LlamaModel
        The target that made the features, in the same dtype.
    samples : list of Sample
        The samples of the features in ``out_dir``.
    out_dir : path
    tokens_per_batch : int

    Returns
    -------
    Features
        With ``hidden``.
    """
    out = Path(out_dir)
    feats = open_features(out)
    if feats.meta["corpus"] != corpus_digest(samples):
        raise ValueError(f"data: the features in {out} were made from another corpus")
    H = model.config.hidden_size
    lengths = [len(s.tokens) for s in samples]
    total = feats.meta["total_tokens"]
    hmeta = {"corpus": feats.meta["corpus"], "hidden_size": H, "dtype": str(model.dtype), "done": 0}
    old = _hidden_meta(out)
    if old is not None and all(old.get(k) == hmeta[k] for k in ("corpus", "hidden_size", "dtype")):
        hmeta["done"] = old["done"]
    n = len(samples)
    if hmeta["done"] == n:
        return feats
    if hmeta["done"] == 0:  # mark it unfinished before a fresh file (zeros) replaces the old one
        atomic_write(out / "hidden.json", lambda tmp: Path(tmp).write_text(json.dumps(hmeta)))
    hid = np.memmap(out / "hidden.bin", dtype=np.int16, mode="r+" if hmeta["done"] else "w+", shape=(total, H))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, initial=hmeta["done"], desc="hidden", unit="sample")
    for end, chunk in _length_batches(lengths, hmeta["done"], tokens_per_batch):
        ids, pos, causal, cache = _chunk_inputs(model, samples, chunk)
        none = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)  # no LM head rows
        with torch.no_grad():
            _, y = model.forward(ids, pos, causal, cache, logits_rows=none, return_hidden=True)
        y = y.to("cpu", torch.bfloat16).view(torch.int16).numpy()
        for b, k in enumerate(chunk):
            a = int(feats.offsets[k])
            hid[a:a + lengths[k]] = y[b, : lengths[k]]
        hid.flush()
        hmeta["done"] = end
        atomic_write(out / "hidden.json", lambda tmp: Path(tmp).write_text(json.dumps(hmeta)))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return open_features(out)


def build_features(model, samples: list[Sample], out_dir, num_layers: int = 1, topk: int = 16,
                   tokens_per_batch: int = 4096, progress: bool = True) -> Features:
    """Run the target over the corpus and store what the draft trains on (resumable).

    Parameters
    ----------
    model : LlamaModel
        The frozen target, in the dtype the draft will decode with.
    samples : list of Sample
    out_dir : path
    num_layers : int
        Draft layers: the K/V of the target's last ``num_layers`` layers are kept.
    topk : int
        Teacher log-probabilities kept per position.
    tokens_per_batch : int
        Padded tokens per target forward.

    Returns
    -------
    Features
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    lengths = [len(s.tokens) for s in samples]
    meta = {"version": 2, "corpus": corpus_digest(samples), "num_layers": num_layers, "topk": topk,
            "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "dtype": str(model.dtype),
            "target_layers": list(range(c.num_layers - num_layers, c.num_layers)),
            "total_tokens": int(sum(lengths)), "offsets": np.cumsum([0] + lengths).tolist(), "done": 0}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        same = all(old.get(k) == meta[k] for k in ("version", "corpus", "num_layers", "topk", "dtype", "total_tokens"))
        if same:
            meta["done"] = old["done"]
    mode = "r+" if meta["done"] > 0 else "w+"
    feats = _open(out, meta, mode)
    if meta["done"] == 0:
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    n = len(samples)
    bar = None
    if progress and meta["done"] < n:
        from tqdm.auto import tqdm
        bar = tqdm(total=meta["total_tokens"], initial=int(meta["offsets"][meta["done"]]),
                   desc="features", unit="tok", unit_scale=True)
    t0, made = time.perf_counter(), 0
    layers = meta["target_layers"]
    for end, chunk in _length_batches(lengths, meta["done"], tokens_per_batch):
        ids, pos, causal, cache = _chunk_inputs(model, samples, chunk)
        B, S = ids.shape
        rows = torch.zeros(B, S, dtype=torch.bool)  # teacher rows: q predicts response token q + 1
        for b, k in enumerate(chunk):
            s = samples[k]
            rows[b, max(s.prompt_len - 1, 0): len(s.tokens) - 1] = True
        rows = rows.to(model.device)
        with torch.no_grad():
            logits = model.forward(ids, pos, causal, cache, logits_rows=rows)
            top, top_id = logits.topk(min(topk, logits.shape[-1]), dim=-1)
            top_lp = top - torch.logsumexp(logits, -1, keepdim=True)
        pad = topk - top_id.shape[-1]  # a vocabulary smaller than k: pad with id -1
        top_id = torch.nn.functional.pad(top_id, (0, pad), value=-1)
        top_lp = torch.nn.functional.pad(top_lp, (0, pad), value=float("-inf"))
        top_id, top_lp = top_id.cpu().numpy().astype(np.int32), top_lp.cpu().float().numpy().astype(np.float16)
        rows_cpu = rows.cpu()
        done_rows = 0
        for b, k in enumerate(chunk):
            s = samples[k]
            L, a = len(s.tokens), int(meta["offsets"][k])
            kv = torch.stack([cache.kv[l, :, b, :, :L] for l in layers])  # (layers, 2, Hkv, L, D)
            feats.kv[a:a + L] = kv.permute(3, 0, 1, 2, 4).contiguous().to("cpu", torch.bfloat16).view(torch.int16).numpy()
            r = rows_cpu[b, :L].numpy()
            ids_b = np.full((L, topk), -1, dtype=np.int32)
            lp_b = np.zeros((L, topk), dtype=np.float16)
            m = int(r.sum())
            ids_b[r], lp_b[r] = top_id[done_rows:done_rows + m], top_lp[done_rows:done_rows + m]
            done_rows += m
            feats.topk_ids[a:a + L] = ids_b
            feats.topk_logp[a:a + L] = lp_b
        for arr in (feats.kv, feats.topk_ids, feats.topk_logp):
            arr.flush()
        meta["done"] = end
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        size = sum(lengths[k] for k in chunk)
        made += size
        if bar is not None:
            bar.update(size)
            bar.set_postfix(tok_s=f"{made / (time.perf_counter() - t0):.0f}")
    if bar is not None:
        bar.close()
    return open_features(out)


def open_features(path) -> Features:
    """Open finished features read-only.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``data``, if missing or unfinished.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"data: no features in {path}")
    meta = json.loads(meta_path.read_text())
    if meta["done"] != len(meta["offsets"]) - 1:
        raise ValueError(f"data: the features in {path} are unfinished ({meta['done']} of "
                         f"{len(meta['offsets']) - 1} samples); run the features stage again")
    return _open(path, meta, "r")


class FeatureSet:
    """Several :class:`Features` (one per corpus shard) read as one, samples in shard order."""

    def __init__(self, parts: list[Features]):
        if not parts:
            raise ValueError("data: no features")
        keys = ("num_layers", "num_kv_heads", "head_dim", "topk", "dtype")
        for p in parts[1:]:
            if any(p.meta[k] != parts[0].meta[k] for k in keys):
                raise ValueError("data: the feature shards were made with different settings")
        self.parts = parts
        self.meta = {k: parts[0].meta[k] for k in keys}
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], i - int(self.starts[k])

    def sample_kv(self, i: int) -> torch.Tensor:
        part, j = self._locate(i)
        return part.sample_kv(j)

    def sample_topk(self, i: int):
        part, j = self._locate(i)
        return part.sample_topk(j)

    def sample_hidden(self, i: int) -> torch.Tensor:
        part, j = self._locate(i)
        return part.sample_hidden(j)

    @property
    def has_hidden(self) -> bool:
        """Whether every shard holds the target's hidden states."""
        return all(p.hidden is not None for p in self.parts)


def build_shard_features(model, corpus_dir, out_dir, shards=None, progress: bool = True, hidden: bool = False,
                         **kw) -> FeatureSet:
    """:func:`build_features` for each corpus shard (``out_dir/shard-XXXXX/``), so that a corpus
    can grow and features follow shard by shard. ``shards`` limits it to the first ``shards``;
    ``hidden`` adds the target's hidden states (:func:`build_hidden`) where they are missing."""
    from .corpus import corpus_shards, load_corpus_shard

    files = corpus_shards(corpus_dir)[:shards]
    parts = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(files), desc="features", unit="shard")
    for f in files:
        sub = Path(out_dir) / f.stem
        try:
            part = open_features(sub)
        except (FileNotFoundError, ValueError):
            part = build_features(model, load_corpus_shard(f), sub, progress=False, **kw)
        if hidden and part.hidden is None:
            part = build_hidden(model, load_corpus_shard(f), sub, kw.get("tokens_per_batch", 4096), progress=False)
        parts.append(part)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return FeatureSet(parts)


def open_shard_features(corpus_dir, out_dir, shards=None) -> FeatureSet:
    """The features of the first ``shards`` corpus shards (all by default; or a slice of the
    shards, as for :func:`~glide.train.corpus.load_corpus`), each finished."""
    from .corpus import corpus_shards, shard_range

    return FeatureSet([open_features(Path(out_dir) / f.stem)
                       for f in corpus_shards(corpus_dir)[shard_range(shards)]])
