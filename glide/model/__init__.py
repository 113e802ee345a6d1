"""Our Llama-family runner: config, static KV cache, model and loading."""

from .cache import KVCache
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .llama import LlamaModel
from .load import default_model_path, from_hf, load_hf, load_model

__all__ = [
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "LlamaModel",
    "default_model_path",
    "load_hf",
    "from_hf",
    "load_model",
]
