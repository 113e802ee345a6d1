"""Every Triton kernel compiles to a cubin for sm_90 (H100/H200) and sm_80 (A100), on a CPU.

The interpreter (``TRITON_INTERPRET=1``, how the other kernel tests run here) accepts code that
the GPU compiler rejects or that needs more shared memory than a card has. This test compiles
the configurations the launchers actually choose (see :mod:`aot_compile`, which records the
launches and compiles them with Triton's bundled ``ptxas``), in two subprocesses: this process
imported the kernels under the interpreter, which replaced every ``@triton.jit`` function.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aot_compile import SHARED_LIMIT, case_specs

REPO = Path(__file__).resolve().parents[1]
NUM_SHARDS = 2  # about 45 s of compiling on one core, cut in two
CASES = case_specs()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Run the shards of ``tests/aot_compile.py`` and merge their JSON results."""
    if torch.cuda.is_available():
        # There the kernel tests compile and run every kernel for real; and aot_compile uses
        # Triton internals of the pinned version (3.9), which the GPU image may not have.
        pytest.skip("a CUDA device is present: the kernel tests compile the kernels for it")
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # cold and private: really compile
    procs = []
    for i in range(NUM_SHARDS):
        out = tmp / f"shard{i}.json"
        cmd = [sys.executable, "-m", "tests.aot_compile", "--out", str(out),
               "--shard", f"{i}/{NUM_SHARDS}"]
        procs.append((out, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)))
    merged = None
    for out, proc in procs:
        log, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"tests/aot_compile.py exited with {proc.returncode}:\n{log[-3000:]}")
        shard = json.loads(out.read_text())
        if merged is None:
            merged = shard
        else:
            merged["jobs"].update(shard["jobs"])
    if merged["ptxas"] is None:
        pytest.skip("the installed Triton has no usable ptxas (triton/backends/nvidia/bin)")
    return merged


@pytest.mark.parametrize("spec", CASES, ids=[s["name"] for s in CASES])
def test_case_compiles(compiled, spec):
    jobs = compiled["cases"][spec["name"]]
    assert jobs, f"{spec['name']}: the launcher launched no kernel"
    for key in jobs:
        r = compiled["jobs"][key]
        where = f"{r['kernel']} on sm_{r['arch']} with {r['constexprs']}, " \
                f"num_warps={r['num_warps']}, num_stages={r['num_stages']}"
        if "error" in r:
            pytest.fail(f"{where} does not compile:\n{r['error']}", pytrace=False)
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, f"{where}: no PTX or cubin"
        limit = SHARED_LIMIT[r["arch"]]
        assert r["shared"] <= limit, (
            f"{where} needs {r['shared']} bytes of shared memory; sm_{r['arch']} allows {limit}"
        )


def test_every_kernel_and_code_path_is_covered(compiled):
    """The cases reach every launched ``@triton.jit`` kernel on both targets, and each branch
    of the attention and add_rms_norm kernels' constexpr flags."""
    for arch in SHARED_LIMIT:
        seen = {r["kernel"] for r in compiled["jobs"].values() if r["arch"] == arch}
        assert seen == set(compiled["kernels"]), f"sm_{arch}: compiled {sorted(seen)}"
    fwd = [r["constexprs"] for r in compiled["jobs"].values()
           if r["kernel"] == "attention_fwd_kernel" and r["arch"] == 90]
    paths = {(c["HAS_TREE"], c["NUM_SPLITS"] > 1, c["DOT_PRECISION"]) for c in fwd}
    for has_tree in (True, False):
        for split in (True, False):
            for precision in (None, "ieee"):  # 16-bit inputs, float32 inputs
                assert (has_tree, split, precision) in paths, (has_tree, split, precision)
    assert {c["BLOCK_M"] for c in fwd} == {16, 32, 64, 128}
    assert {c["BLOCK_N"] for c in fwd} == {64, 128}
    assert any(c["HEAD_DIM"] < c["BLOCK_D"] for c in fwd)  # a masked head_dim (80)
    norm = {(c["HAS_DELTA"], c["HALF"]) for r in compiled["jobs"].values()
            if r["kernel"] == "add_rms_norm_kernel" and r["arch"] == 90 for c in [r["constexprs"]]}
    assert norm == {(True, True), (False, True), (True, False), (False, False)}, norm
