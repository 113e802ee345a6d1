"""Sweeps declared as data: ``bench/sweeps/<name>.json`` expanded into benchmark cases.

A sweep file looks like::

    {
      "name": "cpu",
      "description": "...",
      "timing": {"warmup_ms": 10, "rep_ms": 50},
      "head_configs": {"smollm2": {"num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}},
      "kernels": {
        "tree_attention": {"batch": [1, 4], "heads": ["smollm2"], "dtype": ["float32"],
                           "context": [128, 1024],
                           "tree": [{"kind": "chain", "T": 8},
                                    {"kind": "cape", "spine": 4, "leaves": 3},
                                    {"kind": "random", "T": 16, "seed": 0}]},
        ...
      }
    }

Each kernel's axes expand as a Cartesian product, in the order :data:`KERNEL_AXES` lists them,
so a new sweep needs a new JSON file and no new code. Tree shapes:

- ``chain``: ``T`` slots, each the child of the one before (``T - 1`` drafted tokens).
- ``cape``: a spine of ``spine`` nodes below the root; every spine level also carries
  ``leaves`` sibling leaves (CaPE's extra candidates), so ``T = 1 + spine * (1 + leaves)``.
- ``random``: ``T`` slots, each node's parent drawn uniformly from the slots before it.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import torch

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"

# The axes of each kernel, in expansion order (the last varies fastest).
KERNEL_AXES: dict[str, tuple[str, ...]] = {
    "tree_attention": ("dtype", "heads", "batch", "tree", "context"),
    "cross_attention": ("dtype", "heads", "batch", "q_len", "context"),
    "cape_topk": ("dtype", "vocab", "k", "rows"),
    "compact_kv": ("dtype", "heads", "batch", "num_caches", "tree", "context"),
}

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def tree_parents(spec: dict[str, Any]) -> list[int]:
    """Parent slot of every tree slot (``-1`` for the root, slot 0), parents before children.

    Parameters
    ----------
    spec : dict
        ``{"kind": "chain", "T": int}``, ``{"kind": "cape", "spine": int, "leaves": int}`` or
        ``{"kind": "random", "T": int, "seed": int}``.

    Returns
    -------
    list of int, length T
    """
    kind = spec.get("kind")
    if kind == "chain":
        return [-1] + list(range(int(spec["T"]) - 1))
    if kind == "cape":
        parents = [-1]
        spine_slot = 0
        for _ in range(int(spec["spine"])):
            below = spine_slot
            spine_slot = len(parents)
            parents.append(below)
            parents.extend([below] * int(spec["leaves"]))
        return parents
    if kind == "random":
        rng = random.Random(int(spec.get("seed", 0)))
        return [-1] + [rng.randrange(i) for i in range(1, int(spec["T"]))]
    raise ValueError(f"tree kind must be 'chain', 'cape' or 'random', got {kind!r}")


def tree_label(spec: dict[str, Any]) -> str:
    """Short name of a tree shape for tables and plots, e.g. ``cape4x3`` or ``chain8``."""
    kind = spec["kind"]
    if kind == "cape":
        return f"cape{spec['spine']}x{spec['leaves']}"
    return f"{kind}{spec['T']}"


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``(T, T)`` bool: ``mask[i, j]`` when slot ``j`` is slot ``i`` or one of its ancestors."""
    T = len(parents)
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        p = parents[i]
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] must lie in [0, {i}), got {p}")
        mask[i] |= mask[p]
    return mask


def deepest_path(parents: list[int]) -> list[int]:
    """Slots from the root to the deepest node (the first deepest, on ties)."""
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    node = max(range(len(parents)), key=lambda i: (depth[i], -i))
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def load_sweep(name_or_path: str | Path) -> dict[str, Any]:
    """Read a sweep by name (``bench/sweeps/<name>.json``) or by path, and check its axes.

    Raises
    ------
    ValueError
        If a kernel is unknown, an axis is missing or unknown, or an axis list is empty.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = SWEEPS_DIR / f"{name_or_path}.json"
    sweep = json.loads(path.read_text())
    sweep.setdefault("name", path.stem)
    heads = sweep.get("head_configs", {})
    for kernel, axes in sweep.get("kernels", {}).items():
        if kernel not in KERNEL_AXES:
            raise ValueError(f"{path}: kernel must be one of {sorted(KERNEL_AXES)}, got {kernel!r}")
        want = set(KERNEL_AXES[kernel])
        if set(axes) != want:
            raise ValueError(
                f"{path}: {kernel} axes must be {sorted(want)}, got {sorted(axes)}"
            )
        for axis, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: {kernel}.{axis} must be a non-empty list")
        for h in axes.get("heads", []):
            if h not in heads:
                raise ValueError(f"{path}: {kernel} uses head config {h!r}, not in head_configs")
        for d in axes["dtype"]:
            if d not in DTYPES:
                raise ValueError(f"{path}: {kernel}.dtype must be in {sorted(DTYPES)}, got {d!r}")
    return sweep


def expand(sweep: dict[str, Any], kernels: list[str] | None = None) -> list[dict[str, Any]]:
    """All benchmark cases of ``sweep``: one dict per point of each kernel's axis product.

    A case holds ``kernel`` and one value per axis; ``heads`` is replaced by its head config
    (``num_q_heads``, ``num_kv_heads``, ``head_dim``) plus ``heads_name``.
    """
    cases = []
    for kernel, axes in sweep.get("kernels", {}).items():
        if kernels is not None and kernel not in kernels:
            continue
        names = KERNEL_AXES[kernel]
        for values in itertools.product(*(axes[a] for a in names)):
            case: dict[str, Any] = {"kernel": kernel}
            for axis, value in zip(names, values):
                if axis == "heads":
                    case["heads_name"] = value
                    case.update(sweep["head_configs"][value])
                else:
                    case[axis] = value
            cases.append(case)
    return cases


def list_sweeps() -> list[str]:
    """Names of the sweep files shipped in ``bench/sweeps/``."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.json"))
