"""The decode loop on a tiny random-weight float64 model.

Greedy speculative decoding must reproduce greedy AR decoding token for token with any draft;
sampled speculative decoding must have the AR law. The model runs its PyTorch reference
attention and cache compaction here (fast); one test runs the Triton interpreter path.
"""

import math

import pytest
import torch

from glide.model import LlamaModel, ModelConfig
from glide.speculative.drafts import ModelDraft, OracleDraft, PromptLookupDraft, RandomTreeDraft, WrongDraft
import glide.speculative.engine as engine_module
from glide.speculative.engine import generate_ids
from glide.speculative.verify import process_logits, sample, walk

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]
MAX_NEW = 24


def tiny_model(vocab=37, seed=0, layers=2, max_pos=128, std=0.3, hidden=32, dtype=torch.float64):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden + 16, num_layers=layers,
                      num_heads=hidden // 8, num_kv_heads=hidden // 16, head_dim=8,
                      max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    model = LlamaModel(cfg, dtype=dtype, init_std=std)
    model.attn_backend = "reference"
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ar(model):
    return [o.output_ids for o in generate_ids(model, PROMPTS, max_new_tokens=MAX_NEW)]


@pytest.fixture(scope="module")
def eos_id(ar):
    """A token the first sequence emits mid-way, never before: stopping there must bite."""
    for k in range(3, MAX_NEW - 3):
        if ar[0][k] not in ar[0][:k]:
            return ar[0][k]
    pytest.fail("no usable EOS id in the AR run")


