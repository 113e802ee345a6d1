"""Saving and loading GliDe drafts: ``model.safetensors`` plus ``config.json`` in one folder.

``config.json`` holds the :class:`DraftConfig` (with the target's config and fingerprint) and a
free-form ``card`` (how the draft was trained and what it measured). The embedding and head are
the target's unless the draft has its own, so a one-layer draft for SmolLM2-135M is ~8 MB in
bfloat16. Every failure names ``draft``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .config import DraftConfig, check_fingerprint, target_fingerprint
from .model import GlideDraftModel

__all__ = ["save_draft", "load_draft", "read_draft_config", "default_draft_path", "new_draft_config",
           "cut_head", "WEIGHTS", "CONFIG"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def default_draft_path() -> str:
    """The draft shipped inside the package for the embedded SmolLM2-135M-Instruct."""
    return str(Path(__file__).resolve().parent.parent / "assets" / "smollm2-135m-instruct-glide")


def save_draft(model: GlideDraftModel, path, card: dict | None = None, dtype=torch.bfloat16) -> Path:
    """Write ``model`` to the folder ``path`` (created), atomically per file.

    Parameters
    ----------
    model : GlideDraftModel
    path : str or os.PathLike
    card : dict, optional
        Training facts to keep beside the weights (data, steps, time, loss, acceptance).
    dtype : torch.dtype
        Storage dtype of the weights.
    """
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    return _write(path, tensors, model.config, card or {})


def _write(path, tensors: dict, config: DraftConfig, card: dict) -> Path:
    """A draft folder: the weights, then the config and card, each file written atomically."""
    from safetensors.torch import save_file

    from glide.train.corpus import atomic_write

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    os.chmod(out / WEIGHTS, 0o644)  # readable by everyone, like the package it may ship in
    meta = {"format": "glide-draft", "version": 1, "config": config.to_dict(), "card": card}
    atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return out


def _folder(path) -> Path:
    """The draft folder that ``path`` names (a file in it names the folder)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"draft: path {str(p)!r} does not exist")
    return p.parent if p.is_file() else p


def read_draft_config(path) -> tuple[DraftConfig, dict]:
    """The :class:`DraftConfig` and card stored in a draft folder.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``draft``.
    """
    p = _folder(path)
    cfg = p / CONFIG
    if not cfg.is_file() or not (p / WEIGHTS).is_file():
        raise ValueError(f"draft: {str(p)!r} is not a GliDe draft (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
        if meta.get("format") != "glide-draft":
            raise ValueError(f"format is {meta.get('format')!r}, not 'glide-draft'")
        return DraftConfig.from_dict(meta["config"]), meta.get("card", {})
    except (ValueError, KeyError, TypeError) as exc:
        msg = str(exc)
        if msg.startswith("draft: "):
            msg = msg[len("draft: "):]
        raise ValueError(f"draft: cannot read {cfg}: {msg}") from None


def load_draft(path, target) -> GlideDraftModel:
    """Load a draft for ``target`` (a :class:`LlamaModel`): its dtype and device, attached.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``draft``: a missing or corrupt file, or a draft trained for another target.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, _ = read_draft_config(path)
    p = _folder(path)
    check_fingerprint(config.fingerprint, target)
    if config.target.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft: vocab_size {config.target.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}")
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"draft: cannot read {p / WEIGHTS}: {exc}") from None
    model = GlideDraftModel(config, dtype=target.dtype, device=target.device, init_std=None)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"draft: {p / WEIGHTS} does not match its config "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if v.shape != want[k].shape:
            raise ValueError(f"draft: {k} has shape {tuple(v.shape)} in {p / WEIGHTS}, "
                             f"expected {tuple(want[k].shape)}")
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"draft: {k} in {p / WEIGHTS} holds NaN or inf")
    model.load_state_dict(state)
    model.requires_grad_(False)
    model.attn_backend = getattr(target, "attn_backend", "auto")
    return model.attach(target).eval()


def new_draft_config(target, num_layers=1, cross_attention=True, draft_vocab=None,
                     own_embeddings=False, hidden_input=False) -> DraftConfig:
    """A :class:`DraftConfig` for ``target``, with its fingerprint."""
    return DraftConfig(target=target.config, num_layers=num_layers, cross_attention=cross_attention,
                       draft_vocab=None if draft_vocab is None else tuple(int(x) for x in draft_vocab),
                       own_embeddings=own_embeddings, hidden_input=hidden_input,
                       fingerprint=target_fingerprint(target))


def cut_head(src, dst, rows: int) -> Path:
    """Copy the draft in ``src`` to ``dst`` with its head cut to its ``rows`` most frequent tokens.

    A draft's ``draft_vocab`` lists its head's tokens most frequent first, so its first ``rows``
    entries are the tokens a shorter head keeps; the layers are unchanged (a shared head is the
    target's rows; a draft's own head loses its last rows). Speculative decoding stays exact: a
    token outside the head is never proposed, and the target's verification emits it when due.
    A ``calibration.json`` is not carried over: the cut draft is accepted differently, so
    calibrate it anew (``glide train-draft --stage calibrate --draft DST``).

    Parameters
    ----------
    src, dst : str or os.PathLike
        Draft folders; ``dst`` is created (or overwritten).
    rows : int
        ``1 <= rows <`` the current head's rows.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    ValueError
        Naming ``rows`` (out of range, or a draft whose head covers the whole vocabulary and so
        carries no frequency order), or ``draft`` for an unreadable ``src``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, card = read_draft_config(src)
    p = _folder(src)
    vocab = config.draft_vocab
    if vocab is None:
        raise ValueError("rows: the draft's head covers the whole vocabulary, in id order, not by frequency; "
                         "there is no most-frequent subset to keep")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows < len(vocab):
        raise ValueError(f"rows: must be an int in [1, {len(vocab)}), got {rows!r}")
    try:
        state = load_file(str(p / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"draft: cannot read {p / WEIGHTS}: {exc}") from None
    if config.own_embeddings and "lm_head.weight" in state:
        state["lm_head.weight"] = state["lm_head.weight"][:rows].contiguous()
    new = dataclasses.replace(config, draft_vocab=vocab[:rows])
    return _write(dst, state, new, {**card, "head_cut": {"from_rows": len(vocab), "rows": rows}})
