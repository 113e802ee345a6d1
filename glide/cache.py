"""Where glide keeps what it prepares once per machine: converted model weights and measured
device facts (the dynamic tree's verify-cost curve).

``$GLIDE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/glide``, else ``~/.cache/glide``. Everything
in it can be deleted at any time; it is rebuilt on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder (not created here).

    Returns
    -------
    pathlib.Path
    """
    if os.environ.get("GLIDE_CACHE_DIR"):
        return Path(os.environ["GLIDE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glide"
