"""A CPU hog for measuring under load: ``n`` processes that each keep one core busy.

    with cpu_hog(1):
        ...  # timed work shares the machine with one busy core

Used by ``python -m bench.ar_vs_hf --hog N`` to show how each method degrades on a busy
machine (a test run, a compile, another service), which is where an idle-machine benchmark
misleads.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

__all__ = ["cpu_hog"]

_SPIN = "while True:\n    pass\n"


@contextlib.contextmanager
def cpu_hog(n: int):
    """Run ``n`` busy-looping Python processes for the duration of the block.

    Parameters
    ----------
    n : int
        Number of processes (each keeps about one core busy); ``0`` runs none.

    Raises
    ------
    ValueError
        If ``n`` is negative.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"hog must be an integer >= 0, got {n!r}")
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
