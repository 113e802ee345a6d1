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


def test_timer_charges_each_phase_its_own_time_and_the_rest_to_other():
    now = [0.0]

    def tick(dt):
        now[0] += dt

    timer = step_ops.PhaseTimer(clock=lambda: now[0])

    def inner():
        tick(2.0)

    def outer():
        tick(1.0)
        timer.phase("draft.forward", inner)()
        tick(3.0)
        return "done"

    with timer:
        tick(0.5)
        assert timer.phase("draft", outer)() == "done"
        timer.phase("draft.forward", inner)()
        tick(0.25)
    assert timer.seconds == collections.Counter({"draft": 4.0, "draft.forward": 4.0, "other": 0.75})
    assert timer.calls == collections.Counter({"draft": 1, "draft.forward": 2})


def test_timer_keeps_time_when_a_phase_raises():
    now = [0.0]
    timer = step_ops.PhaseTimer(clock=lambda: now[0])

    def boom():
        now[0] += 1.0
        raise ValueError("x")

    with timer:
        try:
            timer.phase("draft", boom)()
        except ValueError:
            now[0] += 0.5
    assert timer.seconds == collections.Counter({"draft": 1.0, "other": 0.5})


def test_timed_steps_add_up_to_the_run():
    model = tiny_model()
    prompt = PROMPTS[0]
    ar = generate_ids(model, [prompt], max_new_tokens=12)[0].output_ids
    res = step_ops.count_steps(model, [prompt], lambda: OracleDraft([ar], 3), 12, timer=True)
    t = res["counter"]
    assert res["steps"] == 3
    assert set(t.seconds) <= set(step_ops.PHASES)
    assert all(v >= 0 for v in t.seconds.values())
    assert t.calls["target"] == 3 and t.calls["target.prefill"] == 1  # three verifications, one prompt
    for phase in ("target", "draft", "engine.tree", "engine.verify", "engine.emit", "engine.compact"):
        assert t.seconds[phase] > 0, phase
    rows = {r["phase"]: r for r in step_ops._rows("oracle", res)}
    assert abs(rows["total"]["ms_per_step"] - 1e3 * sum(t.seconds.values()) / 3) < 1e-9
    assert rows["target"]["calls_per_step"] == 1.0 and rows["total"]["mean_accepted"] == 11 / 3


def test_a_phase_inside_its_own_sub_phase_stays_the_sub_phase():
    counter = step_ops.PhaseCounter()
    x = torch.arange(4)
    forward = counter.phase("target", lambda: x + 1)
    with counter:
        counter.phase("target.prefill", lambda: forward() * 2)()
        forward()
    assert counter.ops == collections.Counter({"target.prefill": 2, "target": 1})
    now = [0.0]
    timer = step_ops.PhaseTimer(clock=lambda: now[0])

    def fwd():
        now[0] += 1.0
    forward = timer.phase("target", fwd)
    decode = timer.phase("target", lambda: forward())  # a decode step that runs the forward
    with timer:
        timer.phase("target.prefill", forward)()
        decode()
    assert timer.seconds == collections.Counter({"target.prefill": 1.0, "target": 1.0, "other": 0.0})
    assert timer.calls == collections.Counter({"target.prefill": 1, "target": 1})


def test_counts_can_accumulate_over_calls():
    model, fresh = tiny_model(), tiny_model()  # the same weights; a model's first decode builds a cached mask
    first = step_ops.count_steps(model, PROMPTS[:1], lambda: None, 6)
    both = step_ops.count_steps(model, PROMPTS[1:2], lambda: None, 6, into=first)
    whole = step_ops.count_steps(fresh, PROMPTS[:2], lambda: None, 6)
    assert both is first and both["steps"] == whole["steps"] == 10 and both["tokens"] == whole["tokens"]
    assert both["counter"].ops == whole["counter"].ops


def test_batched_steps_count_the_batch_forwards_and_every_row():
    model = tiny_model()
    res = step_ops.count_steps(model, PROMPTS[:3], lambda: None, 6, batch_size=2)  # a batch of 2, then 1
    assert res["steps"] == 5 + 5 and res["row_forwards"] == 3 * 5 and res["tokens"] == 3 * 5
    rows = {r["phase"]: r for r in step_ops._rows("ar", res)}
    assert rows["total"]["mean_accepted"] == 1.0
    assert rows["target"]["ops_per_step"] == res["counter"].ops["target"] / 10
    timed = step_ops.count_steps(model, PROMPTS[:3], lambda: None, 6, timer=True, batch_size=3)
    assert timed["steps"] == 5 and timed["counter"].calls["target"] == 5
    assert {r["phase"]: r for r in step_ops._rows("ar", timed)}["total"]["tokens_per_step"] == 3.0
