"""Resources of every kernel configuration the launchers choose, compiled for a GPU on the CPU.

Runs the cases of ``tests/aot_compile.py`` (Triton's bundled ``ptxas``, no GPU needed) and
writes ``profiles/compile-sm<arch>.json``: per compiled kernel configuration, the shared
memory, the PTX and cubin sizes and, from ``ptxas -v`` on the same PTX, the registers per
thread and spill bytes. Usage (``TRITON_INTERPRET`` must be unset)::

    python -m bench.aot_report [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton

from bench.harness import PROFILES_DIR, git_sha, write_results
from tests.aot_compile import SHARED_LIMIT, run


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes that ``ptxas -v`` reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    # Triton targets the architecture-specific sm_90a where it exists (wgmma, TMA).
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        ).stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return dict(registers=grab(r"Used (\d+) registers"),
                spill_store_bytes=grab(r"(\d+) bytes spill stores"),
                spill_load_bytes=grab(r"(\d+) bytes spill loads"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("aot_report: unset TRITON_INTERPRET (the interpreter replaces the JIT kernels)")
    res = run(with_ptx=True)
    if res["ptxas"] is None:
        sys.exit("aot_report: the installed Triton has no usable ptxas")
    cases_of = {}
    for case, keys in res["cases"].items():
        for key in keys:
            cases_of.setdefault(key, []).append(case)
    rows = []
    for key, r in sorted(res["jobs"].items()):
        if r["arch"] != a.arch:
            continue
        row = {k: v for k, v in r.items() if k not in ("ptx", "traceback", "seconds")}
        row["cases"] = cases_of[key]
        if "ptx" in r:
            row.update(ptxas_usage(r["ptx"], a.arch))
        rows.append(row)
    meta = dict(git_sha=git_sha(), triton=triton.__version__, ptxas=res["ptxas"],
                arch=f"sm_{a.arch}", shared_limit=SHARED_LIMIT[a.arch])
    path = write_results(PROFILES_DIR / f"compile-sm{a.arch}.json", rows, meta)
    print(f"{len(rows)} kernel configurations -> {path}")
    for row in rows:
        dtype = next(iter(row["pointers"].values()), "")
        print(f"{row['kernel']:22s} {dtype:6s} shared {row.get('shared', 'ERR'):>7} "
              f"regs {row.get('registers')} spills {row.get('spill_store_bytes')} {row['constexprs']}")


if __name__ == "__main__":
    main()
