"""The benchmark harness's pure parts: bytes accounting, sweeps, results files, plots, e2e rows.

Fast and CPU-only; nothing here asserts a speed.
"""

import json
import math
import pytest
import torch

# bench/ is a top-level folder of the repository; pyproject's pytest `pythonpath` finds it.
from bench import e2e, harness, kernels, plot, sweeps, traffic

# ------------------------------------------------------------------------- bytes accounting


def test_tree_attention_bytes_hand_count():
    # B=2, T=3, Hq=4, Hkv=2, D=8, prefixes 5 and 0, fp16 (2 bytes):
    # q = out = 2*3*4*8*2 = 384 each; K/V rows (5+3)+(0+3) = 11 per KV head,
    # 2 (K and V) * 11 * 2 heads * 8 * 2 bytes = 704; mask 2*3*3 = 18.
    assert traffic.tree_attention_bytes(2, 3, 4, 2, 8, [5, 0], 2) == 384 + 384 + 704 + 18


def test_cross_attention_bytes_hand_count():
    # B=2, Tq=1, Hq=3, Hkv=1, D=4, kv_lens 7 and 2, fp32: q = out = 2*1*3*4*4 = 96;
    # K/V = 2 * (7+2) * 1 * 4 * 4 = 288.
    assert traffic.cross_attention_bytes(2, 1, 3, 1, 4, [7, 2], 4) == 96 + 96 + 288


def test_cape_topk_bytes_hand_count():
    # 3 rows of 111 bf16 logits in; 3 rows of k=5 float32 probs and int64 ids out.
    assert traffic.cape_topk_bytes(3, 111, 5, 2) == 3 * 111 * 2 + 3 * 5 * 4 + 3 * 5 * 8


def test_compact_kv_bytes_hand_count():
    # 4 stacked caches, 2 KV heads, D=8, fp32, paths of 3 and 1 rows: each row read + written.
    assert traffic.compact_kv_bytes(4, 2, 8, [3, 1], 4) == 2 * 4 * (3 + 1) * 2 * 8 * 4


def test_bytes_reject_wrong_length_lists():
    with pytest.raises(ValueError, match="prefix_lens"):
        traffic.tree_attention_bytes(2, 3, 4, 2, 8, [5], 2)


def test_case_bytes_match_the_inputs_they_build():
    """bench.kernels counts the same bytes as the tensors it allocates: for tree attention
    with zero slack, q + K/V + mask + out equals the input tensors (minus lens) plus q."""
    case = dict(kernel="tree_attention", dtype="float32", heads_name="t", num_q_heads=6,
                num_kv_heads=2, head_dim=8, batch=3, tree={"kind": "cape", "spine": 2, "leaves": 1},
                context=5)
    x = kernels.make_inputs(case, torch.device("cpu"))
    alloc = sum(x[k].numel() * x[k].element_size() for k in ("q", "k_cache", "v_cache", "tree_mask"))
    assert kernels.bytes_moved(case) == alloc + x["q"].numel() * 4


# ------------------------------------------------------------------------- trees


def test_tree_shapes():
    assert sweeps.tree_parents({"kind": "chain", "T": 4}) == [-1, 0, 1, 2]
    # spine 2, 1 leaf each: root 0; level 1: spine 1 + leaf 2 under 0; level 2: 3 + 4 under 1.
    assert sweeps.tree_parents({"kind": "cape", "spine": 2, "leaves": 1}) == [-1, 0, 0, 1, 1]
    rnd = sweeps.tree_parents({"kind": "random", "T": 9, "seed": 3})
    assert len(rnd) == 9 and all(0 <= p < i for i, p in enumerate(rnd) if i)
    with pytest.raises(ValueError, match="tree kind"):
        sweeps.tree_parents({"kind": "bushy", "T": 3})


