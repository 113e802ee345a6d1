"""Everything a session lent a CUDA GPU measures, in one command that writes as it goes.

    python -m bench.gpu_check [--out DIR] [--steps copy forward e2e tree launch hf_compile tests]
                              [--budget-s 420] [--smoke]

Steps, in order (each row is appended to ``DIR/gpu-check.json`` the moment it is measured, so
a run stopped at a time limit keeps what it finished):

- ``copy``: device-to-device copy bandwidth (bytes read + written), the ceiling for the rest.
- ``forward``: one target forward, random weights in the embedded model's shape (SmolLM2-135M)
  and a 1B Llama shape, eager vs replayed from a CUDA graph (:mod:`glide.model.graphs`), at
  batch 1 and 8, T = 1 and 16, ctx 512, with the fused elementwise kernels off and on (and how
  far the fused logits are from the unfused ones).
- ``e2e``: tokens/s of ``ar`` eager and graphed, of an oracle draft (chain of 4, always right:
  the verification path at a mean acceptance of 5), of a random GliDe draft (the draft's own
  steps, captured when graphed), of the dynamic tree on that random draft (it loses, so it
  pauses: the paused steps' one-slot forwards, and how many steps paused), and of
  transformers' ``generate()`` on the same shape, batch 1 and 8, 128 new tokens after
  128-token prompts. Every speculative row says whether its tokens equal ``ar``'s.
- ``tree``: tree attention GPU time (a CUDA graph over input copies that overflow L2) by tree
  size T at ctx 8k and 32k, Llama-8B heads (group 4) and SmolLM2 heads (group 3), plus groups
  1-8 at T = 64; the launcher's defaults against the pre-fix split policy (64-row tiles)
  and, past 64 query rows per KV head, against 64- and 128-row tiles (``max_block_m``), in GB/s.
- ``launch``: host time per eager launcher call (what an eager decoder pays) with and without
  the length check, and through the ``torch.ops.glide`` custom op when it exists; and the
  engine's own work per AR step with the forward stubbed (:mod:`bench.engine_overhead`).
- ``hf_compile``: transformers with a static cache and ``torch.compile`` (the strongest setup a
  user would pick), batch 1, SmolLM2 shape; skipped when the budget is short.
- ``tests``: ``GLIDE_TEST_COMPILED=1 pytest tests -m "not slow"``, log in DIR/tests.log.

``--smoke`` runs tiny shapes on whatever device there is (the CPU here), to test the script.
The last lines printed are a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("copy", "forward", "e2e", "tree", "launch", "hf_compile", "tests")

SHAPES = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied)
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, 64, True),
    "llama-1b": (128256, 2048, 8192, 16, 32, 8, 64, True),
    "tiny": (512, 64, 128, 2, 4, 2, 16, True),
}


class Recorder:
    """Rows by step, rewritten to ``path`` after every row (:func:`bench.harness.write_results`:
    ``meta`` holds the environment and the ``errors``; a kill mid-write leaves the last file)."""

    def __init__(self, path: Path, env: dict):
        self.path = path
        self.rows: list[dict] = []
        self.meta = dict(env, errors=[])
        self.t0 = time.perf_counter()
        self.flush()

    def add(self, step: str, **row):
        row = {"step": step, **row}
        self.rows.append(row)
        self.flush()
        print(json.dumps(row), flush=True)

    def error(self, step: str, exc: BaseException):
        msg = f"{type(exc).__name__}: {exc}"[:2000]
        self.meta["errors"].append({"step": step, "error": msg, "trace": traceback.format_exc()[-4000:]})
        self.flush()
        print(f"[{step}] ERROR {msg}", flush=True)

    def flush(self):
        from bench.harness import write_results

        write_results(self.path, self.rows, self.meta)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def wall_us(fn, dev, n: int, warmup: int = 3) -> float:
    """Mean wall-clock µs per call of ``fn`` over ``n`` back-to-back calls (host + device)."""
    from bench.launch_overhead import time_per_call

    return time_per_call(fn, dev, calls=n, samples=1, warmup=warmup)["us_median"]


def graph_us(fns, dev, reps: int = 10) -> float:
    """GPU µs per call: ``fns`` (one closure per input copy) captured in one CUDA graph
    (:class:`glide.model.graphs.CapturedCall`), replayed ``reps`` times, median of 5 timings.
    Off CUDA, the wall time of calling them."""
    if dev.type != "cuda":
        return wall_us(lambda: [f() for f in fns], dev, 2, 1) / len(fns)
    from glide.model.graphs import CapturedCall

    call = CapturedCall(lambda: [f() for f in fns], True, dev)
    call.run()  # warm-up on a side stream, capture, one replay
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            call.graph.replay()
        b.record()
        torch.cuda.synchronize(dev)
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    return sorted(times)[2]


def _config(shape: str, max_pos: int):
    from glide.model import ModelConfig

    v, h, i, n, hq, hkv, d, tied = SHAPES[shape]
    return ModelConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_layers=n, num_heads=hq,
                       num_kv_heads=hkv, head_dim=d, max_position_embeddings=max_pos,
                       tie_word_embeddings=tied, rope_theta=10000.0)


def _model(shape, dev, dtype, max_pos=4096):
    from glide.model import LlamaModel

    torch.manual_seed(0)
    model = LlamaModel(_config(shape, max_pos), dtype=dtype, device=dev, init_std=0.02)
    if dev.type != "cuda":  # --smoke: the PyTorch attention, also under TRITON_INTERPRET=1
        model.attn_backend = "reference"
    return model


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------------------------ steps


def step_copy(rec, dev, smoke):
    from bench.harness import copy_bandwidth

    gbps = copy_bandwidth(dev, nbytes=(16 << 20) if smoke else None)
    rec.add("copy", gbps=gbps)
    return gbps


def step_forward(rec, dev, dtype, smoke):
    """Eager vs graphed forwards, with the fused elementwise kernels on and off
    (``LlamaModel.fused_kernels``); each fused row also says how far its logits are from the
    unfused forward's on the same inputs and cache."""
    from glide.model.graphs import CudaGraphs

    shapes = ["tiny"] if smoke else ["smollm2-135m", "llama-1b"]
    ctx = 64 if smoke else 512
    for shape in shapes:
        model = _model(shape, dev, dtype)
        for B in (1, 8):
            for T in (1, 16):
                ids = torch.randint(0, model.config.vocab_size, (B, T), device=dev)
                mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(B, T, T).contiguous()
                logits = {}
                for fused in (False, True):
                    model.fused_kernels = fused
                    graphs = CudaGraphs(model, capture=dev.type == "cuda")
                    cache = graphs.new_cache(B, ctx + 64)
                    torch.manual_seed(7)
                    cache.kv.normal_()
                    cache.commit(ctx)
                    pos = cache.lens[:, None] + torch.arange(T, device=dev)
                    logits[fused] = model.forward(ids, pos, mask, cache)
                    n = 3 if smoke else 30
                    eager = wall_us(lambda: model.forward(ids, pos, mask, cache), dev, n)
                    graphed = wall_us(lambda: graphs.forward(ids, pos, mask, cache), dev, n)
                    g = graphs._graphs[(cache, B, T, False, False)]  # (cache, batch, bucket, last only, hidden)
                    replay = (wall_us(g.graph.replay, dev, n) if g.graph is not None else None)
                    diff = None
                    if fused:
                        ref = logits[False].double()
                        diff = float((logits[True].double() - ref).norm() / ref.norm())
                    rec.add("forward", shape=shape, batch=B, T=T, ctx=ctx, fused=fused, eager_us=eager,
                            graphed_us=graphed, replay_us=replay, rel_diff_vs_unfused=diff,
                            weight_bytes=_weight_bytes(model))
                    del graphs, cache
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _hf_model(shape, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    v, h, i, n, hq, hkv, d, tied = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                      num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
                      max_position_embeddings=4096, tie_word_embeddings=tied, bos_token_id=None,
                      eos_token_id=None, pad_token_id=0)
    # sdpa named explicitly, and recorded with each row: on the H100 (transformers 5.17) the
    # default setup ran 12.8 tok/s for both shapes, 78 ms a token whatever the model size, a
    # cause not found (an attention implementation that recompiles per length is one guess).
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg).to(dtype)
    m.eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def _hf_tok_s(m, prompts, new, dev):
    ids = torch.tensor(prompts, device=dev)
    att = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        m.generate(ids, attention_mask=att, **dict(kw, max_new_tokens=4, min_new_tokens=4))
        _sync(dev)
        t0 = time.perf_counter()
        out = m.generate(ids, attention_mask=att, **kw)
        _sync(dev)
    wall = time.perf_counter() - t0
    made = out.shape[1] - ids.shape[1]
    return len(prompts) * made / wall, made


