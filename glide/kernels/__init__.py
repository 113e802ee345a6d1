"""Fused Triton kernels for GliDe drafting and CaPE tree verification.

Import path: ``from glide.kernels import tree_attention``. The package is ``glide.kernels``, not
a top-level ``kernels``, because transformers probes for a distribution called ``kernels``.
"""

from . import reference
from ._dispatch import interpreter_enabled, use_triton

__all__ = ["reference", "interpreter_enabled", "use_triton"]

# The launchers register themselves below as they land.
try:  # pragma: no cover - filled in by the kernel modules
    from .attention import cross_attention, tree_attention  # noqa: F401

    __all__ += ["tree_attention", "cross_attention"]
except ImportError:
    pass
try:  # pragma: no cover
    from .topk import cape_topk  # noqa: F401

    __all__ += ["cape_topk"]
except ImportError:
    pass
try:  # pragma: no cover
    from .compact import compact_kv  # noqa: F401

    __all__ += ["compact_kv"]
except ImportError:
    pass
