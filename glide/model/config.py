"""``ModelConfig``: the shape and constants of a Llama-family decoder, read from a transformers config.

Only architectures whose maths is exactly Llama's are accepted: ``llama``, and ``mistral`` when
its sliding window never applies (absent, or at least ``max_position_embeddings``). Anything else
raises ``ValueError`` naming ``model``, so that a wrong checkpoint fails at load time instead of
producing plausible garbage.

RoPE scaling follows the config's ``rope_type``. The inverse frequencies and the attention scaling
of every static variant (``linear``, ``llama3``, ``yarn``, ...) come from transformers' own
``ROPE_INIT_FUNCTIONS``, so they match transformers bit for bit. ``dynamic`` (dynamic NTK) is
plain RoPE for every position below ``max_position_embeddings``: transformers only rescales once a
sequence grows past that, and our position tables stop there, so it is treated as its static form.
``longrope`` switches frequency sets with the sequence length and is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_STATIC_ROPE_TYPES = ("default", "dynamic")  # computed here; everything else from transformers
_REJECTED_ROPE_TYPES = ("longrope",)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and constants of a Llama-family decoder.

    Attributes
    ----------
    vocab_size, hidden_size, intermediate_size, num_layers : int
    num_heads, num_kv_heads, head_dim : int
        Query heads, key/value heads (GQA when fewer than ``num_heads``) and the per-head size.
    rms_norm_eps : float
    rope_theta : float
    rope_type : str
        ``"default"``, ``"linear"``, ``"llama3"``, ``"yarn"``, ... as the transformers config says.
    rope_scaling : dict or None
        The config's RoPE parameters beyond ``rope_theta`` (kept for reference).
    rope_inv_freq : tuple of float or None
        ``head_dim // 2`` inverse frequencies; ``None`` means plain RoPE from ``rope_theta``.
    rope_attention_scaling : float
        Factor applied to cos and sin (YaRN's attention temperature; 1 otherwise).
    max_position_embeddings : int
    tie_word_embeddings : bool
    bos_token_id : int or None
    eos_token_ids : tuple of int
        Every end-of-sequence id (a config's ``eos_token_id`` may be a list).
    model_type : str
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict | None = field(default=None, compare=False)
    rope_inv_freq: tuple[float, ...] | None = None
    rope_attention_scaling: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_inv_freq is not None and len(self.rope_inv_freq) != self.head_dim // 2:
            raise ValueError(
                f"model config: rope_inv_freq must have head_dim // 2 = {self.head_dim // 2} "
                f"entries, got {len(self.rope_inv_freq)} (partial rotary embeddings are not supported)"
            )

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id, or ``None``."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies and attention scaling of the rotary embedding.

        Returns
        -------
        inv_freq : torch.Tensor, shape (head_dim // 2,), float32
        attention_scaling : float
        """
        if self.rope_inv_freq is not None:
            return torch.tensor(self.rope_inv_freq, dtype=torch.float32), self.rope_attention_scaling
        return _default_inv_freq(self.rope_theta, self.head_dim), self.rope_attention_scaling

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """Read a transformers ``PretrainedConfig`` of a Llama-family model.

        Raises
        ------
        ValueError
            Naming ``model``, if the architecture is not Llama-family or uses a feature this
            runner does not implement (biases, another activation, a sliding window, longrope).
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model: architecture {model_type!r} is not supported; this runner implements "
                f"the Llama family {SUPPORTED_MODEL_TYPES}"
            )
        max_pos = int(hf_config.max_position_embeddings)
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and window < max_pos:
            raise ValueError(
                f"model: {model_type} with sliding_window={window} < max_position_embeddings="
                f"{max_pos} is not supported (its attention differs from Llama's)"
            )
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model: hidden_act must be 'silu' (SwiGLU), got {act!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(hf_config, flag, False):
                raise ValueError(f"model: {flag}=True is not supported")

        num_heads = int(hf_config.num_attention_heads)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = _rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in _REJECTED_ROPE_TYPES:
            raise ValueError(
                f"model: rope_type {rope_type!r} changes frequencies with the sequence length; "
                "it is not supported"
            )
        if rope_type in _STATIC_ROPE_TYPES:
            inv_freq, scaling = None, 1.0
        else:
            inv_freq, scaling = _hf_rope_frequencies(hf_config, rope_type)
        extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}

        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        bos = getattr(hf_config, "bos_token_id", None)
        return cls(
            vocab_size=int(hf_config.vocab_size),
            hidden_size=int(hf_config.hidden_size),
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope_type=rope_type,
            rope_scaling=extra or None,
            rope_inv_freq=inv_freq,
            rope_attention_scaling=float(scaling),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            model_type=model_type,
        )


def _default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    # Same expression as transformers' default RoPE, so float32 tables agree bit for bit.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _rope_parameters(hf_config) -> dict:
    """RoPE parameters as one dict holding ``rope_theta`` (transformers 5 and 4.x layouts)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:  # transformers < 5: rope_scaling beside rope_theta
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    else:
        params = dict(params)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def _hf_rope_frequencies(hf_config, rope_type: str) -> tuple[tuple[float, ...], float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"model: rope_type {rope_type!r} is unknown to transformers "
            f"(known: {sorted(ROPE_INIT_FUNCTIONS)})"
        )
    try:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model: invalid {rope_type!r} RoPE parameters: {exc}") from exc
    # float32 -> Python float -> float32 is exact, so the tables stay bit-identical.
    return tuple(float(x) for x in inv_freq.float()), float(scaling)