def step_e2e(rec, dev, dtype, smoke):
    from glide.speculative.drafts import OracleDraft
    from glide.speculative.engine import generate_ids

    shapes = ["tiny"] if smoke else ["smollm2-135m", "llama-1b"]
    new, plen = (16, 16) if smoke else (128, 128)
    from glide.draft import GlideDraft, GlideDraftModel, new_draft_config
    from glide.draft.dynamic import DynamicTreeDraft

    for shape in shapes:
        model = _model(shape, dev, dtype)
        bound = None
        if dev.type == "cuda":
            bound = 1e-9 * _weight_bytes(model)
        # A random one-layer GliDe draft: rejected almost always, but it times the draft's own
        # steps (captured as one graph a generation when graphed) and checks the tokens.
        torch.manual_seed(1)
        net = GlideDraftModel(new_draft_config(model, num_layers=1), dtype=dtype, device=dev,
                              init_std=0.02).attach(model)
        # The same with the hidden input (the target's final hidden states kept per position,
        # returned by graphs of their own when graphed), its glimpse random, not zero.
        net_h = GlideDraftModel(new_draft_config(model, num_layers=1, hidden_input=True), dtype=dtype, device=dev,
                                init_std=0.02).attach(model)
        with torch.no_grad():
            torch.nn.init.normal_(net_h.hidden_proj.weight, std=0.02)
        if dev.type != "cuda":
            net.attn_backend = net_h.attn_backend = "reference"
        hf, hf_error = None, None  # transformers' model of the shape, built at its first use
        for B in (1, 8):
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, model.config.vocab_size, (B, plen), generator=g).tolist()

            def run(draft=None, graphs=None):
                _sync(dev)
                t0 = time.perf_counter()
                outs = generate_ids(model, prompts, draft, max_new_tokens=new, cuda_graphs=graphs)
                _sync(dev)
                wall = time.perf_counter() - t0
                toks = sum(len(o.output_ids) for o in outs)
                decode = max(o.seconds for o in outs)
                mat = sum(sum(o.accepted) for o in outs) / max(1, sum(len(o.accepted) for o in outs))
                return outs, toks / wall, (toks - B) / decode, mat

            gr = None if dev.type == "cuda" else False
            for label, graphs in (("eager", False), ("graphed", gr)):
                run(None, graphs)  # warm-up: Triton compiles, graphs captured
                outs, tps_wall, tps_decode, _ = run(None, graphs)
                rec.add("e2e", shape=shape, batch=B, method="ar", mode=label, tok_s_wall=tps_wall,
                        tok_s_decode=tps_decode, new_tokens=new, prompt_len=plen)
            refs = [o.output_ids for o in outs]
            for label, graphs in (("eager", False), ("graphed", gr)):
                run(OracleDraft(refs, 4, width=1), graphs)
                outs2, tps_wall, tps_decode, mat = run(OracleDraft(refs, 4, width=1), graphs)
                same = [o.output_ids for o in outs2] == refs
                rec.add("e2e", shape=shape, batch=B, method="oracle-chain4", mode=label,
                        tok_s_wall=tps_wall, tok_s_decode=tps_decode, mean_accepted=mat,
                        same_tokens_as_ar=same, new_tokens=new, prompt_len=plen)
            for method, n in (("glide-random-draft", net), ("glide-random-hidden", net_h)):
                for label, graphs in (("eager", False), ("graphed", gr)):
                    run(GlideDraft(n, 4), graphs)
                    outs3, tps_wall, tps_decode, mat = run(GlideDraft(n, 4), graphs)
                    rec.add("e2e", shape=shape, batch=B, method=method, mode=label,
                            tok_s_wall=tps_wall, tok_s_decode=tps_decode, mean_accepted=mat,
                            same_tokens_as_ar=[o.output_ids for o in outs3] == refs, new_tokens=new,
                            prompt_len=plen)
            # The dynamic tree on the same random draft: its drafted steps lose, so it pauses,
            # and the paused steps run as one-slot forwards (the graphed engine's bucket 1).
            # Fresh trees: one keeps what its pause policy learnt across generations.
            def tree():
                return DynamicTreeDraft(net, depth=4, top_k=4, beam=2, max_nodes=16)

            for label, graphs in (("eager", False), ("graphed", gr)):
                run(tree(), graphs)
                dyn = tree()
                outs4, tps_wall, tps_decode, mat = run(dyn, graphs)
                rec.add("e2e", shape=shape, batch=B, method="glide-random-dynamic", mode=label,
                        tok_s_wall=tps_wall, tok_s_decode=tps_decode, mean_accepted=mat,
                        same_tokens_as_ar=[o.output_ids for o in outs4] == refs, new_tokens=new,
                        prompt_len=plen, steps=len(dyn.sizes), paused_steps=dyn.skipped,
                        **_step_ms(dyn))
            if hf_error is None:
                try:
                    hf = hf or _hf_model(shape, dev, dtype)
                    tps, made = _hf_tok_s(hf, prompts, new, dev)
                    rec.add("e2e", shape=shape, batch=B, method="hf", mode="generate", tok_s_wall=tps,
                            new_tokens=made, prompt_len=plen,
                            attn_implementation=getattr(hf.config, "_attn_implementation", None))
                except Exception as exc:  # noqa: BLE001 - recorded once, the sweep goes on
                    hf_error = exc
                    rec.error("e2e-hf", exc)
        del net, net_h, hf
        if bound:
            rec.add("e2e", shape=shape, weight_gb=bound,
                    note="weight-streaming bound: copy GB/s / 2 / weight GB tokens/s at batch 1")
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _step_ms(dyn) -> dict:
    """Median wall ms of the dynamic tree's measured drafted and paused steps (None if none)."""
    import statistics

    return {f"{kind}_step_ms": (statistics.median(dyn.step_seconds[k]) * 1e3 if dyn.step_seconds[k] else None)
            for kind, k in (("drafted", True), ("paused", False))}