def _truncate(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _drafts(ar):
    return {
        **{f"random{s}": RandomTreeDraft(10, seed=s, references=ar, p_correct=0.6) for s in range(4)},
        "random_blind": RandomTreeDraft(12, seed=9, p_invalid=0.1),
        "model_other": ModelDraft(tiny_model(seed=1), (3, 2, 1)),
        "model_self": ModelDraft(tiny_model(seed=0), (2, 2, 1)),
        "lookup": PromptLookupDraft(3, 4),
        "oracle": OracleDraft(ar, 4, width=2),
        "wrong": WrongDraft(ar, 3, width=2),
    }


DRAFT_NAMES = ["random0", "random1", "random2", "random3", "random_blind", "model_other",
               "model_self", "lookup", "oracle", "wrong"]


def test_ar_emits_max_new_tokens_and_is_deterministic(model, ar):
    assert [len(a) for a in ar] == [MAX_NEW] * 3
    again = generate_ids(model, PROMPTS, max_new_tokens=MAX_NEW)
    assert [o.output_ids for o in again] == ar
    assert all(o.target_forwards == MAX_NEW - 1 and o.mean_accepted == 1.0 for o in again)
    # batch composition does not change a sequence's output
    solo = generate_ids(model, PROMPTS[1:2], max_new_tokens=MAX_NEW)
    assert solo[0].output_ids == ar[1]


@pytest.mark.parametrize("name", DRAFT_NAMES)
def test_speculative_greedy_equals_ar_greedy(model, ar, eos_id, name):
    want = [_truncate(a, eos_id) for a in ar]
    assert len(want[0]) < MAX_NEW  # the EOS does stop the first sequence early
    ar_eos = generate_ids(model, PROMPTS, max_new_tokens=MAX_NEW, eos_token_ids=[eos_id])
    assert [o.output_ids for o in ar_eos] == want
    draft = _drafts(ar)[name]
    streamed = {b: [] for b in range(len(PROMPTS))}
    out = generate_ids(model, PROMPTS, draft, max_new_tokens=MAX_NEW, eos_token_ids=[eos_id],
                       on_tokens=lambda b, ids: streamed[b].extend(ids))
    for b, o in enumerate(out):
        assert o.output_ids == want[b], (name, b)
        assert streamed[b] == want[b]
        assert o.target_forwards == len(o.accepted)
        assert sum(o.accepted) == len(o.output_ids) - 1  # the first token came from the prefill
        assert o.seconds > 0
    # sequence 0 stopped at the EOS mid-way, and every forward emitted at least one token
    assert out[0].output_ids[-1] == eos_id and len(out[0].output_ids) < MAX_NEW
    assert 1 <= out[0].target_forwards <= len(out[0].output_ids) - 1


def test_random_drafts_do_get_accepted(model, ar):
    # guards the equality test above against trees that never match
    out = generate_ids(model, PROMPTS, _drafts(ar)["random0"], max_new_tokens=MAX_NEW)
    assert max(max(o.accepted) for o in out) >= 3


def test_oracle_accepts_everything_and_wrong_accepts_nothing(model, ar):
    depth = 4
    out = generate_ids(model, PROMPTS, OracleDraft(ar, depth, width=3), max_new_tokens=MAX_NEW)
    remaining, expect = MAX_NEW - 1, []
    while remaining:
        expect.append(min(depth + 1, remaining))
        remaining -= expect[-1]
    for o, a in zip(out, ar):
        assert o.output_ids == a
        assert o.accepted == expect
        assert o.target_forwards == len(expect)
        assert math.isclose(o.mean_accepted, (MAX_NEW - 1) / len(expect))
    out = generate_ids(model, PROMPTS, WrongDraft(ar, 3, width=2), max_new_tokens=MAX_NEW)
    for o, a in zip(out, ar):
        assert o.output_ids == a and o.mean_accepted == 1.0 and o.target_forwards == MAX_NEW - 1


def test_max_new_tokens_one_and_eos_first(model, ar):
    out = generate_ids(model, PROMPTS, OracleDraft(ar, 3), max_new_tokens=1)
    assert [o.output_ids for o in out] == [[a[0]] for a in ar]
    assert all(o.target_forwards == 0 for o in out)
    out = generate_ids(model, PROMPTS, OracleDraft(ar, 3), max_new_tokens=MAX_NEW, eos_token_ids=[ar[1][0]])
    assert out[1].output_ids == [ar[1][0]] and out[1].target_forwards == 0
    assert out[0].output_ids == _truncate(ar[0], ar[1][0])


@pytest.mark.parametrize("use_draft", [False, True])
def test_sampling_is_reproducible_with_a_seed(model, ar, use_draft):
    def run(seed):
        draft = ModelDraft(tiny_model(seed=1), (2, 2)) if use_draft else None
        return [o.output_ids for o in generate_ids(model, PROMPTS, draft, max_new_tokens=12,
                                                   temperature=0.9, top_p=0.95, seed=seed)]
    a, b, c = run(3), run(3), run(4)
    assert a == b and a != c
    assert all(len(x) == 12 for x in a)


# ---------------------------------------------------------------- the sampled law
V_SMALL = 6
N_SAMPLES = 20000


def _exact_first_three(model, prompt, temperature, top_p):
    """Law of the first three tokens, from the model's conditionals: (V, V, V)."""
    V = V_SMALL

    def cond(prompts):
        cache = model.new_cache(len(prompts), 16)
        return process_logits(model.prefill(prompts, cache), temperature, top_p)

    p1 = cond([prompt])[0]
    p2 = cond([prompt + [a] for a in range(V)])  # (V, V)
    p3 = cond([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _broken_verifier(tree, probs, generator=None, uniforms=None):
    """Takes the target's favourite whenever a child carries it, else samples: not exact."""
    picked = sample(probs, generator, uniforms)
    top = probs.argmax(-1)
    slots = torch.arange(tree.size)
    proposed = ((tree.tokens[:, None, :] == top[:, :, None]) & (tree.parents[:, None, :] == slots[None, :, None])).any(-1)
    return walk(tree, torch.where(proposed, top, picked))


def _sampled_tv(temperature, top_p, make_draft=None):
    """TV distance between the law of the first three sampled tokens and the exact one, and
    the number of tokens each first verification emitted. ``make_draft(model)`` gives the
    draft; by default deterministic top-2 candidates from a draft that shares the target's
    weights, so that second-level nodes get accepted too (up to 3 tokens a verification)."""
    small = dict(vocab=V_SMALL, layers=1, hidden=16, std=0.3)
    model = tiny_model(seed=5, **small)
    if make_draft is None:
        draft = ModelDraft(tiny_model(seed=5, **small), (2, 2))
    else:
        draft = make_draft(model)
    prompt = [1, 4, 2]
    law = _exact_first_three(model, prompt, temperature, top_p).reshape(-1)
    out = generate_ids(model, [prompt] * N_SAMPLES, draft, max_new_tokens=4, temperature=temperature,
                       top_p=top_p, seed=5)
    ids = torch.tensor([o.output_ids[:3] for o in out])
    idx = ids[:, 0] * V_SMALL ** 2 + ids[:, 1] * V_SMALL + ids[:, 2]
    emp = torch.bincount(idx, minlength=V_SMALL ** 3).double() / N_SAMPLES
    first = torch.tensor([o.accepted[0] for o in out])
    return 0.5 * (emp - law).abs().sum().item(), first


# E[TV] <= sqrt(K / n) / 2 and TV is 1/n-Lipschitz per sample (McDiarmid, delta = 1e-6)
TV_BOUND = 0.5 * math.sqrt(V_SMALL ** 3 / N_SAMPLES) + math.sqrt(math.log(1e6) / (2 * N_SAMPLES))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.3, 0.9)])
def test_speculative_sampling_has_the_ar_law(temperature, top_p):
    tv, first = _sampled_tv(temperature, top_p)
    assert tv < TV_BOUND, f"TV {tv:.4f} >= {TV_BOUND:.4f}"
    # not vacuous: the draft's candidates were accepted, often two levels deep
    assert (first >= 2).double().mean() > 0.5 and (first == 3).double().mean() > 0.2


