"""Host cost of the engine's AR decode step, the target's forward left out.

``python -m bench.engine_overhead [--device cpu|cuda] [--batch-sizes 1 4 8] [--out FILE]``

What is timed: :func:`glide.speculative.engine.generate_ids` without a draft, on a tiny random
Llama whose ``decode`` is replaced by a stub that commits the cache and returns a fixed
logits tensor plus the fed tokens (one op). What remains is the engine's own work per step:
the greedy pick, the emit (EOS and length bookkeeping, the token write), the step's one host
read and its Python loop. On a GPU that work sits between two forwards of a CUDA-graph decode,
so it bounds how close ``ar`` gets to the forward's own rate.

Rows compare the two emits the engine has: ``emit_one`` (the AR step's) and the general
``emit`` with every count 1 (what the AR step used before), interleaved in one run. Each row:
median and 20th/80th percentiles, in microseconds per decode step (one token for each of the
batch's sequences), over ``--samples`` runs of ``--tokens`` steps. ``--out`` defaults to
``runs/bench/engine-overhead.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import harness

DEFAULT_OUT = Path("runs/bench/engine-overhead.json")
EMITS = ("emit", "emit_one")


def _tiny_model(device):
    from glide.model import LlamaModel, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=4096, eos_token_ids=(2,))
    torch.manual_seed(0)
    return LlamaModel(cfg, dtype=torch.float32, device=device, init_std=0.3)


def run(device, batch_sizes, tokens, samples):
    import glide.speculative.engine as engine

    model = _tiny_model(device)
    emit_one = engine._Batch.emit_one

    def general(self, new):
        return self.emit(new, torch.ones(new.shape[0], dtype=torch.int64, device=new.device))

    rows = []
    try:
        for B in batch_sizes:
            logits = torch.randn(B, model.config.vocab_size, device=device)

            def decode(ids, cache, logits=logits):
                cache.commit(1)
                return logits + ids[:, None]

            model.decode = decode
            prompts = [[1, 5, 7, 9]] * B
            times = {name: [] for name in EMITS}
            for i in range(samples + 1):  # the first round warms up
                for name, fn in (("emit", general), ("emit_one", emit_one)):
                    engine._Batch.emit_one = fn
                    t0 = time.perf_counter()
                    engine.generate_ids(model, prompts, None, max_new_tokens=tokens, eos_token_ids=(999,),
                                        cuda_graphs=False)
                    if i:
                        times[name].append(1e3 * (time.perf_counter() - t0) / tokens)
            for name in EMITS:
                med, lo, hi = (1e3 * x for x in harness._quantiles(times[name]))
                rows.append(dict(emit=name, batch_size=B, tokens=tokens, samples=samples,
                                 us_per_step=med, us_p20=lo, us_p80=hi))
    finally:
        engine._Batch.emit_one = emit_one
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--tokens", type=int, default=1000, help="decode steps per sample (default: 1000)")
    p.add_argument("--samples", type=int, default=7)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    if a.tokens < 2 or a.samples < 1 or min(a.batch_sizes) < 1:
        p.error("--tokens must be >= 2, --samples and --batch-sizes >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device = torch.device(a.device)
    rows = run(device, a.batch_sizes, a.tokens, a.samples)
    meta = dict(harness.environment(device, "engine-overhead"), how=__doc__.split("\n\n", 1)[1],
                torch_threads=torch.get_num_threads())
    harness.write_results(a.out, rows, meta)
    for r in rows:
        print(f"batch {r['batch_size']}  {r['emit']:8s} {r['us_per_step']:7.1f} us/step "
              f"(p20 {r['us_p20']:.1f}, p80 {r['us_p80']:.1f})")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