def test_ancestor_mask_and_deepest_path():
    parents = [-1, 0, 0, 1, 1]
    m = sweeps.ancestor_mask(parents)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                         [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    assert sweeps.deepest_path(parents) == [0, 1, 3]


# ------------------------------------------------------------------------- sweeps


def _kernel_sweep_names():
    return [n for n in sweeps.list_sweeps() if "kernels" in sweeps.load_sweep(n)]


def test_shipped_sweeps_exist():
    names = _kernel_sweep_names()
    assert "cpu" in names and "gpu" in names


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_sweep_expands_to_product_of_axes(name):
    sweep = sweeps.load_sweep(name)
    cases = sweeps.expand(sweep)
    for kernel, axes in sweep["kernels"].items():
        want = math.prod(len(v) for v in axes.values())
        got = [c for c in cases if c["kernel"] == kernel]
        assert len(got) == want, kernel
        # Every case is distinct and has resolved head configs.
        assert len({json.dumps(c, sort_keys=True) for c in got}) == want
        if "heads" in axes:
            assert all({"num_q_heads", "num_kv_heads", "head_dim"} <= set(c) for c in got)
    assert len(cases) == sum(math.prod(len(v) for v in a.values())
                             for a in sweep["kernels"].values())


def test_sweep_counts_by_hand(tmp_path):
    spec = {
        "name": "tiny",
        "head_configs": {"a": {"num_q_heads": 2, "num_kv_heads": 1, "head_dim": 4}},
        "kernels": {
            "tree_attention": {"dtype": ["float32"], "heads": ["a"], "batch": [1, 2],
                               "tree": [{"kind": "chain", "T": 2}], "context": [3, 5, 7]},
            "cape_topk": {"dtype": ["float32", "bfloat16"], "vocab": [111], "k": [2], "rows": [1]},
        },
    }
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(spec))
    cases = sweeps.expand(sweeps.load_sweep(p))
    assert len(cases) == 2 * 3 + 2
    assert [c["context"] for c in cases[:3]] == [3, 5, 7]  # the last axis varies fastest


def test_sweep_rejects_bad_axes(tmp_path):
    spec = {"head_configs": {}, "kernels": {"cape_topk": {"dtype": ["float32"], "vocab": [5],
                                                          "k": [2]}}}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="axes must be"):
        sweeps.load_sweep(p)


# ------------------------------------------------------------------------- harness and results


def test_cpu_timer_statistics_are_ordered():
    xs = [torch.ones(64) for _ in range(3)]
    seen = []
    t = harness.time_fn(lambda x: seen.append(id(x)), xs, torch.device("cpu"),
                        warmup_ms=0.0, rep_ms=0.0, min_reps=6)
    assert t.reps == 6
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(set(seen)) == 3  # inputs were rotated


def test_run_case_rows_complete(tmp_path):
    """A real (tiny) case through run_case and write/read: all fields present, sane values."""
    case = dict(kernel="cape_topk", dtype="float32", vocab=111, k=3, rows=2)
    env = harness.environment(torch.device("cpu"), "unit")
    rows = kernels.run_case(case, torch.device("cpu"), 10.0, env,
                            dict(warmup_ms=0.0, rep_ms=0.0, min_reps=3))
    impls = [r["impl"] for r in rows]
    assert impls[1:] == ["reference", "torch-softmax-topk"]
    path = harness.write_results(harness.results_path("dev", "unit", root=tmp_path), rows,
                                 dict(env, copy_gbps=10.0))
    assert path == tmp_path / "dev" / "unit.json"
    back = harness.read_results(path)
    assert back["rows"] == json.loads(json.dumps(rows))
    for r in back["rows"]:
        assert harness.missing_fields(r) == []
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["bytes"] == traffic.cape_topk_bytes(2, 111, 3, 4)
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["frac_copy"] == pytest.approx(r["gbps"] / 10.0)
            assert r["max_abs_err"] < 1e-6
    # Overwrite, not append.
    harness.write_results(path, rows[:1], {})
    assert len(harness.read_results(path)["rows"]) == 1


def test_missing_fields_names_them():
    assert harness.missing_fields({"kernel": "x"}, ("kernel", "impl")) == ["impl"]


def test_read_results_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="meta"):
        harness.read_results(p)


# ------------------------------------------------------------------------- e2e aggregation


def _gen_rows(new, forwards, seconds):
    return [dict(id=i, new_tokens=n, target_forwards=f, seconds=s)
            for i, (n, f, s) in enumerate(zip(new, forwards, seconds))]


