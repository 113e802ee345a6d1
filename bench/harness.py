"""The one timing harness behind every benchmark in ``bench/``.

- On CUDA, :func:`time_fn` calls ``triton.testing.do_bench`` (which warms up, compiles and
  flushes L2 outside the timed region) and reports the median with the 20th and 80th
  percentiles.
- On CPU, it runs a plain ``perf_counter`` loop with the same statistics. CPU rows time the
  PyTorch reference or fallback path, never Triton's interpreter, whose speed means nothing.

Every timed call draws the next of several pre-allocated input copies, so that a kernel does
not find its inputs already in cache. :func:`copy_bandwidth` measures a large copy on the
same device in the same run; rows report achieved GB/s against it.

Results are data: :func:`write_results` writes one JSON file per device and sweep under
``<root>/<device-slug>/<sweep>.json`` and overwrites it on each run. The scripts' ``--results-dir``
picks the root: ``profiles/`` (the committed results) by default; ``make bench`` passes
``runs/bench`` (git-ignored), ``make bench-publish`` ``profiles``.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO_ROOT / "profiles"
QUANTILES = (0.5, 0.2, 0.8)

# Fields every kernel-benchmark row carries; tests check a results file against this list.
ROW_FIELDS = (
    "kernel",
    "impl",
    "status",
    "dtype",
    "shape",
    "config",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "bytes",
    "gbps",
    "copy_gbps",
    "frac_copy",
    "git_sha",
    "device",
    "device_slug",
    "torch",
    "triton",
    "transformers",
    "sweep",
)


@dataclass(frozen=True)
class Timing:
    """Time per call in milliseconds: median, 20th and 80th percentiles over ``reps`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def git_sha(short: bool = False) -> str:
    """The repository's HEAD commit, with ``-dirty`` appended when ``glide/`` has uncommitted
    changes (the code being timed)."""
    try:
        cmd = ["git", "rev-parse"] + (["--short"] if short else []) + ["HEAD"]
        sha = subprocess.run(
            cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "glide"], cwd=REPO_ROOT
        ).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), falling back to ``platform``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable device name: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_name()} ({os.cpu_count()} cores, {threads} torch threads)"


def slugify(text: str) -> str:
    """Lower-case ``text`` and keep ``[a-z0-9]`` runs joined by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """Directory name under ``profiles/`` for ``device``, e.g. ``nvidia-h100-80gb-hbm3`` or
    ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return slugify(f"cpu {cpu_name()} {os.cpu_count()}c")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing or broken optional library is just "absent"
        return None
    return getattr(mod, "__version__", None)


def environment(device: torch.device, sweep: str) -> dict[str, Any]:
    """Fields shared by every row of one run: sha, device, library versions, sweep name."""
    return {
        "git_sha": git_sha(),
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sweep": sweep,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def rotation(inputs: Sequence[Any]) -> Callable[[], Any]:
    """A zero-argument function returning the next item of ``inputs``, cycling."""
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one input copy, got an empty sequence")
    it = itertools.cycle(inputs)
    return lambda: next(it)


def num_copies(bytes_per_copy: int, device: torch.device, budget_bytes: int = 1 << 30) -> int:
    """How many input copies to rotate through so that they overflow the last-level cache.

    Aims for twice the cache size (50 MB L2 on an H100, 64 MB assumed for CPUs), at least 2
    copies and at most 32, and never more than ``budget_bytes`` in total.
    """
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be positive, got {bytes_per_copy}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cache = int(getattr(props, "L2_cache_size", 50 << 20))
    else:
        cache = 64 << 20
    want = math.ceil(2 * cache / bytes_per_copy)
    fit = max(1, budget_bytes // bytes_per_copy)
    return int(max(1, min(max(2, want), 32, fit)))


def _quantiles(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_fn(
    fn: Callable[[Any], Any],
    inputs: Sequence[Any],
    device: torch.device,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> Timing:
    """Time ``fn(x)`` with ``x`` drawn in turn from the pre-allocated ``inputs``.

    Parameters
    ----------
    fn : callable
        Called as ``fn(x)`` for one input copy ``x``; its result is discarded.
    inputs : sequence
        Pre-allocated input copies (see :func:`num_copies`), cycled through.
    device : torch.device
        CUDA uses ``triton.testing.do_bench``; anything else a host timer loop.
    warmup_ms, rep_ms : float
        Time spent warming up (compilation included) and measuring.
    min_reps, max_reps : int
        Bounds on the number of timed calls of the CPU loop.

    Returns
    -------
    Timing
        Median, 20th and 80th percentile milliseconds per call.
    """
    nxt = rotation(inputs)
    if device.type == "cuda":
        import triton.testing

        run = lambda: fn(nxt())  # noqa: E731
        med, p20, p80 = triton.testing.do_bench(
            run, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)
        )
        # do_bench picks its own rep count from an estimate; report the estimate.
        return Timing(float(med), float(p20), float(p80), reps=-1)

    # CPU: warm up for warmup_ms (at least one call), then time each call separately.
    start = time.perf_counter()
    fn(nxt())
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn(nxt())
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (
        len(samples) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms
    ):
        x = nxt()
        t0 = time.perf_counter()
        fn(x)
        samples.append((time.perf_counter() - t0) * 1e3)
    med, p20, p80 = _quantiles(samples)
    return Timing(med, p20, p80, reps=len(samples))


def copy_bandwidth(device: torch.device, nbytes: int | None = None, **timing_kw) -> float:
    """Achieved GB/s of copying a large tensor on ``device`` (read + write counted).

    CUDA times ``x.clone()`` (the caching allocator makes the allocation free); the CPU copies
    into a pre-allocated tensor instead, because there a fresh 128 MiB ``clone`` mostly times
    page faults. Defaults to 1 GiB on CUDA and 128 MiB on CPU; two sources are rotated.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    srcs = [torch.ones(n, dtype=torch.float32, device=device) for _ in range(2)]
    if device.type == "cuda":
        t = time_fn(lambda x: x.clone(), srcs, device, **timing_kw)
    else:
        dst = torch.empty(n, dtype=torch.float32, device=device)
        t = time_fn(dst.copy_, srcs, device, **timing_kw)
    return gbps(2 * n * 4, t.median_ms)


def gbps(nbytes: int, ms: float | None) -> float | None:
    """``nbytes`` moved in ``ms`` milliseconds, in GB/s (1e9 bytes); None without a time."""
    if ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def timing_fields(t: Timing | None, nbytes: int, copy_gbps: float | None) -> dict[str, Any]:
    """The timing columns of a row: ms quantiles, bytes, GB/s and its fraction of copy GB/s."""
    if t is None:
        return dict(median_ms=None, p20_ms=None, p80_ms=None, reps=None, bytes=nbytes,
                    gbps=None, copy_gbps=copy_gbps, frac_copy=None)
    bw = gbps(nbytes, t.median_ms)
    frac = bw / copy_gbps if (bw is not None and copy_gbps) else None
    return dict(asdict(t), bytes=nbytes, gbps=bw, copy_gbps=copy_gbps, frac_copy=frac)


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def results_path(device_slug_: str, sweep: str, root: str | Path | None = None) -> Path:
    """``profiles/<device-slug>/<sweep>.json`` (under ``root`` when given)."""
    return Path(root or PROFILES_DIR) / device_slug_ / f"{slugify(sweep)}.json"


def write_results(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write ``{"meta": meta, "rows": rows}`` to ``path``, replacing any earlier run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_results(path: Path) -> dict[str, Any]:
    """Read a results file written by :func:`write_results`.

    Raises
    ------
    ValueError
        If the file lacks ``meta`` or ``rows``.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        raise ValueError(f"{path}: expected an object with 'meta' and 'rows'")
    return data


def missing_fields(row: dict[str, Any], fields: Sequence[str] = ROW_FIELDS) -> list[str]:
    """Names in ``fields`` that ``row`` lacks."""
    return [f for f in fields if f not in row]


def decode_all(target, prompts, batch_size: int, make_draft, max_new_tokens: int, temperature: float = 0.0):
    """Decode ``prompts`` (token-id lists) in batches of ``batch_size`` through
    :func:`glide.speculative.engine.generate_ids`, a fresh ``make_draft()`` per batch (``None``
    for ``ar``), and total what the draft benchmarks report.

    Returns
    -------
    dict
        ``new`` (tokens emitted after the prefill's), ``forwards`` (target forwards after the
        prefill), ``sizes`` (the drafts' chosen tree sizes, where they keep them), ``seconds``
        (wall time of the ``generate_ids`` calls, prefill included).
    """
    from glide.speculative.engine import generate_ids

    new = forwards = 0
    sizes, seconds = [], 0.0
    for i in range(0, len(prompts), batch_size):
        draft = make_draft()
        t0 = time.perf_counter()
        res = generate_ids(target, prompts[i:i + batch_size], draft, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=0)
        seconds += time.perf_counter() - t0
        new += sum(len(r.output_ids) - 1 for r in res)
        forwards += sum(r.target_forwards for r in res)
        sizes += getattr(draft, "sizes", [])
    return dict(new=new, forwards=forwards, sizes=sizes, seconds=seconds)
