"""CPU threads that fit the cores other processes leave free.

Our runner's matmuls are small (a 135M model decodes one token in ~20 ms on 2 cores), so its
OpenMP workers meet at a barrier hundreds of times a token, and they spin while they wait (the
OpenMP default). On a machine where another process holds a core, the worker on that core runs
only in its time slices and the other one spins waiting for it: on the 2-core test machine,
with one core kept busy, `ar` fell from 63 to 19 tokens/s with 2 threads, while 1 thread ran at
44 (float32, 4 prompts x 64 tokens, ``python -m bench.ar_vs_hf --methods ar --hog 1``).
Passive waiting (``OMP_WAIT_POLICY=PASSIVE``) avoids the collapse but costs 40% on an idle
machine (37 tokens/s), so instead :func:`fit_threads` measures, before decoding, how many cores
other processes keep busy and uses the rest. ``glide.api.generate`` starts the measurement
before it loads the model, so the load itself is the window and start-up waits for nothing.

``GLIDE_AUTO_THREADS=0``, or setting ``OMP_NUM_THREADS``, leaves the thread count alone.
"""

from __future__ import annotations

import math
import os
import time

import torch

__all__ = ["cpu_snapshot", "others_busy_cores", "fit_threads"]

_INITIAL_THREADS = torch.get_num_threads()  # torch's own choice (the physical cores) at import


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None without /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_snapshot() -> tuple[int, float, float] | None:
    """Busy jiffies of all CPUs, this process's CPU seconds and the wall clock, now; ``None``
    without ``/proc/stat``. Two snapshots bracket a window for :func:`others_busy_cores`."""
    jiffies = _cpu_jiffies()
    if jiffies is None:
        return None
    own = os.times()
    return jiffies[0], own.user + own.system, time.perf_counter()


def others_busy_cores(window: float = 0.1, since: tuple | None = None) -> float | None:
    """How many cores other processes kept busy during a window.

    Parameters
    ----------
    window : float
        Seconds to watch at least (this process sleeps for what is missing).
    since : tuple, optional
        A :func:`cpu_snapshot` that starts the window, e.g. taken before loading a model: the
        time spent since then counts, so no sleep is needed once it exceeds ``window``.

    Returns
    -------
    float or None
        Busy cores not counting this process (0 on an idle machine, about 1 with one busy-looping
        process), or ``None`` where ``/proc/stat`` is missing (not Linux).
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    first = since if since is not None else cpu_snapshot()
    if first is None:
        return None
    missing = window - (time.perf_counter() - first[2])
    if missing > 0:
        time.sleep(missing)
    second = cpu_snapshot()
    if second is None:
        return None
    busy = (second[0] - first[0]) / tick
    own = second[1] - first[1]
    return max(0.0, (busy - own) / max(second[2] - first[2], 1e-6))


_LAST_FIT: list = [float("-inf"), None]  # (when, threads) of the last measurement


def fit_threads(device: torch.device | str = "cpu", window: float = 0.1, every: float = 10.0,
                since: tuple | None = None) -> int | None:
    """Set torch's CPU threads to the cores that other processes leave free.

    Uses torch's initial thread count (the physical cores) as the most, and at least 1: a core
    counts as free when other processes keep it less than half busy.

    Parameters
    ----------
    device : torch.device or str
        Only ``cpu`` is adjusted.
    window : float
        Seconds spent measuring (:func:`others_busy_cores`).
    every : float
        A call within this many seconds of the last measurement reuses its result.
    since : tuple, optional
        A :func:`cpu_snapshot` taken earlier (before loading the model): the window starts there,
        so the measurement adds no wait once ``window`` seconds have passed.

    Returns
    -------
    int or None
        The thread count set, or ``None`` when nothing was changed (another device, the user
        chose with ``OMP_NUM_THREADS`` or ``GLIDE_AUTO_THREADS=0``, or no ``/proc``).
    """
    if torch.device(device).type != "cpu":
        return None
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("GLIDE_AUTO_THREADS", "1").strip().lower() in (
        "0", "false", "no", "off"
    ):
        return None
    now = time.monotonic()
    if now - _LAST_FIT[0] < every and _LAST_FIT[1] is not None:
        return _LAST_FIT[1]
    busy = others_busy_cores(window, since=since)
    if busy is None:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    most = max(1, min(_INITIAL_THREADS, cores))
    n = max(1, min(most, math.floor(cores - busy + 0.5)))
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _LAST_FIT[:] = [now, n]
    return n
