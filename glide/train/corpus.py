"""The self-distilled corpus: the target answers the training prompts itself.

The target writes every response through our runner with batched decoding, so the corpus
follows the target's own distribution (which is what the draft must predict). Prompts are
split by :func:`glide.train.prompts.is_heldout`; only training prompts are ever answered here.

On disk a corpus is a folder of shards, each written atomically (temporary file, then rename),
so an interrupted run resumes at the first missing shard::

    corpus/
      meta.json               the settings; a resumed run must match them, except that
                              ``max_prompts`` may grow from a multiple of ``shard_size``
      shard-00000.npz ...     one per `shard_size` prompts

A shard holds ``tokens`` (uint16 or int32: prompt then response, concatenated over samples),
``offsets`` (int64, samples + 1), ``prompt_lens`` (int32), ``temperature`` (float32) and
``ids`` (the source prompt ids, unicode).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .prompts import SourcePrompt, is_heldout

__all__ = ["CorpusSettings", "Sample", "build_corpus", "load_corpus", "load_corpus_shard", "corpus_shards",
           "planned_prompts", "shard_range", "atomic_write"]


@dataclass
class CorpusSettings:
    """How a corpus is generated (stored in ``meta.json``).

    Attributes
    ----------
    max_prompts : int
        Training prompts to answer (in source order, after dropping held-out and long ones).
    max_prompt_tokens : int
        Longer prompts (after the chat template) are skipped.
    max_new_tokens : int
        Response length cap.
    temperatures : list of float
        Prompt ``i`` is answered at ``temperatures[i % len]``: by default half greedy, half
        sampled at 1, so the draft sees both kinds of context.
    batch_size : int
    shard_size : int
        Prompts per shard (a multiple of ``batch_size`` keeps batches full).
    seed : int
    turns : {"first", "all"}
        Which user turns of the source are prompts (:func:`~glide.train.prompts.read_prompt_source`);
        a corpus made from ``first`` can grow in place with ``all``, whose list starts with the
        same prompts.
    """

    max_prompts: int = 4096
    max_prompt_tokens: int = 384
    max_new_tokens: int = 256
    temperatures: tuple = (0.0, 1.0)
    batch_size: int = 32
    shard_size: int = 128
    seed: int = 0
    turns: str = "first"


@dataclass
class Sample:
    id: str
    tokens: np.ndarray  # prompt then response
    prompt_len: int
    temperature: float


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _select(prompts: list[SourcePrompt], tokenizer, s: CorpusSettings):
    from glide.api import encode_chat

    chosen = []
    for p in prompts:
        if is_heldout(p.id):
            continue
        ids = encode_chat(tokenizer, p.text)
        if len(ids) > s.max_prompt_tokens:
            continue
        chosen.append((p.id, ids))
        if len(chosen) == s.max_prompts:
            break
    return chosen


def _check_continues(old: dict, new: dict, out: Path) -> None:
    """Raise unless a corpus made as ``old`` may be continued as ``new``: the same settings, or
    more prompts over full shards (shard ``k`` then holds the same prompts as before)."""
    a, b = dict(old.get("settings") or {}), dict(new["settings"])
    n_old, n_new = a.pop("max_prompts", None), b.pop("max_prompts")
    t_old, t_new = a.pop("turns", "first"), b.pop("turns")  # corpora made before the setting: first
    if t_old == "all" and t_new == "first":
        raise ValueError(f"turns: the corpus in {out} was made from all user turns; keep --turns all")
    if a != b or old.get("vocab_size") != new["vocab_size"] or not isinstance(n_old, int):
        raise ValueError(f"data: {out} holds a corpus made with other settings ({out / 'meta.json'}); "
                         "use another output folder or delete it")
    if n_new < n_old:
        raise ValueError(f"prompts: the corpus in {out} is made for {n_old} prompts; ask for at least "
                         f"that many (the default), or train on fewer with --shards")
    if n_new > n_old and n_old % b["shard_size"]:
        raise ValueError(f"data: {out} ends in a partial shard ({n_old} prompts); it cannot grow in place")


def _planned(path) -> dict | None:
    """The settings in the ``meta.json`` of the corpus in ``path``; ``None`` without a readable one."""
    try:
        settings = json.loads((Path(path) / "meta.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return settings if isinstance(settings, dict) else None


def planned_prompts(path) -> int | None:
    """The prompts the corpus in ``path`` is made for (its ``meta.json``); ``None`` without one."""
    n = (_planned(path) or {}).get("max_prompts")
    return n if isinstance(n, int) and n > 0 else None


def planned_turns(path) -> str | None:
    """The ``turns`` setting of the corpus in ``path``: ``first`` for one made before the
    setting existed, ``None`` without a corpus."""
    settings = _planned(path)
    t = None if settings is None else settings.get("turns", "first")
    return t if isinstance(t, str) else None


def _save_shard(path: Path, samples: list[Sample], vocab: int) -> None:
    dt = np.uint16 if vocab <= 65536 else np.int32
    tokens = np.concatenate([x.tokens for x in samples]).astype(dt)
    offsets = np.cumsum([0] + [len(x.tokens) for x in samples]).astype(np.int64)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, tokens=tokens, offsets=offsets,
                     prompt_lens=np.array([x.prompt_len for x in samples], dtype=np.int32),
                     temperature=np.array([x.temperature for x in samples], dtype=np.float32),
                     ids=np.array([x.id for x in samples]))

    atomic_write(path, write)


def build_corpus(model, tokenizer, prompts: list[SourcePrompt], out_dir, settings: CorpusSettings,
                 eos_token_ids=(), progress: bool = True) -> Path:
    """Answer the training prompts with the target and write the shards (resumable).

    Parameters
    ----------
    model : LlamaModel
        The target.
    tokenizer : transformers tokenizer
    prompts : list of SourcePrompt
        Held-out ones are dropped here.
    out_dir : path
    settings : CorpusSettings
    eos_token_ids : tuple of int

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    ValueError
        Naming ``data`` if ``out_dir`` holds a corpus made with other settings, or ``prompts``
        if it is made for more prompts than ``settings`` asks for.
    """
    from glide.speculative.engine import generate_ids

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"settings": asdict(settings), "vocab_size": model.config.vocab_size,
            "eos_token_ids": list(eos_token_ids)}
    meta["settings"]["temperatures"] = list(settings.temperatures)
    meta_path = out / "meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old is not None:
        _check_continues(old, meta, out)
    if old != meta:
        atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    chosen = _select(prompts, tokenizer, settings)
    S = settings.shard_size
    shards = [chosen[i:i + S] for i in range(0, len(chosen), S)]
    todo = [k for k in range(len(shards)) if not (out / f"shard-{k:05d}.npz").exists()]
    for k in sorted(set(range(len(shards))) - set(todo))[-1:]:  # the last shard made: same prompts?
        have = [x.id for x in load_corpus_shard(out / f"shard-{k:05d}.npz")]
        if have != [pid for pid, _ in shards[k]]:
            raise ValueError(f"data: shard {k} of {out} holds other prompts than this source and settings "
                             "choose for it; use the source it was made from, or another output folder")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="corpus", unit="shard")
    made = 0
    t0 = time.perf_counter()
    for k in todo:
        samples = []
        for j, (pid, ids) in enumerate(shards[k]):
            i = k * S + j
            samples.append((pid, ids, settings.temperatures[i % len(settings.temperatures)]))
        result = []
        for temp in sorted(set(t for _, _, t in samples)):
            group = [x for x in samples if x[2] == temp]
            group.sort(key=lambda x: len(x[1]))  # similar lengths batch with little padding
            for b in range(0, len(group), settings.batch_size):
                part = group[b:b + settings.batch_size]
                outs = generate_ids(model, [x[1] for x in part], None,
                                    max_new_tokens=settings.max_new_tokens, temperature=temp,
                                    eos_token_ids=eos_token_ids,
                                    seed=settings.seed * 1_000_003 + k * 1009 + b)
                for (pid, ids, t), o in zip(part, outs):
                    made += len(o.output_ids)
                    result.append(Sample(pid, np.array(ids + o.output_ids, dtype=np.int64), len(ids), t))
                if bar is not None:
                    bar.set_postfix(tok_s=f"{made / (time.perf_counter() - t0):.0f}")
        order = {pid: n for n, (pid, _, _) in enumerate(samples)}
        result.sort(key=lambda x: order[x.id])
        _save_shard(out / f"shard-{k:05d}.npz", result, model.config.vocab_size)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def corpus_shards(path) -> list[Path]:
    """The shard files of a corpus folder, in order.

    Raises
    ------
    FileNotFoundError
        Naming ``data``, when there is none.
    """
    files = sorted(Path(path).glob("shard-*.npz"))
    if not files:
        raise FileNotFoundError(f"data: no corpus shards in {path}")
    return files


def load_corpus_shard(f) -> list[Sample]:
    """The samples of one shard file.

    Raises
    ------
    ValueError
        Naming ``data``, for a damaged shard.
    """
    try:
        with np.load(f, allow_pickle=False) as z:
            toks, offs, plens = z["tokens"].astype(np.int64), z["offsets"], z["prompt_lens"]
            temps, ids = z["temperature"], z["ids"]
    except Exception as exc:  # a damaged shard: say which
        raise ValueError(f"data: cannot read corpus shard {f}: {exc}") from None
    return [Sample(str(ids[i]), toks[offs[i]:offs[i + 1]], int(plens[i]), float(temps[i]))
            for i in range(len(plens))]


def shard_range(shards: int | slice | None) -> slice:
    """The shards to use: the first ``shards`` for an int, all for ``None``, or a slice."""
    return shards if isinstance(shards, slice) else slice(shards)


def load_corpus(path, shards: int | slice | None = None) -> list[Sample]:
    """Every sample of the first ``shards`` shards (all by default; or a slice of the shards)
    in ``path``, in order.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``data``.
    """
    return [s for f in corpus_shards(path)[shard_range(shards)] for s in load_corpus_shard(f)]