def _old_splits(cfg, B, T, Hq, Hkv, max_keys, num_sms):
    """The split count of the heuristic before the fix (it divided the SMs by the M tiles too)."""
    m_tiles = math.ceil(T * (Hq // Hkv) / cfg.block_m)
    base = B * Hkv * m_tiles
    n_tiles = math.ceil(max(max_keys, 1) / cfg.block_n)
    return max(1, min(math.ceil(num_sms / base), n_tiles // 2, 64))


def step_tree(rec, dev, dtype, copy_gbps, smoke):
    from glide.kernels import attention_config, tree_attention

    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size if dev.type == "cuda" else 1 << 20
    heads = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
    ctxs = [256] if smoke else [8192, 32768]
    Ts = [1, 17] if smoke else [1, 2, 4, 8, 16, 17, 24, 32, 48, 64]
    cases = [(h, c, T) for c in ctxs for h in heads for T in Ts]
    if not smoke:  # GQA groups 1-8 at T=64, ctx 8k, 8 KV heads of 128
        for g in (1, 2, 8):
            heads[f"group{g}"] = (8 * g, 8, 128)
            cases.append((f"group{g}", 8192, 64))
    backend = "auto" if dev.type == "cuda" else "reference"
    for name, ctx, T in cases:
        Hq, Hkv, D = heads[name]
        B = 1
        kv_bytes = 2 * B * Hkv * (ctx + T) * D * 2
        copies = 1 if smoke else max(1, min(8, math.ceil(2 * l2 / kv_bytes)))
        sets = []
        for _ in range(copies):
            k = torch.randn(B, Hkv, ctx + T, D, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype)
            mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None].contiguous()
            lens = torch.full((B,), ctx, dtype=torch.int64, device=dev)
            out = torch.empty_like(q)
            sets.append((q, k, v, lens, mask, out))
        nbytes = kv_bytes + 2 * q.numel() * q.element_size() + mask.numel()
        cfg = attention_config(B, T, Hq, Hkv, D, ctx + T, dtype=dtype, device=dev)
        # the pre-fix split policy ran 64-row tiles: its split count and timing use those
        cfg64 = attention_config(B, T, Hq, Hkv, D, ctx + T, dtype=dtype, device=dev, max_block_m=64)
        old = _old_splits(cfg64, B, T, Hq, Hkv, ctx + T, num_sms)
        row = dict(heads=name, ctx=ctx, T=T, group=Hq // Hkv, bytes=nbytes, copies=copies,
                   config=cfg.as_dict(), old_splits=old)
        variants = [("default", None, None), ("old", old, 64)]
        if T * (Hq // Hkv) > 64:  # both tile heights past one 64-row tile (attention_config)
            variants += [("bm64", None, 64), ("bm128", None, 128)]
        for key, splits, max_bm in variants:
            if key == "old" and old == cfg.num_splits and cfg64 == cfg:  # the same launch
                row["old_us"], row["old_gbps"] = row.get("default_us"), row.get("default_gbps")
                continue
            fns = [lambda s=s, sp=splits, bm=max_bm: tree_attention(
                *s[:5], out=s[5], num_splits=sp, check_lens=False, backend=backend, max_block_m=bm)
                for s in sets]
            us = graph_us(fns, dev)
            row[f"{key}_us"], row[f"{key}_gbps"] = us, nbytes / us / 1e3
        if copy_gbps:
            row["default_frac_copy"] = row["default_gbps"] / copy_gbps
        rec.add("tree", **row)
        del sets


def step_launch(rec, dev, dtype, smoke):
    from glide.kernels import tree_attention

    Hq, Hkv, D, T, ctx = 9, 3, 64, 17, (128 if smoke else 2048)
    q = torch.randn(1, T, Hq, D, device=dev, dtype=dtype)
    k = torch.randn(1, Hkv, ctx + T, D, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None].contiguous()
    lens = torch.full((1,), ctx, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)
    n = 5 if smoke else 300
    backend = "auto" if dev.type == "cuda" else "reference"
    calls = {
        "launcher_checked": lambda: tree_attention(q, k, v, lens, mask, out=out, backend=backend),
        "launcher_nocheck": lambda: tree_attention(q, k, v, lens, mask, out=out, check_lens=False,
                                                   backend=backend),
    }
    try:
        from glide.kernels import ops  # noqa: F401 - registers torch.ops.glide

        op = torch.ops.glide.tree_attention
        calls["custom_op"] = lambda: op(q, k, v, lens, mask, None)
    except Exception as exc:  # noqa: BLE001
        rec.error("launch-custom-op", exc)
    for name, fn in calls.items():
        try:
            rec.add("launch", call=name, wall_us=wall_us(fn, dev, n, warmup=5),
                    gpu_us=graph_us([fn], dev) if name != "launcher_checked" else None,
                    shape=dict(T=T, ctx=ctx, heads=[Hq, Hkv, D]))
        except Exception as exc:  # noqa: BLE001
            rec.error(f"launch-{name}", exc)
    try:  # the engine's own work per AR step, the forward stubbed (bench.engine_overhead)
        from bench.engine_overhead import run as engine_overhead

        for row in engine_overhead(dev, [1, 8], 20 if smoke else 300, 2 if smoke else 5):
            rec.add("launch", call=f"engine_ar_step_{row['emit']}", batch_size=row["batch_size"],
                    wall_us=row["us_per_step"])
    except Exception as exc:  # noqa: BLE001
        rec.error("launch-engine", exc)


def step_hf_compile(rec, dev, dtype, smoke, budget_left):
    if budget_left < 250 and not smoke:  # leaves the tests about two minutes
        rec.add("hf_compile", skipped=f"only {budget_left:.0f} s of the budget left")
        return
    shape = "tiny" if smoke else "smollm2-135m"
    new, plen = (8, 8) if smoke else (128, 128)
    hf = _hf_model(shape, dev, dtype)
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    prompts = torch.randint(0, SHAPES[shape][0], (1, plen), generator=torch.Generator().manual_seed(1)).tolist()
    t0 = time.perf_counter()
    _hf_tok_s(hf, prompts, new, dev)  # compiles
    compile_s = time.perf_counter() - t0
    tps, made = _hf_tok_s(hf, prompts, new, dev)
    rec.add("hf_compile", shape=shape, batch=1, tok_s_wall=tps, new_tokens=made, first_calls_s=compile_s)


GPU_TESTS_FIRST = [f"tests/test_{n}.py" for n in (
    "cuda_graphs", "hf_adapter", "attention_kernels", "topk_kernel", "compact_kernel", "ops",
    "fused_layers", "norm_kernel", "rope_kernel", "activation_kernel", "launch_overhead", "engine",
    "glide_draft")]


def step_tests(rec, out_dir, budget_left, smoke):
    """The compiled-kernel tests, one line per test streamed to DIR/tests.log (a run killed at
    its limit keeps every result so far), a per-test timeout, and the failures' summary."""
    timeout = max(30, int(budget_left - 10))
    env = dict(os.environ, GLIDE_TEST_COMPILED="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", "-m", "not slow", "-v", "-rfE", "--tb=short",
           "-p", "no:cacheprovider", "--durations=20", "--junitxml", str(out_dir / "tests.xml")]
    if smoke:
        cmd += ["tests/test_cuda_graphs.py"]
    else:  # the files that exercise the GPU paths first: a run cut at its limit still has them
        rest = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        cmd += [f for f in GPU_TESTS_FIRST if f in rest] + [f for f in rest if f not in GPU_TESTS_FIRST]
        cmd += ["-n", "8", "--timeout=180"]
    t0 = time.perf_counter()
    log_path = out_dir / "tests.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
    lines = log_path.read_text(errors="replace").splitlines()
    failed = sorted({next(w for w in ln.split() if "::" in w) for ln in lines
                     if "::" in ln and ({"FAILED", "ERROR"} & set(ln.split()))})
    passed = sum(" PASSED" in ln for ln in lines)
    tail = [ln for ln in lines if ln.strip() and "Warning" not in ln][-1:] or [""]
    rec.add("tests", rc=rc, summary=tail[0], passed_lines=passed, failed=failed[:50],
            seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ main


def _summary(rec):
    rows = rec.rows
    print("\n== summary")
    for r in rows:
        s = r["step"]
        if "skipped" in r:
            print(f"{s}: skipped ({r['skipped']})")
        elif s == "copy":
            print(f"copy {r['gbps']:.0f} GB/s")
        elif s == "forward":
            rp = f"{r['replay_us']:.0f}" if r.get("replay_us") else "-"
            diff = f", logits rel diff {r['rel_diff_vs_unfused']:.1e}" if r.get("fused") else ""
            print(f"fwd {r['shape']} b{r['batch']} T{r['T']} fused={r.get('fused')}: eager "
                  f"{r['eager_us']:.0f} us, graphed {r['graphed_us']:.0f} us, replay {rp} us{diff}")
        elif s == "e2e" and "method" in r:
            extra = f" MAT {r['mean_accepted']:.2f}" if "mean_accepted" in r else ""
            if "paused_steps" in r:
                extra += f", paused {r['paused_steps']}/{r['steps']} steps"
                ms = [f"{k} {r[k + '_step_ms']:.2f} ms" for k in ("drafted", "paused") if r.get(k + "_step_ms")]
                extra += f" (median step: {', '.join(ms)})" if ms else ""
            if r.get("same_tokens_as_ar") is False:
                extra += ", TOKENS DIFFER FROM AR"
            print(f"e2e {r['shape']} b{r['batch']} {r['method']}/{r['mode']}: {r['tok_s_wall']:.0f} tok/s{extra}")
        elif s == "tree":
            bm = "".join(f", {n}-row tiles {r[f'bm{n}_gbps']:.0f}" for n in (64, 128) if f"bm{n}_gbps" in r)
            print(f"tree {r['heads']} ctx{r['ctx']} T{r['T']}: {r['default_us']:.1f} us "
                  f"{r['default_gbps']:.0f} GB/s (old splits {r.get('old_gbps') or 0:.0f}{bm})")
        elif s == "launch":
            batch = f" b{r['batch_size']}" if "batch_size" in r else ""
            print(f"launch {r['call']}{batch}: {r['wall_us']:.1f} us wall")
        elif s in ("hf_compile", "tests"):
            print(s, {k: v for k, v in r.items() if k != "step"})
    for e in rec.meta["errors"]:
        print("ERROR", e["step"], e["error"][:300])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check.json and logs")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds the whole run may take; late steps shrink or skip to fit")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (tests this script)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="model dtype (default bfloat16 on CUDA, float32 on the CPU); float32 tells "
                         "bf16 rounding apart from a logic error when speculative tokens differ from ar's")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not args.smoke:
        ap.error("bench.gpu_check needs a CUDA GPU (or --smoke to test the script on the CPU)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from bench.harness import environment

    rec = Recorder(out_dir / "gpu-check.json", environment(dev, "gpu-check"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    rec.meta["dtype"] = str(dtype).removeprefix("torch.")
    copy_gbps = None
    for step in args.steps:
        left = args.budget_s - rec.elapsed()
        if left <= 0:
            rec.add(step, skipped="budget spent")
            continue
        print(f"== {step} ({left:.0f} s left)", flush=True)
        try:
            if step == "copy":
                copy_gbps = step_copy(rec, dev, args.smoke)
            elif step == "forward":
                step_forward(rec, dev, dtype, args.smoke)
            elif step == "e2e":
                step_e2e(rec, dev, dtype, args.smoke)
            elif step == "tree":
                step_tree(rec, dev, dtype, copy_gbps, args.smoke)
            elif step == "launch":
                step_launch(rec, dev, dtype, args.smoke)
            elif step == "hf_compile":
                step_hf_compile(rec, dev, dtype, args.smoke, left)
            elif step == "tests":
                step_tests(rec, out_dir, left, args.smoke)
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others
            rec.error(step, exc)
    try:
        from bench.gpu_plots import plot_all

        for path in plot_all(rec.path):
            print("plot:", path)
    except Exception as exc:  # noqa: BLE001 - plots are a convenience; the rows are saved
        rec.error("plots", exc)
    _summary(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
