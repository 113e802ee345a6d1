"""Fused Triton kernels for GliDe drafting and CaPE tree verification.

Import path: ``from glide.kernels import tree_attention``. The package is ``glide.kernels``, not
a top-level ``kernels``, because transformers probes for a distribution called ``kernels``.
Set ``TRITON_INTERPRET=1`` before importing this package to run the kernels on CPU tensors.
The same kernels are torch custom ops, ``torch.ops.glide.*``, for ``torch.compile`` and CUDA
graphs: ``from glide.kernels import ops`` registers them (not done on import of this package,
whose own decoding never calls them).
"""

from . import reference
from ._dispatch import interpreter_enabled, use_triton
from .attention import attention_config, cross_attention, tree_attention
from .activation import silu_mul
from .compact import compact_kv
from .norm import add_rms_norm
from .rope import rope_store
from .topk import cape_topk

__all__ = [
    "tree_attention",
    "cross_attention",
    "cape_topk",
    "compact_kv",
    "rope_store",
    "add_rms_norm",
    "silu_mul",
    "attention_config",
    "reference",
    "interpreter_enabled",
    "use_triton",
]