def test_e2e_aggregate_by_hand():
    # Batch size 2 over 3 prompts: batches {0,1} (0.5 s shared) and {2} (0.25 s).
    rows = _gen_rows([10, 6, 4], [3, 5, 1], [0.5, 0.5, 0.25])
    agg = e2e.aggregate(rows, method="ar", batch_size=2, max_new_tokens=16, wall_seconds=1.0)
    assert agg["new_tokens"] == 20
    assert agg["target_forwards"] == 9
    assert agg["mean_accepted"] == pytest.approx((9 + 5 + 3) / 9)
    assert agg["decode_seconds"] == pytest.approx(0.75)
    assert agg["decode_tokens_per_s"] == pytest.approx(20 / 0.75)
    assert agg["wall_tokens_per_s"] == pytest.approx(20.0)
    assert set(e2e.E2E_ROW_FIELDS) <= set(agg)


def test_e2e_batch_seconds_takes_batch_maximum():
    rows = _gen_rows([1] * 5, [0] * 5, [0.1, 0.3, 0.2, 0.2, 0.4])
    assert e2e.batch_seconds(rows, 2) == [0.3, 0.2, 0.4]
    assert e2e.batch_seconds(rows, 1) == [0.1, 0.3, 0.2, 0.2, 0.4]
    with pytest.raises(ValueError, match="batch_size"):
        e2e.batch_seconds(rows, 0)


def test_e2e_skipped_row_has_every_field():
    row = e2e.skipped("glide", 4, 32, "not available yet")
    assert row["status"] == "skipped" and row["note"] == "not available yet"
    assert set(e2e.E2E_ROW_FIELDS) <= set(row) and row["decode_tokens_per_s"] is None


def test_eval_prompts_parse():
    lines = (harness.REPO_ROOT / "bench" / "prompts" / "eval.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    assert len(rows) >= 20 and len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in rows)


# ------------------------------------------------------------------------- plots


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_kernel_results(tmp_path):
    rows = []
    for impl in ("reference", "sdpa-dense"):
        for ctx, ms in ((128, 1.0), (512, 2.0)):
            rows.append(dict(kernel="tree_attention", impl=impl, status="ok", dtype="float32",
                             shape=dict(heads_name="smollm2", batch=1, tree="chain8", T=8,
                                        context=ctx), median_ms=ms, p20_ms=ms * 0.9,
                             p80_ms=ms * 1.1, frac_copy=0.1 * ms))
    rows.append(dict(kernel="cape_topk", impl="reference", status="skipped", dtype="float32",
                     shape=dict(vocab=111, k=2, rows=1), median_ms=None))
    src = tmp_path / "dev" / "tiny.json"
    harness.write_results(src, rows, dict(device="test", sweep="tiny", copy_gbps=5.0))
    out = plot.plot_file(src)
    assert sorted(p.name for p in out) == ["tiny_bandwidth.png", "tiny_time.png"]
    assert all(p.parent == src.parent and _png(p) for p in out)


def test_plot_e2e_results(tmp_path):
    rows = [dict(e2e.aggregate(_gen_rows([8, 8], [7, 4], [0.5, 0.5]), method=m, batch_size=b,
                               max_new_tokens=8), device="test")
            for m in ("ar", "lookup") for b in (1, 2)]
    rows.append(e2e.skipped("glide", 1, 8, "not available yet"))
    src = tmp_path / "e2e.json"
    harness.write_results(src, rows, {"device": "test"})
    out = plot.plot_file(src, tmp_path / "pngs")
    assert [p.name for p in out] == ["e2e.png"] and _png(out[0])


def test_plot_draft_eval_with_a_shipped_calibration(tmp_path):
    rows = [dict(e2e.aggregate(_gen_rows([8, 8], [7, 4], [0.5, 0.5]), method=m, batch_size=1,
                               max_new_tokens=8), temperature=0.0, speedup=1.0)
            for m in ("ar", "dynamic")]
    table = [{"bucket": [0.1, 0.2], "nodes": 40, "predicted": 0.14, "observed": 0.16, "shipped": 0.12},
             {"bucket": [0.5, 0.6], "nodes": 30, "predicted": 0.55, "observed": 0.57}]
    cal = {"table": table, "temperature": 0.0, "verify_cost": {"sizes": [1, 4], "seconds": [0.01, 0.02]}}
    src = tmp_path / "draft-eval.json"
    harness.write_results(src, rows, {"device": "test", "sweep": "draft-eval", "calibration": [cal]})
    out = plot.plot_file(src)
    assert [p.name for p in out] == ["draft-eval.png", "draft-eval-calibration.png", "draft-eval-verify-cost.png"]
    assert all(_png(p) for p in out)


def test_plot_verify_cost_and_ar_vs_hf(tmp_path):
    rows = [dict(dtype="bfloat16", batch=1, context=c, tree_len=t, median_ms=t + c / 100,
                 p20_ms=t, p80_ms=t + 1, reps=5, vs_one_token=1.0)
            for c in (128, 512) for t in (1, 2, 4)]
    src = tmp_path / "verify-cost.json"
    harness.write_results(src, rows, {"device": "test", "sweep": "verify_cost"})
    out = plot.plot_file(src)
    assert [p.name for p in out] == ["verify-cost.png"] and _png(out[0])
    src = tmp_path / "ar-vs-hf.json"
    src.write_text(json.dumps({"meta": {"device": "test", "sweep": "ar_vs_hf"}, "rows": [
        {"dtype": "float32", "method": "hf", "id": 0}], "summary": [
        {"dtype": "float32", "hf_tokens_per_s": 10.0, "ar_tokens_per_s": 17.0,
         "identical_outputs": "1/1"}]}))
    out = plot.plot_file(src)
    assert [p.name for p in out] == ["ar-vs-hf.png"] and _png(out[0])


def test_plot_step_time(tmp_path):
    rows = [dict(config=c, phase=p, ms_per_step=ms, calls_per_step=1.0, steps=10, mean_accepted=acc,
                 tokens_per_step=acc)
            for c, acc, parts in (("ar", 1.0, {"target": 40.0, "other": 1.0}),
                                  ("dyn", 3.0, {"target": 48.0, "draft.forward": 11.0, "other": 1.0}))
            for p, ms in list(parts.items()) + [("draft", 0.0), ("total", sum(parts.values()))]]
    src = tmp_path / "step-time.json"
    harness.write_results(src, rows, {"device": "test", "sweep": "step-time", "batch_size": 1})
    out = plot.plot_file(src)
    assert [p.name for p in out] == ["step-time.png"] and _png(out[0])


# ------------------------------------------------------------------------- where results go


def _make_dry_run(*args, env_out=None):
    """The commands `make -n` would run (nothing runs); None without make."""
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        return None
    env = dict(os.environ)
    if env_out is not None:
        env["OUT"] = env_out
    else:
        env.pop("OUT", None)
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args, "PY=python"],
                          cwd=harness.REPO_ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if " -m bench." in line]


