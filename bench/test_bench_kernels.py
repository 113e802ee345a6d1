"""pytest-benchmark entries for GPU runners: ``pytest bench --benchmark-compare``.

One group per kernel and representative shape, holding the Triton launcher and its main
baseline, so ``--benchmark-compare`` tracks each against the last saved run
(``--benchmark-autosave``). The whole module skips without CUDA; it never runs under the
project's CPU test command (``pytest tests``). Sweeps with GB/s and plots are
``python -m bench.kernels``; this file is for regression tracking only.
"""

import pytest
import torch

from bench.kernels import impls_for, make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="kernel benchmarks time the Triton kernels and need a CUDA device"),
]

SMOLLM2 = dict(heads_name="smollm2", num_q_heads=9, num_kv_heads=3, head_dim=64)
LLAMA8B = dict(heads_name="llama8b", num_q_heads=32, num_kv_heads=8, head_dim=128)
CAPE = {"kind": "cape", "spine": 4, "leaves": 3}

CASES = {
    "tree-smollm2-b1-ctx2k": dict(kernel="tree_attention", dtype="bfloat16", batch=1, tree=CAPE,
                                  context=2048, **SMOLLM2),
    "tree-llama8b-b8-ctx8k": dict(kernel="tree_attention", dtype="bfloat16", batch=8, tree=CAPE,
                                  context=8192, **LLAMA8B),
    "cross-smollm2-b8-q8-ctx2k": dict(kernel="cross_attention", dtype="bfloat16", batch=8,
                                      q_len=8, context=2048, **SMOLLM2),
    "topk-v49152-r32": dict(kernel="cape_topk", dtype="bfloat16", vocab=49152, k=8, rows=32),
    "topk-v151936-r1": dict(kernel="cape_topk", dtype="float32", vocab=151936, k=8, rows=1),
    "compact-smollm2-b8": dict(kernel="compact_kv", dtype="bfloat16", batch=8, num_caches=60,
                               tree=CAPE, context=2048, **SMOLLM2),
}
# The baseline each launcher is compared with in its group.
BASELINE = {"tree_attention": "sdpa-dense", "cross_attention": "sdpa-dense",
            "cape_topk": "torch-softmax-topk", "compact_kv": "reference"}


@pytest.mark.parametrize("which", ["glide", "baseline"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel(benchmark, name, which):
    case = CASES[name]
    device = torch.device("cuda")
    impls = {i.name: i for i in impls_for(case, device)}
    impl = impls["glide:triton"] if which == "glide" else impls[BASELINE[case["kernel"]]]
    if impl.skip:
        pytest.skip(impl.skip)
    args = impl.prepare(make_inputs(case, device))
    impl.call(args)  # compile outside the timed rounds
    torch.cuda.synchronize()

    def run():
        impl.call(args)
        torch.cuda.synchronize()

    benchmark.group = name
    benchmark.extra_info.update(impl=impl.name, config=impl.config)
    benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=5)
