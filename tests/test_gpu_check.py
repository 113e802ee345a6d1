"""bench.gpu_check and bench.gpu_plots on the CPU (--smoke: tiny shapes, no capture)."""

import json

import pytest

from bench import gpu_check, gpu_plots


def test_smoke_run_writes_rows_and_plots(tmp_path):
    out = tmp_path / "gc"
    assert gpu_check.main(["--smoke", "--out", str(out), "--steps", "copy", "forward", "tree", "launch"]) == 0
    data = json.loads((out / "gpu-check.json").read_text())
    assert data["meta"]["errors"] == [] and data["meta"]["sweep"] == "gpu-check"
    steps = [r["step"] for r in data["rows"]]
    assert steps.count("forward") == 8 and steps.count("tree") == 4 and steps[0] == "copy"
    for r in data["rows"]:
        if r["step"] == "forward":
            assert r["eager_us"] > 0 and r["graphed_us"] > 0 and r["replay_us"] is None  # no capture on CPU
            # off the Triton path (the CPU without the interpreter's help here) fused is a no-op
            assert (r["rel_diff_vs_unfused"] is None) == (not r["fused"])
            assert r["rel_diff_vs_unfused"] is None or r["rel_diff_vs_unfused"] < 1e-5
        if r["step"] == "tree":
            assert r["default_us"] > 0 and r["default_gbps"] > 0 and r["old_splits"] >= 1
            # past 64 query rows per KV head the 128-row tile is timed too (llama8b T=17: 68 rows)
            assert ("bm128_us" in r) == ("bm64_us" in r) == (r["T"] * r["group"] > 64)
    engine = {(r["call"], r["batch_size"]): r["wall_us"] for r in data["rows"]
              if r["step"] == "launch" and r["call"].startswith("engine_ar_step_")}
    assert set(engine) == {(f"engine_ar_step_{e}", b) for e in ("emit", "emit_one") for b in (1, 8)}
    assert all(v > 0 for v in engine.values())
    names = {p.name for p in out.glob("*.png")}
    assert names == {"gpu-tree-attention.png", "gpu-forward.png"}  # no e2e rows, no e2e plot


def test_gpu_tests_first_names_existing_files():
    """The test step runs these files first; a renamed file must not drop out unnoticed."""
    root = gpu_check.ROOT
    missing = [f for f in gpu_check.GPU_TESTS_FIRST if not (root / f).is_file()]
    assert not missing, missing
    assert len(set(gpu_check.GPU_TESTS_FIRST)) == len(gpu_check.GPU_TESTS_FIRST)


def test_smoke_e2e_rows_keep_ar_tokens_and_count_paused_steps(tmp_path, capsys):
    out = tmp_path / "gc"
    assert gpu_check.main(["--smoke", "--out", str(out), "--steps", "e2e"]) == 0
    data = json.loads((out / "gpu-check.json").read_text())
    assert data["meta"]["errors"] == []
    rows = [r for r in data["rows"] if r.get("method")]
    methods = {r["method"] for r in rows}
    assert {"ar", "oracle-chain4", "glide-random-draft", "glide-random-hidden", "glide-random-dynamic"} <= methods
    spec = [r for r in rows if "same_tokens_as_ar" in r]
    assert len(spec) == 16 and all(r["same_tokens_as_ar"] for r in spec)
    dyn = [r for r in rows if r["method"] == "glide-random-dynamic"]
    assert {(r["batch"], r["mode"]) for r in dyn} == {(b, m) for b in (1, 8) for m in ("eager", "graphed")}
    assert all(0 <= r["paused_steps"] < r["steps"] and r["tok_s_wall"] > 0 for r in dyn)
    # the median step times by kind: drafted steps were measured (the first ones always draft)
    assert all(r["drafted_step_ms"] > 0 for r in dyn)
    assert all((r["paused_step_ms"] is None) or r["paused_step_ms"] > 0 for r in dyn)
    assert "glide-random-dynamic/graphed" in capsys.readouterr().out  # the summary's rows


def test_budget_skips_late_steps(tmp_path):
    out = tmp_path / "gc"
    gpu_check.main(["--smoke", "--out", str(out), "--steps", "copy", "tree", "--budget-s", "1e-9"])
    rows = json.loads((out / "gpu-check.json").read_text())["rows"]
    assert [r.get("skipped") for r in rows] == ["budget spent", "budget spent"]


def test_refuses_to_run_without_cuda_or_smoke(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as err:
        gpu_check.main([])
    assert err.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_plots_need_an_existing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_plots.main([str(tmp_path / "missing.json")])
    assert "no such file" in capsys.readouterr().err