def test_make_bench_writes_to_an_ignored_folder():
    import subprocess

    # an OUT in the environment (the device machine sets one) must not move the results
    lines = _make_dry_run("bench", "bench-kernels", "bench-e2e", "bench-verify", "plots", env_out="/elsewhere")
    if lines is None:
        pytest.skip("no make")
    scripts = {line.split(" -m ")[1].split()[0] for line in lines}
    assert scripts == {"bench.kernels", "bench.e2e", "bench.verify_cost", "bench.plot"}
    assert all("--results-dir runs/bench" in line for line in lines), lines
    # and git ignores what they write there
    probe = ["runs/bench/cpu-some-slug/cpu.json", "runs/bench/cpu-some-slug/cpu_time.png"]
    proc = subprocess.run(["git", "check-ignore", *probe], cwd=harness.REPO_ROOT,
                          capture_output=True, text=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.stdout.split() == probe


def test_make_bench_publish_and_out_write_where_asked():
    lines = _make_dry_run("bench-publish")
    if lines is None:
        pytest.skip("no make")
    assert len(lines) == 3 and all("--results-dir profiles" in line for line in lines), lines
    lines = _make_dry_run("bench-kernels", "OUT=/tmp/mine")
    assert len(lines) == 1 and "--results-dir /tmp/mine" in lines[0]


def test_results_dir_roots_the_results_and_plots(tmp_path, capsys):
    assert harness.results_path("dev", "e2e") == harness.PROFILES_DIR / "dev" / "e2e.json"
    assert harness.results_path("dev", "verify_cost", str(tmp_path)) == tmp_path / "dev" / "verify-cost.json"
    assert plot.main(["--results-dir", str(tmp_path)]) == 1  # nothing there yet: says so
    assert "no results files under" in capsys.readouterr().err


# ------------------------------------------------------------------------- failures, interruption, resume


def _tiny_sweep(tmp_path, vocabs=(111, 113)):
    spec = {"name": "tiny", "timing": {"warmup_ms": 0.0, "rep_ms": 0.0, "min_reps": 3},
            "head_configs": {},
            "kernels": {"cape_topk": {"dtype": ["float32"], "vocab": list(vocabs), "k": [2],
                                      "rows": [1]}}}
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps(spec))
    return sweeps.load_sweep(p)


