"""End-to-end tokens/s: methods x batch sizes x max_new_tokens over a fixed prompt set.

Run ``python -m bench.e2e`` (sweep ``e2e_gpu`` on CUDA, ``e2e_cpu`` otherwise) or
``python -m bench.e2e --sweep bench/sweeps/my_e2e.json``. Everything goes through
:func:`glide.api.generate`. A method that raises ``NotImplementedError`` is recorded as
``skipped`` with its message. Rows go to ``profiles/<device-slug>/e2e.json``.

Each row aggregates one ``(method, batch_size, max_new_tokens)`` run over the prompts:

- ``decode_tokens_per_s``: new tokens over decode time. ``generate`` reports for every prompt
  the decode wall time of the batch it ran in (prefill excluded), so a batch's time is the
  largest ``seconds`` of its rows, and the run's time is the sum over batches.
- ``wall_tokens_per_s``: new tokens over the wall time of the whole ``generate`` call
  (tokenization and prefill included, model loading and the warm-up call excluded).
- ``mean_accepted``: tokens per target forward after the prefill, pooled over prompts
  (``sum(new_tokens - 1) / sum(target_forwards)``, the API's per-prompt definition).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import harness

E2E_ROW_FIELDS = (
    "method", "batch_size", "max_new_tokens", "status", "num_prompts", "new_tokens",
    "target_forwards", "mean_accepted", "decode_seconds", "decode_tokens_per_s",
    "wall_seconds", "wall_tokens_per_s",
)


def batch_seconds(rows: Sequence[dict], batch_size: int) -> list[float]:
    """Decode seconds of each batch: the largest ``seconds`` among its consecutive rows.

    Raises
    ------
    ValueError
        If ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [max(float(r["seconds"]) for r in rows[i:i + batch_size])
            for i in range(0, len(rows), batch_size)]


def aggregate(rows: Sequence[dict], *, method: str, batch_size: int, max_new_tokens: int,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """One result row from the per-prompt rows of a :func:`glide.api.generate` call.

    Parameters
    ----------
    rows : sequence of dict
        ``generate``'s rows, in prompt order; each has ``new_tokens``, ``target_forwards``
        and ``seconds``.
    method : str
    batch_size, max_new_tokens : int
        The arguments of the call.
    wall_seconds : float, optional
        Wall time of the whole call.

    Returns
    -------
    dict
        The fields of :data:`E2E_ROW_FIELDS`.
    """
    if not rows:
        raise ValueError("rows must hold at least one per-prompt row, got none")
    new = sum(int(r["new_tokens"]) for r in rows)
    forwards = sum(int(r["target_forwards"]) for r in rows)
    after_prefill = sum(max(int(r["new_tokens"]) - 1, 0) for r in rows)
    decode = sum(batch_seconds(rows, batch_size))
    return {
        "method": method,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "status": "ok",
        "num_prompts": len(rows),
        "new_tokens": new,
        "target_forwards": forwards,
        "mean_accepted": after_prefill / forwards if forwards else None,
        "decode_seconds": decode,
        "decode_tokens_per_s": new / decode if decode > 0 else None,
        "wall_seconds": wall_seconds,
        "wall_tokens_per_s": new / wall_seconds if wall_seconds else None,
    }


def skipped(method: str, batch_size: int, max_new_tokens: int, reason: str,
            status: str = "skipped") -> dict[str, Any]:
    """A row for a run that did not happen, with every timing field ``None``."""
    row = {f: None for f in E2E_ROW_FIELDS}
    row.update(method=method, batch_size=batch_size, max_new_tokens=max_new_tokens,
               status=status, note=reason)
    return row


def run_sweep(sweep: dict, device: str, limit_prompts: int | None = None,
              methods: list[str] | None = None, progress: bool = True):
    """Run the end-to-end sweep; returns ``(rows, meta)``."""
    from tqdm.auto import tqdm

    from glide import api

    prompts = api.read_prompts(harness.REPO_ROOT / sweep["prompts"])
    prompts = prompts[: limit_prompts or sweep.get("num_prompts") or len(prompts)]
    methods = methods or sweep["methods"]
    dev = torch.device(device)
    dtype = api.resolve_dtype(sweep.get("dtype"), dev)
    env = harness.environment(dev, sweep["name"])
    common = dict(temperature=sweep.get("temperature", 0.0), seed=sweep.get("seed", 0),
                  device=device, dtype=dtype)
    grid = [(b, n) for b in sweep["batch_sizes"] for n in sweep["max_new_tokens"]]
    rows: list[dict] = []
    loaded: dict[str, Any] = {}
    bar = tqdm(total=len(methods) * len(grid), desc=f"e2e on {device}", unit="run",
               disable=not progress)
    for method in methods:
        kind = "hf" if method == "hf" else "ours"  # every non-hf method shares our runner
        try:
            if kind not in loaded:
                loaded[kind] = api.load(method, sweep.get("model"), dev, dtype)
            # Warm-up (kernel compilation, allocator): one short call, not timed.
            api.generate(prompts[:1], method=method, max_new_tokens=4, loaded=loaded[kind],
                         **common)
        except NotImplementedError as exc:
            rows += [skipped(method, b, n, str(exc)) for b, n in grid]
            bar.update(len(grid))
            continue
        for b, n in grid:
            try:
                start = time.perf_counter()
                out = api.generate(prompts, method=method, max_new_tokens=n, batch_size=b,
                                   loaded=loaded[kind], **common)
                wall = time.perf_counter() - start
                row = aggregate(out, method=method, batch_size=b, max_new_tokens=n,
                                wall_seconds=wall)
            except NotImplementedError as exc:
                row = skipped(method, b, n, str(exc))
            except Exception as exc:  # noqa: BLE001 - record the failure, go on with the sweep
                row = skipped(method, b, n, f"{type(exc).__name__}: {str(exc)[:300]}", "error")
            rows.append(row)
            bar.update(1)
    bar.close()
    rows = [dict(r, **env) for r in rows]
    meta = dict(env, prompts=sweep["prompts"], prompt_ids=[p.id for p in prompts],
                dtype=str(dtype).replace("torch.", ""), description=sweep.get("description", ""))
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    p.add_argument("--sweep", help="e2e sweep name in bench/sweeps or a JSON path "
                   "(default: 'e2e_gpu' on CUDA, 'e2e_cpu' otherwise)")
    p.add_argument("--methods", help="comma-separated subset of the sweep's methods")
    p.add_argument("--prompts", type=int, help="use only the first N prompts")
    p.add_argument("--out", help="results file (default profiles/<device-slug>/e2e.json)")
    p.add_argument("--results-dir", metavar="DIR",
                   help="write DIR/<device-slug>/<sweep>.json unless --out is given (default: profiles)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    name = args.sweep or ("e2e_gpu" if torch.cuda.is_available() else "e2e_cpu")
    path = Path(name) if Path(name).suffix else harness.REPO_ROOT / "bench" / "sweeps" / f"{name}.json"
    sweep = json.loads(path.read_text())
    sweep.setdefault("name", path.stem)
    device = sweep.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    methods = args.methods.split(",") if args.methods else None
    rows, meta = run_sweep(sweep, device, args.prompts, methods, progress=not args.no_progress)
    out = args.out or harness.results_path(meta["device_slug"], "e2e", args.results_dir)
    harness.write_results(out, rows, meta)
    for r in rows:
        tps = r["decode_tokens_per_s"]
        shown = f"{tps:8.1f} tok/s" if tps is not None and math.isfinite(tps) else r["status"]
        print(f"{r['method']:>8} batch {r['batch_size']:>3} new {r['max_new_tokens']:>4}: {shown}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
