"""bench.step_ops: ops charged to the right phases, none lost, patches undone."""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glide.speculative.engine as engine
from bench import step_ops
from glide.model.cache import KVCache
from glide.speculative.drafts import OracleDraft
from glide.speculative.engine import generate_ids

from test_engine import PROMPTS, tiny_model


class _All(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_every_op_is_charged_once_and_the_patches_are_undone():
    model = tiny_model()
    prompt = PROMPTS[0]
    ar = generate_ids(model, [prompt], max_new_tokens=12)[0].output_ids
    originals = (engine.build_tree, engine.verify_greedy, engine._report, engine._Batch.emit,
                 engine._Batch.emit_one, KVCache.compact)
    res = step_ops.count_steps(model, [prompt], lambda: OracleDraft([ar], 3), 12)
    c = res["counter"]
    # the same run counted as a whole issues as many ops as the phases add up to
    whole = _All()
    with whole:
        out = generate_ids(model, [prompt], OracleDraft([ar], 3), max_new_tokens=12)[0]
    assert sum(c.ops.values()) == whole.n
    assert res["steps"] == out.target_forwards == 3 and res["tokens"] == 11  # 4 + 4 + 3 after the prefill
    # a verification step runs every engine phase; the oracle draft is not a network
    for phase in ("target", "draft", "engine.tree", "engine.verify", "engine.emit", "engine.compact",
                  "engine.report"):
        assert c.ops[phase] > 0, phase
    assert c.ops["draft.forward"] == 0 and c.ops["draft.lookup"] == 0
    assert set(c.ops) <= set(step_ops.PHASES)
    assert all(c.kernel_ops[p] <= c.ops[p] for p in c.ops)
    assert originals == (engine.build_tree, engine.verify_greedy, engine._report, engine._Batch.emit,
                         engine._Batch.emit_one, KVCache.compact)
    assert "forward" not in vars(model)  # the instance patch is gone too


def test_ar_has_no_draft_or_tree_ops_and_rows_are_per_step():
    model = tiny_model()
    res = step_ops.count_steps(model, PROMPTS[:2], lambda: None, 6)
    c = res["counter"]
    assert res["steps"] == 2 * 5
    assert not any(c.ops[p] for p in ("draft", "draft.forward", "engine.tree", "engine.verify", "engine.compact"))
    rows = {r["phase"]: r for r in step_ops._rows("ar", res)}
    assert rows["total"]["ops_per_step"] == sum(c.ops.values()) / 10
    assert rows["target"]["ops_per_step"] == c.ops["target"] / 10
    assert rows["total"]["mean_accepted"] == 1.0


def test_item_reads_are_counted():
    counter = step_ops.PhaseCounter()
    x = torch.arange(4)
    with counter:
        counter.phase("draft", lambda: float(x.max()))()
        x.sum().item()
    assert counter.item_reads == collections.Counter({"draft": 1, "other": 1})
    assert counter.ops["draft"] == 2 and counter.kernel_ops["draft"] == 2  # max, then the read