@pytest.fixture
def counted_timing(monkeypatch):
    """harness.time_fn counting its calls; raises KeyboardInterrupt (a run stopped from outside)
    at call number ``stop_at`` when that is set. The copy bandwidth is a constant."""
    real = harness.time_fn
    state = {"calls": 0, "stop_at": None}

    def timing(fn, inputs, device, **kw):
        state["calls"] += 1
        if state["calls"] == state["stop_at"]:
            raise KeyboardInterrupt("time limit")
        return real(fn, inputs, device, **kw)

    monkeypatch.setattr(harness, "time_fn", timing)
    monkeypatch.setattr(harness, "copy_bandwidth", lambda device, **kw: 10.0)
    return state


def test_interrupted_sweep_keeps_finished_rows_and_resumes(tmp_path, counted_timing):
    sweep, cpu, out = _tiny_sweep(tmp_path), torch.device("cpu"), tmp_path / "res" / "tiny.json"
    counted_timing["stop_at"] = 4  # 3 impls per case: the first timing of the 2nd case
    with pytest.raises(KeyboardInterrupt):
        kernels.run_sweep(sweep, cpu, progress=False, out=out)
    kept = harness.read_results(out)
    assert kept["meta"]["complete"] is False
    assert [(r["shape"]["vocab"], r["status"]) for r in kept["rows"]] == [(111, "ok")] * 3
    assert not list(out.parent.glob("*.tmp"))  # written by rename

    counted_timing.update(calls=0, stop_at=None)
    rows, meta = kernels.run_sweep(sweep, cpu, progress=False, out=out)
    assert counted_timing["calls"] == 3  # only the 2nd case ran
    assert meta["complete"] is True and meta["resumed_cases"] == 1
    assert [r["shape"]["vocab"] for r in rows] == [111] * 3 + [113] * 3
    back = harness.read_results(out)
    assert back["rows"][:3] == kept["rows"] and back["meta"]["complete"] is True

    # a case with some of its rows missing runs again, without duplicate rows
    partial = dict(back, meta=dict(back["meta"], complete=False), rows=back["rows"][:-1])
    out.write_text(json.dumps(partial))
    counted_timing["calls"] = 0
    rows, meta = kernels.run_sweep(sweep, cpu, progress=False, out=out)
    assert counted_timing["calls"] == 3 and meta["resumed_cases"] == 1
    assert [(r["shape"]["vocab"], r["impl"]) for r in rows] == [(v, r["impl"]) for v in (111, 113)
                                                                for r in back["rows"][:3]]

    # a finished file is not resumed: the next run starts over; so does --fresh (resume=False)
    counted_timing["calls"] = 0
    kernels.run_sweep(sweep, cpu, progress=False, out=out)
    assert counted_timing["calls"] == 6
    counted_timing.update(calls=0, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        kernels.run_sweep(sweep, cpu, progress=False, out=out)
    counted_timing.update(calls=0, stop_at=None)
    kernels.run_sweep(sweep, cpu, progress=False, out=out, resume=False)
    assert counted_timing["calls"] == 6


def test_resume_needs_the_same_code(tmp_path, counted_timing, monkeypatch):
    sweep, cpu, out = _tiny_sweep(tmp_path), torch.device("cpu"), tmp_path / "tiny.json"
    counted_timing["stop_at"] = 4
    with pytest.raises(KeyboardInterrupt):
        kernels.run_sweep(sweep, cpu, progress=False, out=out)
    counted_timing.update(calls=0, stop_at=None)
    monkeypatch.setattr(harness, "git_sha", lambda short=False: "another")
    _, meta = kernels.run_sweep(sweep, cpu, progress=False, out=out)
    assert counted_timing["calls"] == 6 and meta["resumed_cases"] == 0


@pytest.mark.parametrize("failing, status", [("torch-softmax-topk", "skipped"),
                                             ("reference", "skipped"),
                                             ("glide:torch-fallback", "error")])
def test_failing_impl_is_a_row_with_its_reason(tmp_path, counted_timing, monkeypatch, failing,
                                               status):
    real = kernels.impls_for

    def boom(x):
        raise RuntimeError("no kernel config fits this shape")

    def impls_for(case, device):
        impls = real(case, device)
        for impl in impls:
            if impl.name == failing:
                impl.call = boom
        return impls

    monkeypatch.setattr(kernels, "impls_for", impls_for)
    out = tmp_path / "tiny.json"
    rows, meta = kernels.run_sweep(_tiny_sweep(tmp_path), torch.device("cpu"), progress=False,
                                   out=out)
    assert len(rows) == 6 and meta["complete"]  # the sweep went on to the 2nd case
    for r in rows:
        if r["impl"] == failing:
            assert r["status"] == status and r["median_ms"] is None
            assert r["note"] == "RuntimeError: no kernel config fits this shape"
        else:
            assert r["status"] == "ok" and r["median_ms"] > 0
            if failing == "reference":  # nothing to compare with, and the row says so
                assert r["max_abs_err"] is None and "the reference failed" in r["note"]
    assert harness.read_results(out)["rows"] == json.loads(json.dumps(rows))


def test_case_whose_inputs_fail_is_skipped(counted_timing, monkeypatch):
    def no_memory(case, device, seed=0):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels, "make_inputs", no_memory)
    case = dict(kernel="cape_topk", dtype="float32", vocab=111, k=2, rows=1)
    rows = kernels.run_case(case, torch.device("cpu"), 10.0, {})
    assert [r["status"] for r in rows] == ["skipped"] * 3
    assert all(r["note"] == "inputs: OutOfMemoryError: CUDA out of memory" for r in rows)


