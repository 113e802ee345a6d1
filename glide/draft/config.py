"""``DraftConfig``: the shape of a GliDe draft, and the fingerprint of the target it was trained for."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from glide.model.config import ModelConfig

__all__ = ["DraftConfig", "target_fingerprint", "check_fingerprint"]

_PROBE_ROWS = 8  # embedding rows and weight rows summarised in a fingerprint


@dataclass(frozen=True)
class DraftConfig:
    """Shape of a GliDe draft.

    Attributes
    ----------
    target : ModelConfig
        The target's config. The draft's self-attention and MLP take the target's shapes (heads,
        head_dim, intermediate size), its RoPE and its hidden size (the embeddings are shared).
    num_layers : int
        Draft layers ``N``; layer ``i`` cross-attends to target layer ``L - N + i``.
    cross_attention : bool
        ``False`` gives the vanilla ablation: the same layers without cross-attention.
    draft_vocab : tuple of int, optional
        Target token ids the draft's LM head covers (rows of the shared head), most frequent
        first; ``None`` covers the whole vocabulary.
    own_embeddings : bool
        The draft has its own embedding and head (trained, saved), not the target's.
    hidden_input : bool
        Every draft token's input also carries the target's final hidden state at the last
        verified position before its step's root (the state that predicted the root), as
        EAGLE feeds its draft; the engine then hands the draft those states.
    fingerprint : dict
        :func:`target_fingerprint` of the target this draft was trained for.
    """

    target: ModelConfig
    num_layers: int = 1
    cross_attention: bool = True
    draft_vocab: tuple[int, ...] | None = None
    own_embeddings: bool = False
    hidden_input: bool = False
    fingerprint: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or not (
                1 <= self.num_layers <= self.target.num_layers):
            raise ValueError(f"draft: num_layers must be an int in [1, {self.target.num_layers}], "
                             f"got {self.num_layers!r}")
        if self.draft_vocab is not None:
            V = self.target.vocab_size
            if len(self.draft_vocab) == 0 or any(not 0 <= t < V for t in self.draft_vocab):
                raise ValueError(f"draft: draft_vocab must hold token ids in [0, {V})")
            if len(set(self.draft_vocab)) != len(self.draft_vocab):
                raise ValueError("draft: draft_vocab holds a token id twice")

    @property
    def vocab_out(self) -> int:
        """Rows of the draft's LM head."""
        return self.target.vocab_size if self.draft_vocab is None else len(self.draft_vocab)

    def target_layer(self, i: int) -> int:
        """The target layer whose K/V draft layer ``i`` reads."""
        return self.target.num_layers - self.num_layers + i

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target"] = dataclasses.asdict(self.target)
        d["draft_vocab"] = None if self.draft_vocab is None else list(self.draft_vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DraftConfig":
        t = dict(d["target"])
        for key in ("rope_inv_freq", "eos_token_ids"):
            if t.get(key) is not None:
                t[key] = tuple(t[key])
        vocab = d.get("draft_vocab")
        return cls(target=ModelConfig(**t), num_layers=int(d["num_layers"]),
                   cross_attention=bool(d["cross_attention"]),
                   draft_vocab=None if vocab is None else tuple(int(x) for x in vocab),
                   own_embeddings=bool(d.get("own_embeddings", False)),
                   hidden_input=bool(d.get("hidden_input", False)),
                   fingerprint=dict(d.get("fingerprint") or {}))


def _row_stats(w: torch.Tensor) -> list[float]:
    rows = w[:_PROBE_ROWS].double()
    return torch.cat([rows.mean(-1), rows.std(-1)]).tolist()  # one device read, not one a value


def target_fingerprint(model) -> dict:
    """Sizes and a few weight statistics of a target (a :class:`LlamaModel`).

    The statistics (mean and std of the first rows of the embedding and of the last layer's
    q/k/v weight) tell two trained models apart, while the same model loaded in another dtype
    still matches within :func:`check_fingerprint`'s tolerance.
    """
    c = model.config
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
        "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "embed_stats": _row_stats(model.embed_tokens.weight),
        "last_qkv_stats": _row_stats(model.layers[-1].qkv_proj.weight),
    }


def check_fingerprint(expected: dict, model, rtol: float = 0.02) -> None:
    """Raise ValueError naming ``draft`` if ``model`` is not the target in ``expected``."""
    got = target_fingerprint(model)
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if key in expected and expected[key] != got[key]:
            raise ValueError(f"draft: it was trained for a target with {key}={expected[key]}, "
                             f"this target has {got[key]}")
    for key in ("embed_stats", "last_qkv_stats"):
        if key not in expected:
            continue
        a, b = expected[key], got[key]
        scale = max(max(abs(x) for x in a), 1e-12)
        if len(a) != len(b) or any(not math.isclose(x, y, rel_tol=rtol, abs_tol=rtol * scale)
                                   for x, y in zip(a, b)):
            raise ValueError("draft: it was trained for another target (its weight fingerprint "
                             f"differs in {key}); train a draft for this model")