def _broken_path_verifier(tree, logits, temperature, top_p, uniforms):
    return _broken_verifier(tree, process_logits(logits, temperature, top_p), uniforms=uniforms)


def test_engine_law_check_catches_a_broken_verifier(monkeypatch):
    monkeypatch.setattr(engine_module, "verify_logits", _broken_path_verifier)
    tv, _ = _sampled_tv(1.3, 0.9)
    assert tv > TV_BOUND, f"a broken verifier passed: TV {tv:.4f} <= {TV_BOUND:.4f}"


# ---------------------------------------------------------------- the Triton path
def test_engine_through_triton_interpreter():
    from glide.kernels._dispatch import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
    model = tiny_model(dtype=torch.float32)  # the kernels take float32 and half types
    want = [o.output_ids for o in generate_ids(model, PROMPTS[:2], max_new_tokens=8)]
    model.attn_backend = "auto"  # tree attention and compaction through Triton
    out = generate_ids(model, PROMPTS[:2], RandomTreeDraft(6, seed=2, references=want, p_correct=0.7),
                       max_new_tokens=8)
    assert [o.output_ids for o in out] == want
    assert max(max(o.accepted) for o in out) >= 2


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=126), "max_new_tokens"),  # 3 + 126 + 1 > 128 positions
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[1, 2], []]), "prompts"),
        (dict(prompts=[[1, 99]]), "prompts"),
        (dict(draft=ModelDraft(tiny_model(vocab=40), (2,))), "draft"),
        (dict(draft=WrongDraft([[1]], 2, width=37)), "draft"),
        (dict(row_ids=[0, 1]), "row_ids"),
        (dict(row_ids=[-1]), "row_ids"),
        (dict(row_ids=[True]), "row_ids"),
        (dict(row_ids=[1.0]), "row_ids"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_input_names_the_argument(model, kwargs, name):
    args = dict(prompts=[[1, 2, 3]], draft=None, max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        generate_ids(model, args.pop("prompts"), args.pop("draft"), **args)


def test_tree_too_large_for_the_model_names_max_new_tokens(model):
    # 3 + 100 new tokens fit 128 positions, but not with a 30-node tree on top
    generate_ids(model, [[1, 2, 3]], max_new_tokens=100)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, [[1, 2, 3]], RandomTreeDraft(30), max_new_tokens=100)


def test_runs_under_inference_mode(model, ar):
    """Callers commonly wrap generation in torch.inference_mode; nothing may depend on version
    counters there, for the cache made inside it or for a model built inside it."""
    with torch.inference_mode():
        out = generate_ids(model, PROMPTS, PromptLookupDraft(), max_new_tokens=MAX_NEW)
    assert [o.output_ids for o in out] == ar
    with torch.inference_mode():
        built = tiny_model()
    assert [o.output_ids for o in generate_ids(built, PROMPTS, max_new_tokens=MAX_NEW)] == ar


def test_outside_writes_to_lens_are_seen_under_inference_mode():
    """Rolling a cache back by writing `lens` in place must take effect even when the cache was
    made under inference_mode (the next token then sees the rolled-back prefix only)."""
    model = tiny_model(seed=3)
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model.prefill([[1, 2, 3, 4, 5]], cache)
        model.decode(torch.tensor([6]), cache)
        cache.lens.copy_(torch.tensor([3]))
        got = model.decode(torch.tensor([7]), cache)
        fresh = model.new_cache(1, 16)
        model.prefill([[1, 2, 3]], fresh)
        want = model.decode(torch.tensor([7]), fresh)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _CountingDraft(RandomTreeDraft):
    """Notes, at every proposal, the context's host counts beside the device tensors they mirror."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def propose(self, ctx):
        prompt_tokens = sum(len(p) for p in PROMPTS)
        self.seen.append(((ctx.emitted, ctx.live), (int(ctx.lengths.sum()) - prompt_tokens, int(ctx.active.sum()))))
        return super().propose(ctx)


def test_the_context_carries_host_counts_of_emitted_tokens_and_live_rows(model, ar):
    d = _CountingDraft(seed=0)
    out = generate_ids(model, PROMPTS, d, max_new_tokens=MAX_NEW)
    assert [o.output_ids for o in out] == ar
    assert len(d.seen) >= 3 and all(host == device for host, device in d.seen), d.seen
    assert d.seen[0][0] == (len(PROMPTS), len(PROMPTS))  # the prefill's token, every row live
    assert min(live for (_, live), _ in d.seen) < len(PROMPTS)  # rows finish at different steps


def test_decode_keeps_only_the_tokens_it_is_told_to():
    """decode(commit=...) keeps a token per row as told (0: a finished row writes past its
    length and keeps nothing), and the kept rows match a plain decode."""
    model = tiny_model(seed=3)
    kept, plain = model.new_cache(2, 16), model.new_cache(2, 16)
    for c in (kept, plain):
        model.prefill([[1, 2, 3], [4, 5]], c)
    tok = torch.tensor([6, 7])
    got = model.decode(tok, kept, commit=torch.tensor([1, 0]))
    want = model.decode(tok, plain)
    assert kept.lens.tolist() == [4, 2] and plain.lens.tolist() == [4, 3]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the row that kept nothing decodes its next token as if that step never happened
    again = model.decode(torch.tensor([8, 9]), kept)
    fresh = model.new_cache(1, 16)
    model.prefill([[4, 5]], fresh)
    torch.testing.assert_close(again[1:], model.decode(torch.tensor([9]), fresh), rtol=1e-12, atol=1e-12)


def test_unused_tree_slots_are_not_run(model, ar, monkeypatch):
    """A draft that proposes nothing valid costs one-token forwards (the engine trims the tree);
    a draft with valid nodes still gets them verified."""
    widths = []
    forward = type(model).forward

    def spy(self, input_ids, *args, **kwargs):
        widths.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    out = generate_ids(model, PROMPTS, RandomTreeDraft(6, seed=0, p_invalid=1.0), max_new_tokens=8)
    assert [o.output_ids for o in out] == [a[:8] for a in ar]
    assert set(widths[1:]) == {1}  # widths[0] is the prefill
    widths.clear()
    generate_ids(model, PROMPTS, OracleDraft(ar, 4, width=2), max_new_tokens=8)
    assert max(widths[1:]) > 1


def test_the_model_backend_also_picks_the_compaction():
    model = tiny_model()
    assert model.new_cache(1, 8).compact_backend == "reference"
    model.attn_backend = "auto"
    assert model.new_cache(1, 8).compact_backend == "auto"


def test_emit_one_matches_emit_of_one_token():
    # the AR step's emit_one against the general emit with every count 1, over random runs with
    # EOS hits, max_new_tokens cuts and finished rows, starting from identical states
    from glide.speculative.engine import _Batch

    gen = torch.Generator().manual_seed(0)
    fields = ("tokens", "lengths", "num_new", "active", "root")
    for trial in range(20):
        B = int(torch.randint(1, 6, (1,), generator=gen))
        max_new = int(torch.randint(1, 7, (1,), generator=gen))
        prompts = [torch.randint(0, 9, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
                   for _ in range(B)]
        capacity = max(len(p) for p in prompts) + max_new
        a = _Batch(prompts, capacity, max_new, (3, 7), "cpu")
        b = _Batch(prompts, capacity, max_new, (3, 7), "cpu")
        ones = torch.ones(B, dtype=torch.int64)
        finished_on_eos = False
        for step in range(max_new + 2):
            new = torch.randint(0, 9, (B, 1), generator=gen)
            want, got = a.emit(new, ones), b.emit_one(new)
            assert torch.equal(want, got), (trial, step)
            for f in fields:
                assert torch.equal(getattr(a, f), getattr(b, f)), (trial, step, f)
            finished_on_eos |= bool(((new[:, 0] == 3) | (new[:, 0] == 7)).any())
        assert not b.active.any() and bool((b.num_new <= max_new).all())
    assert finished_on_eos


@pytest.mark.parametrize("max_new,eos", [(MAX_NEW, False), (MAX_NEW, True), (2, False), (1, False)])
def test_lagged_ar_loop_gives_the_plain_loops_results(model, ar, eos_id, monkeypatch, max_new, eos):
    """On CUDA the AR loop reads each step's tokens one step late (its forward overlaps the
    host's bookkeeping). Forced on here: the same tokens, counts and stream as the plain
    loop, one extra forward (after the last sequence finished; it emits nothing), and the
    cache never outgrows its capacity."""
    eos_ids = [eos_id] if eos else []

    def run(lagged):
        monkeypatch.setattr(engine_module, "_lagged_ar", lambda device: lagged)
        calls, streamed = [], []
        real = model.decode

        def decode(tokens, cache, *a, **kw):
            calls.append(int(cache.lens.max()))
            assert int(cache.lens.max()) + 1 <= cache.max_seq
            return real(tokens, cache, *a, **kw)

        monkeypatch.setattr(model, "decode", decode)
        out = generate_ids(model, PROMPTS, max_new_tokens=max_new, eos_token_ids=eos_ids,
                           on_tokens=lambda b, ids: streamed.append((b, list(ids))))
        monkeypatch.setattr(model, "decode", real)
        return out, calls, streamed

    plain, plain_calls, plain_stream = run(False)
    lagged, lagged_calls, lagged_stream = run(True)
    assert [o.output_ids for o in plain] == [_truncate(a[:max_new], eos_id) if eos else a[:max_new] for a in ar]
    for p, q in zip(plain, lagged):
        assert (q.output_ids, q.accepted, q.target_forwards) == (p.output_ids, p.accepted, p.target_forwards)
        assert q.seconds > 0
    assert lagged_stream == plain_stream
    assert len(lagged_calls) == len(plain_calls) + (1 if plain_calls else 0)


class _PausedDraft(engine_module.Draft):
    """Proposes nothing, every step: the engine decodes each step as a plain one."""

    max_nodes = 2

    def propose(self, ctx):
        from glide.speculative.tree import Proposal

        empty = ctx.root.new_zeros(ctx.root.shape[0], 0)
        return Proposal(empty, empty.clone(), empty.bool(), empty.float())


def test_paused_steps_equal_ar_and_keep_the_length_bound_on_the_host(model, monkeypatch):
    """Steps with an empty proposal give the AR tokens. While every row is active they commit
    with an int, so the cache keeps its common length; once a row finishes they commit per row,
    telling the cache that no row keeps more than one token. Either way the cache's host-side
    length bound survives (a plain tensor commit would drop it and cost the next graphed
    forward a device read of the lengths)."""
    prompts = [[1, 2, 3], [4, 5, 6]]  # equal lengths: the cache knows one common length
    want = [o.output_ids for o in generate_ids(model, prompts, max_new_tokens=10)]
    eos = want[0][4]
    assert eos not in want[0][:4]
    known, bound, real = [], [], model.decode

    def decode(tokens, cache, *a, **kw):
        known.append(cache.uniform_length() is not None)
        bound.append(cache._bound_key == cache._lens_key())  # answered without a device read
        return real(tokens, cache, *a, **kw)

    monkeypatch.setattr(model, "decode", decode)
    out = generate_ids(model, prompts, _PausedDraft(), max_new_tokens=10)
    assert [o.output_ids for o in out] == want and all(o.mean_accepted == 1.0 for o in out)
    # the first step's commit measures the lengths the prefill set (one read); then no more
    assert len(known) == 9 and all(known[1:]), known
    assert all(bound[1:]), bound
    known.clear()
    bound.clear()
    out = generate_ids(model, prompts, _PausedDraft(), max_new_tokens=10, eos_token_ids=[eos])
    assert out[0].output_ids == want[0][:5]
    assert out[1].output_ids == _truncate(want[1], eos)
    assert all(known[1:4]) and not any(known[5:]), known  # row 0 finished at the 4th step
    assert len(bound) == 9 and all(bound[1:]), bound  # the bound is never measured again