# ------------------------------------------------------------------------- flex_attention


FLEX_CASE = dict(kernel="tree_attention", dtype="float32", heads_name="t", num_q_heads=4,
                 num_kv_heads=2, head_dim=8, batch=2,
                 tree={"kind": "cape", "spine": 2, "leaves": 1}, context=5)


def _flex_run(flex):
    """The flex baseline of FLEX_CASE on the CPU with ``flex`` in place of the compiled one."""
    from glide.kernels import reference as ref

    impl = kernels._flex_impl(torch.device("cpu"), flex=flex)
    x = kernels.make_inputs(FLEX_CASE, torch.device("cpu"))
    args = [impl.prepare(c) for c in (x, {k: v.clone() for k, v in x.items()})]
    assert args[0][3] is args[1][3]  # one block mask for every input copy
    want = ref.tree_attention_ref(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"],
                                  x["tree_mask"])
    return impl, impl.call(args[0]), want


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_baseline_masks_like_the_reference():
    from torch.nn.attention.flex_attention import flex_attention

    impl, out, want = _flex_run(flex_attention)  # eager: the maths of the compiled baseline
    assert (out - want).abs().max() < 1e-5
    assert impl.config == {"kernel_options": None}


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
def test_flex_baseline_retries_on_its_main_kernel():
    from torch.nn.attention.flex_attention import flex_attention

    seen = []

    def no_decoding_config(*a, kernel_options=None, **kw):
        seen.append(kernel_options)
        if not kernel_options:
            raise RuntimeError("NoValidChoicesError: No choices to select")
        return flex_attention(*a, kernel_options=kernel_options, **kw)

    impl, out, want = _flex_run(no_decoding_config)
    assert (out - want).abs().max() < 1e-5
    assert impl.config["kernel_options"] == kernels.FLEX_RETRY_OPTIONS
    assert "NoValidChoicesError" in impl.config["default_options_error"]
    impl.call(impl.prepare(kernels.make_inputs(FLEX_CASE, torch.device("cpu"))))
    assert seen == [None, kernels.FLEX_RETRY_OPTIONS, kernels.FLEX_RETRY_OPTIONS]  # chosen once

    def never(*a, **kw):
        raise RuntimeError("NoValidChoicesError")

    with pytest.raises(RuntimeError, match="default options: .*FORCE_USE_FLEX_ATTENTION"):
        _flex_run(never)


def test_flex_recompile_limit_is_raised():
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    acc = "accumulated_" + name
    # config.patch, not monkeypatch: undoing a monkeypatch on torch's config module hides the
    # entry (torch._dynamo then fails with "recompile_limit does not exist")
    with dynamo_config.patch({name: 8, acc: getattr(dynamo_config, acc)}):
        assert kernels._raise_recompile_limit(512)[name] == 512
        assert getattr(dynamo_config, name) == 512
    with dynamo_config.patch({name: 1000, acc: getattr(dynamo_config, acc)}):
        assert kernels._raise_recompile_limit(512)[name] == 1000  # never lowered
    assert hasattr(dynamo_config, name)


def test_draft_eval_tree_specs_take_a_lookup_option():
    from bench.draft_eval import main, split_tree

    assert split_tree("dynamic,lookup=0") == ("dynamic", 0, None)
    assert split_tree("dynamic-always") == ("dynamic-always", None, None)
    assert split_tree("dynamic,ngrams=0,lookup=4") == ("dynamic", 4, False)
    assert split_tree("") == ("chain", None, None) and split_tree(None) == (None, None, None)
    for bad in ("chain,lookup=2", "dynamic,lookup=-1", "dynamic,depth=3", "bushy", "cape,ngrams=1",
                "dynamic,ngrams=yes"):
        with pytest.raises(ValueError):
            split_tree(bad)
    with pytest.raises(SystemExit):
        main(["--drafts", "x=some/path:dynamic,lookup=two"])


def test_draft_eval_reports_whether_the_n_gram_table_was_in_reach(tmp_path):
    import shutil

    from bench.draft_eval import _ngrams_used
    from glide.api import check_draft_applies

    shipped = check_draft_applies("glide", None)
    assert _ngrams_used(None, "dynamic", None, None) is True
    assert _ngrams_used(None, "dynamic", None, False) is False
    assert _ngrams_used(None, "dynamic", 0, None) is None and _ngrams_used(None, "chain", None, None) is None
    bare = tmp_path / "bare"
    shutil.copytree(shipped, bare, ignore=shutil.ignore_patterns("ngrams.npz"))
    assert _ngrams_used(bare, "dynamic-always", None, None) is False


def test_ab_configs_parse():
    from bench.ab import parse_config

    ar = parse_config("ar")
    assert (ar["name"], ar["method"], ar["tree"], ar["attrs"]) == ("ar", "ar", None, {})
    cfg = parse_config("d=glide:dynamic,lookup=4,ngrams=0,depth=3,min_expand=0.1")
    assert (cfg["tree"], cfg["lookup"], cfg["ngrams"], cfg["fallback"]) == ("dynamic", 4, False, True)
    assert cfg["attrs"] == {"depth": 3, "min_expand": 0.1}
    always = parse_config("a=cape@runs/x/draft:dynamic-always")
    assert (always["method"], always["draft"], always["tree"], always["fallback"]) == \
        ("cape", "runs/x/draft", "dynamic", False)
    assert parse_config("c=glide")["tree"] is None
    for bad in ("x=foo", "x=ar:dynamic", "lookup:chain", "x=glide:bushy", "x=glide:dynamic,depth",
                "x=glide:dynamic,depth=three", "=glide", "x=glide:chain,lookup=2", "x=glide:dynamic,lookup=-1"):
        with pytest.raises(ValueError, match="config"):
            parse_config(bad)


def test_ab_rows_by_hand():
    from bench.ab import _rows

    totals = {"ar": dict(tokens=100, forwards=100, seconds=4.0, same=0, prompts=2),
              "d": dict(tokens=90, forwards=30, seconds=2.0, same=1, prompts=2)}
    ar, d = _rows(totals, "ar")
    assert ar["ratio"] == 1.0 and ar["identical_to_first"] is None and ar["mean_accepted"] == 1.0
    assert d["mean_accepted"] == 3.0 and d["tokens_per_s"] == 45.0 and d["ratio"] == 45.0 / 25.0
    assert d["identical_to_first"] == 1
    assert _rows(totals, "ar", greedy=False)[1]["identical_to_first"] is None  # sampled: not counted


def test_ab_options_rebuild_the_draft_with_constructor_arguments(tmp_path):
    from bench.ab import _factory, main, parse_config
    from glide.draft.dynamic import DynamicTreeDraft
    from glide_helpers import trained_pair

    target, _, _ = trained_pair(str(tmp_path))
    path = tmp_path / "run" / "draft"
    plain = _factory(parse_config(f"d=glide@{path}:dynamic,lookup=2"), target, 0.0)()
    make = _factory(parse_config(f"d=glide@{path}:dynamic,depth=9,growth_check=False,lookup=2"), target, 0.0)
    draft, again = make(), make()
    assert isinstance(draft, DynamicTreeDraft) and again is not draft  # a fresh draft each call
    assert again.model is draft.model  # built from weights loaded once
    assert (draft.depth, draft.growth_check, draft.lookup) == (9, False, 2)
    assert (plain.depth, plain.growth_check, plain._reach, draft._reach) == (6, True, 6, 9)  # derived anew
    assert draft.fallback == plain.fallback and draft.calibration == plain.calibration
    assert again.calibration is draft.calibration and again.ngrams is draft.ngrams  # loaded once
    assert _factory(parse_config("ar"), target, 0.0)() is None
    with pytest.raises(ValueError, match="no argument 'bushiness'"):
        _factory(parse_config(f"d=glide@{path}:dynamic,bushiness=3"), target, 0.0)
    with pytest.raises(ValueError, match="depth"):
        _factory(parse_config(f"d=glide@{path}:dynamic,depth=0"), target, 0.0)
    with pytest.raises(SystemExit):
        main(["ar", "ar"])  # two configurations of one name


@pytest.mark.parametrize("keep", [False, True])
def test_ab_keeps_one_draft_per_configuration_only_when_asked(tmp_path, monkeypatch, keep):
    import types

    import glide.speculative.engine as engine
    from bench import ab
    from glide import api

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    monkeypatch.setattr(api, "load", lambda *a, **k: (types.SimpleNamespace(config=None), None))
    monkeypatch.setattr(api, "encode_chat", lambda tok, text: [1, 2])
    monkeypatch.setattr(api, "eos_ids", lambda config, tok: ())
    made = []

    def factory(cfg, target, temperature):
        if cfg["method"] == "ar":
            return lambda: None

        def make():
            made.append(object())
            return made[-1]
        return make
    monkeypatch.setattr(ab, "_factory", factory)
    used = []

    sizes = []

    def fake_generate(target, batch, draft=None, **kw):
        used.append(draft)
        sizes.append(len(batch))
        return [types.SimpleNamespace(output_ids=[1, 2, 3], target_forwards=2, seconds=0.5 + 0.25 * i)
                for i in range(len(batch))]
    monkeypatch.setattr(engine, "generate_ids", fake_generate)
    configs = [ab.parse_config("ar"), ab.parse_config("d=glide:dynamic")]
    rows, out = ab.run(configs, prompts, out=tmp_path / "ab.json", progress=False, keep_drafts=keep)
    drafts = [d for d in used[2:] if d is not None]  # after the two warm-up calls
    assert len(drafts) == 3
    assert (len(set(map(id, drafts))) == 1) == keep  # one draft for every prompt, or a fresh one each
    assert json.loads(out.read_text())["meta"]["keep_drafts"] is keep
    assert rows[1]["mean_accepted"] == 1.0 and rows[1]["prompts"] == 3
    # batches of 2: each batch through both configurations, its time the slowest row's
    used.clear(), sizes.clear()
    rows, out = ab.run(configs, prompts, out=tmp_path / "ab2.json", progress=False, keep_drafts=keep, batch_size=2)
    assert sizes == [1, 1, 2, 2, 1, 1]  # warm-up, then [q0, q1] and [q2] through ar and d in turn
    assert rows[1]["prompts"] == 3 and rows[1]["tokens"] == 6 and rows[1]["decode_seconds"] == 0.75 + 0.5
    with pytest.raises(ValueError, match="batch_size"):
        ab.run(configs, prompts, out=tmp_path / "ab3.json", progress=False, batch_size=0)
