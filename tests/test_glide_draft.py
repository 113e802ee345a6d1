"""The GliDe draft: its decoding path against its training path, its cache bookkeeping inside the
engine, lossless greedy output, and its checkpoints."""

import copy
import json

import numpy as np
import pytest
import torch

from glide.draft import GlideDraft, block_cross_mask, load_draft, save_draft
from glide.speculative.drafts import DraftContext
from glide.speculative.engine import generate_ids

from glide_helpers import history_context, tiny_draft, tiny_target, trained_pair

VOCAB = 23


PROMPTS = [[1, 5, 7, 9, 3], [4, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def _context(target, prompt, first):
    """The engine's state right after the prefill of one prompt and its first token."""
    P = len(prompt)
    cache = target.new_cache(1, P + 16)
    target.prefill([prompt], cache)
    tokens = torch.zeros(1, P + 12, dtype=torch.int64)
    tokens[0, :P] = torch.tensor(prompt)
    tokens[0, P] = first
    lengths = torch.tensor([P + 1])
    return DraftContext(target, cache, tokens, lengths, torch.tensor([first]), torch.tensor([True]))


# ---------------------------------------------------------------- decoding == training
@pytest.mark.parametrize("layers,vocab", [(1, None), (1, list(range(0, VOCAB, 2))), (2, None)])
def test_proposal_equals_the_training_forward(target, layers, vocab):
    """The chain drafted step by step over the caches equals one teacher-forced training
    forward whose cross mask lets every draft row see the target up to the root."""
    draft = tiny_draft(target, layers=layers, vocab=vocab)
    prompt, first = [1, 5, 7, 9, 3, 6, 2], 4
    ctx = _context(target, prompt, first)
    g = GlideDraft(draft, gamma=4)
    g.begin(ctx)
    prop = g.propose(ctx)
    P = len(prompt)
    seq = torch.tensor([prompt + [first] + prop.tokens[0, :3].tolist()])
    S = seq.shape[1]
    pos = torch.arange(S)
    # the root, the token before it (rewritten by each step) and the drafted rows read the
    # target before the root; earlier prompt rows (filled by `begin`) read it before themselves
    visible = pos[None, :] < torch.where(pos >= P - 1, P, pos)[:, None]
    kv = [(ctx.cache.k(draft.config.target_layer(i))[:, :, :S], ctx.cache.v(draft.config.target_layer(i))[:, :, :S])
          for i in range(layers)]
    logits = draft(seq, kv, visible[None])[0, P:]  # rows of the root and d1..d3
    probs = logits.softmax(-1)
    want_tok = draft.vocab_ids[probs.argmax(-1)]
    assert prop.tokens[0].tolist() == want_tok.tolist()
    torch.testing.assert_close(prop.draft_probs[0], probs.max(-1).values, rtol=1e-10, atol=1e-12)
    assert prop.parents[0].tolist() == [0, 1, 2, 3] and prop.valid.all()


class _CheckedGlide(GlideDraft):
    """At every step, compare the incremental proposal with one from a fresh draft that rebuilds
    its cache over the whole committed history."""

    def __init__(self, model, gamma):
        super().__init__(model, gamma)
        self.steps = 0

    def propose(self, ctx):
        got = super().propose(ctx)
        fresh = GlideDraft(self.model, self.gamma)
        fresh.begin(ctx)  # begin reads tokens[:lengths - 1]: every committed token but the root
        want = fresh.propose(ctx)
        live = ctx.active
        assert torch.equal(got.tokens[live], want.tokens[live])
        torch.testing.assert_close(got.draft_probs[live], want.draft_probs[live], rtol=1e-9, atol=1e-12)
        self.steps += 1
        return got


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_pair(str(tmp_path_factory.mktemp("trained")))


PROMPTS_SMALL = [[1, 3, 0, 4, 3], [4, 0], [0, 1, 3, 4, 3, 1, 0, 0, 3, 6, 5]]


def test_incremental_cache_equals_a_rebuilt_one(trained):
    t, d, _ = trained
    g = _CheckedGlide(d, gamma=3)
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    out = generate_ids(t, PROMPTS_SMALL, g, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    accepted = [a for o in out for a in o.accepted]
    # every case of the bookkeeping: nothing, part of the chain, and all of it accepted
    assert g.steps > 10 and set(accepted) >= {1, 2, 4}


def test_training_makes_the_draft_accepted(trained):
    """The trained draft's chains are accepted far more often than an untrained draft's."""
    t, d, _ = trained
    untrained = tiny_draft(t, seed=4)
    runs = [generate_ids(t, PROMPTS_SMALL, GlideDraft(m, 3), max_new_tokens=40) for m in (d, untrained)]
    mat = [sum(a for o in r for a in o.accepted) / sum(len(o.accepted) for o in r) for r in runs]
    assert mat[0] > 1.7 and mat[0] > mat[1] + 0.5, mat


@pytest.mark.parametrize("layers,cross,gamma", [(1, True, 4), (2, True, 3), (1, False, 5)])
def test_greedy_glide_equals_ar(target, layers, cross, gamma):
    draft = tiny_draft(target, layers=layers, cross=cross)
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=24, eos_token_ids=(2,))
    sp = generate_ids(target, PROMPTS, GlideDraft(draft, gamma), max_new_tokens=24, eos_token_ids=(2,))
    assert [o.output_ids for o in sp] == [o.output_ids for o in ar]
    assert all(len(o.accepted) > 0 for o in sp)


def test_engine_through_triton_interpreter():
    """The same run with the Triton kernels (interpreted): cross_attention reads the target's
    cache, tree_attention the draft's."""
    t, d = tiny_target(dtype=torch.float32), None
    d = tiny_draft(t, seed=4)
    ref = generate_ids(t, PROMPTS[:2], GlideDraft(d, 3), max_new_tokens=8)
    t.attn_backend = d.attn_backend = "triton"
    tri = generate_ids(t, PROMPTS[:2], GlideDraft(d, 3), max_new_tokens=8)
    assert [o.output_ids for o in tri] == [o.output_ids for o in ref]


# ---------------------------------------------------------------- the training mask
@pytest.mark.parametrize("block,shift", [(5, 0), (5, 3), (2, 1), (1, 0)])
def test_block_cross_mask_follows_its_rule(block, shift):
    S = 17
    m = block_cross_mask(S, block, shift)
    for q in range(S):
        start = (q - shift) // block * block + shift
        assert m[q].tolist() == [k < start for k in range(S)]
    batched = block_cross_mask(S, block, torch.tensor([shift, 0]))
    assert torch.equal(batched[0], m) and torch.equal(batched[1], block_cross_mask(S, block, 0))


def test_no_query_sees_its_own_or_later_target_positions():
    m = block_cross_mask(40, 5, torch.arange(5))
    q = torch.arange(40)
    assert not (m & (q[None, None, :] >= q[None, :, None])).any()


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(target, tmp_path):
    d = tiny_draft(target, vocab=[2, 0, 5, 7, 11])
    save_draft(d, tmp_path / "d", card={"note": "test"}, dtype=torch.float64)
    back = load_draft(tmp_path / "d", target)
    assert back.config == d.config and back.vocab_ids.tolist() == [2, 0, 5, 7, 11]
    for (k, a), (_, b) in zip(sorted(d.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    out1 = generate_ids(target, PROMPTS, GlideDraft(d), max_new_tokens=10)
    out2 = generate_ids(target, PROMPTS, GlideDraft(back), max_new_tokens=10)
    assert [o.accepted for o in out1] == [o.accepted for o in out2]


def test_cut_head_keeps_the_most_frequent_rows_and_stays_lossless(target, tmp_path):
    from glide.draft import cut_head

    d = tiny_draft(target, vocab=[2, 0, 5, 7, 11, 3])
    save_draft(d, tmp_path / "d", card={"note": "test"}, dtype=torch.float64)
    cut_head(tmp_path / "d", tmp_path / "c", 3)
    c = load_draft(tmp_path / "c", target)
    assert c.vocab_ids.tolist() == [2, 0, 5]
    for (k, a), (_, b) in zip(sorted(d.state_dict().items()), sorted(c.state_dict().items())):
        assert torch.equal(a, b), k  # the layers are untouched
    card = json.loads((tmp_path / "c" / "config.json").read_text())["card"]
    assert card["note"] == "test" and card["head_cut"] == {"from_rows": 6, "rows": 3}
    # the cut draft's logits are the full draft's columns for the kept tokens
    ids, pos = torch.tensor([[1, 5, 7]]), torch.arange(3)[None]
    mask = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    outs = []
    for m in (d, c):
        cache = m.new_cache(1, 8)
        outs.append(m.step(ids, pos, mask, cache, lambda i, q: torch.zeros_like(q)))
    torch.testing.assert_close(outs[1], outs[0][..., :3], rtol=0, atol=1e-12)
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=16, eos_token_ids=(2,))
    sp = generate_ids(target, PROMPTS, GlideDraft(c, 3), max_new_tokens=16, eos_token_ids=(2,))
    assert [o.output_ids for o in sp] == [o.output_ids for o in ar]
    for rows in (0, 6, 2.5):
        with pytest.raises(ValueError, match="^rows: "):
            cut_head(tmp_path / "d", tmp_path / "x", rows)
    save_draft(tiny_draft(target), tmp_path / "full")
    with pytest.raises(ValueError, match="^rows: .*whole vocabulary"):
        cut_head(tmp_path / "full", tmp_path / "x", 3)


def test_another_target_is_refused(target, tmp_path):
    save_draft(tiny_draft(target), tmp_path / "d")
    with pytest.raises(ValueError, match="^draft: .*another target"):
        load_draft(tmp_path / "d", tiny_target(seed=9))
    with pytest.raises(ValueError, match="^draft: .*vocab_size=23.*29"):
        load_draft(tmp_path / "d", tiny_target(vocab=29))


def test_same_target_in_another_dtype_is_accepted(target, tmp_path):
    save_draft(tiny_draft(target), tmp_path / "d")
    t32 = copy.deepcopy(target).to(torch.float32)  # the same weights, rounded
    assert load_draft(tmp_path / "d", t32).dtype == torch.float32


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "nan", "missing", "wrong_format"])
def test_damaged_checkpoints_fail_naming_draft(target, tmp_path, damage):
    p = save_draft(tiny_draft(target), tmp_path / "d")
    w, c = p / "model.safetensors", p / "config.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "garbage_json":
        c.write_text("{not json")
    elif damage == "missing":
        w.unlink()
    elif damage == "wrong_format":
        meta = json.loads(c.read_text())
        meta["format"] = "something-else"
        c.write_text(json.dumps(meta))
    else:
        from safetensors.torch import load_file, save_file
        state = load_file(str(w))
        state["norm.weight"][0] = float("nan")
        save_file(state, str(w))
    with pytest.raises(ValueError, match="^draft: "):
        load_draft(p, target)


def test_missing_path_names_draft(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="^draft: "):
        load_draft(tmp_path / "nowhere", target)


def test_draft_in_another_dtype_is_refused_by_the_engine(target):
    d = tiny_draft(copy.deepcopy(target).to(torch.float32))
    with pytest.raises(ValueError, match="^draft: .*float32"):
        generate_ids(target, PROMPTS, GlideDraft(d), max_new_tokens=4)


def test_gamma_must_be_positive(target):
    with pytest.raises(ValueError, match="gamma"):
        GlideDraft(tiny_draft(target), gamma=0)


# ---------------------------------------------------------------- CaPE
from glide.draft.cape import PAPER_BINS, CapeDraft, cape_widths, check_bins  # noqa: E402
from glide.speculative.tree import Proposal, ancestor_mask, build_tree  # noqa: E402


def test_cape_widths_follow_the_bins():
    p = torch.tensor([[0.0, 0.05, 0.1, 0.29, 0.3, 0.55, 0.7, 0.81, 0.99, 1.0]])
    assert cape_widths(p, PAPER_BINS).tolist() == [[8, 8, 8, 8, 6, 6, 4, 2, 2, 2]]
    with pytest.raises(ValueError, match="bins"):
        check_bins([1, 2, 3])
    with pytest.raises(ValueError, match="bins"):
        check_bins([0] * 11)
    assert check_bins("3,3,3,3,3,3,3,3,3,3,1") == (3,) * 10 + (1,)


@pytest.mark.parametrize("bins", [PAPER_BINS, (3,) * 5 + (2,) * 6, (1,) * 11])
def test_cape_tree_invariants(trained, bins):
    t, d, _ = trained
    g = CapeDraft(d, gamma=3, bins=bins)
    prompts = [[1, 3, 0, 4, 3], [4, 0], [0, 1, 3, 4, 3, 1, 0, 0, 3, 6, 5]]
    B, cap = len(prompts), 30
    cache = t.new_cache(B, cap + g.max_nodes + 2)
    first = t.prefill(prompts, cache).argmax(-1)
    tokens = torch.zeros(B, cap, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
        tokens[b, len(p)] = first[b]
    lengths = torch.tensor([len(p) + 1 for p in prompts])
    ctx = DraftContext(t, cache, tokens, lengths, first, torch.tensor([True, True, False]))
    g.begin(ctx)
    prop = g.propose(ctx)
    prop.validate(B, vocab_size=t.config.vocab_size)
    ref = GlideDraft(d, 3)
    ref.begin(ctx)
    chain, probs, _ = ref.draft_chain(ctx)
    assert torch.equal(prop.tokens[:, :3], chain)  # the spine is the GliDe chain
    n = cape_widths(probs, bins).clamp(max=t.config.vocab_size)
    for b in range(B):
        v = prop.valid[b]
        if b == 2:  # inactive
            assert not v.any()
            continue
        assert int(v.sum()) == int(n[b].sum())  # the size follows the bins
        par = prop.parents[b][v].tolist()
        tok = prop.tokens[b][v].tolist()
        slots = [0] + [i + 1 for i in range(prop.num_nodes) if v[i]]
        # siblings hang off the spine only, parents come first, no two children share a token
        kids = {}
        for i, (pa, tk) in enumerate(zip(par, tok)):
            assert pa in (0, 1, 2) and pa < slots[i + 1]
            kids.setdefault(pa, []).append(tk)
        assert all(len(k) == len(set(k)) for k in kids.values())
        assert {pa: len(k) for pa, k in kids.items()} == {i: int(n[b, i]) for i in range(3)}
    tree = build_tree(first, prop)
    assert torch.equal(tree.mask, ancestor_mask(tree.parents))
    assert torch.equal(tree.depth[:2, 1:4], torch.arange(1, 4).expand(2, 3))  # the spine
    sib = tree.parents[:2, 4:]
    assert torch.equal(tree.depth[:2, 4:], torch.where(sib >= 0, sib + 1, 0))  # one below their parent


def test_cape_greedy_equals_ar_and_accepts_more_than_the_chain(trained):
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    chain = generate_ids(t, PROMPTS_SMALL, GlideDraft(d, 3), max_new_tokens=40)
    cape = generate_ids(t, PROMPTS_SMALL, CapeDraft(d, 3), max_new_tokens=40)
    assert [o.output_ids for o in cape] == [o.output_ids for o in ar]

    def mat(out):
        return sum(a for o in out for a in o.accepted) / sum(len(o.accepted) for o in out)
    assert mat(cape) > mat(chain)


# ---------------------------------------------------------------- the sampled law
from test_engine import TV_BOUND, _sampled_tv  # noqa: E402


def _glide_on(model, cls, **kw):
    d = tiny_draft(model, seed=2, std=0.5)
    return cls(d, **kw)


@pytest.mark.parametrize("kind", ["glide", "cape"])
def test_sampling_with_glide_and_cape_has_the_ar_law(kind):
    """The engine's statistical test (first three tokens, TV distance to the exact law) with a
    GliDe chain and with CaPE trees as the draft."""
    if kind == "glide":
        tv, first = _sampled_tv(1.0, 1.0, lambda m: _glide_on(m, GlideDraft, gamma=2))
        assert (first >= 2).double().mean() > 0.03  # not vacuous: a random chain is accepted at times
    else:
        tv, first = _sampled_tv(1.3, 0.9, lambda m: _glide_on(m, CapeDraft, gamma=2, bins=(4,) * 6 + (2,) * 5))
        assert (first >= 2).double().mean() > 0.5 and (first == 3).double().mean() > 0.02
    assert tv < TV_BOUND, f"TV {tv:.4f} >= {TV_BOUND:.4f}"


# ---------------------------------------------------------------- the dynamic tree
from glide.draft.dynamic import Calibration, DynamicTreeDraft, VerifyCost  # noqa: E402


def _flat_cost(per_slot):
    return VerifyCost([1, 64], [1.0, 1.0 + 63 * per_slot])


@pytest.mark.parametrize("kw", [dict(depth=4, top_k=3, beam=2, fixed_size=12),
                                dict(depth=3, top_k=5, beam=3, fixed_size=1),
                                dict(depth=5, top_k=2, beam=2, cost=_flat_cost(0.01))])
def test_dynamic_tree_greedy_equals_ar(trained, kw):
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    dyn = DynamicTreeDraft(d, **kw)
    out = generate_ids(t, PROMPTS_SMALL, dyn, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    longest = max(a for o in out for a in o.accepted)
    assert longest == 2 if kw.get("fixed_size") == 1 else longest >= 3  # deep branches get accepted


def test_dynamic_tree_shape_and_sizing(trained):
    t, d, _ = trained
    prompts = [[1, 3, 0, 4, 3], [4, 0]]
    kw = dict(depth=4, top_k=3, beam=2, max_nodes=20, fallback=False)  # every step drafts
    cheap = DynamicTreeDraft(d, cost=_flat_cost(0.0), min_expand=0.0, **kw)
    dear = DynamicTreeDraft(d, cost=_flat_cost(10.0), **kw)
    for g in (cheap, dear):
        generate_ids(t, prompts, g, max_new_tokens=12)
    assert set(cheap.sizes) == {20} and set(dear.sizes) == {0}  # free slots: fill; dear ones: none
    # a proposal: parents first, ranked by v, depth one below the parent
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=15, min_expand=0.0)
    B, cap = 2, 30
    cache = t.new_cache(B, cap + 40)
    first = t.prefill(prompts, cache).argmax(-1)
    tokens = torch.zeros(B, cap, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
        tokens[b, len(p)] = first[b]
    ctx = DraftContext(t, cache, tokens, torch.tensor([6, 3]), first, torch.tensor([True, True]))
    g.begin(ctx)
    prop = g.propose(ctx)
    prop.validate(B, vocab_size=t.config.vocab_size)
    assert prop.num_nodes == 15
    v = prop.draft_probs
    assert (v[:, :-1] >= v[:, 1:]).all()
    slots = torch.arange(1, 16)
    assert (prop.parents < slots).all()
    pv = torch.cat([torch.ones(B, 1), v], 1).gather(1, prop.parents)
    assert (v <= pv + 1e-6).all()  # a child never outranks its parent
    tree = build_tree(first, prop)
    for b in range(B):
        kids = {}
        for i in range(15):
            kids.setdefault(int(prop.parents[b, i]), []).append(int(prop.tokens[b, i]))
        assert all(len(k) == len(set(k)) for k in kids.values())
        assert (tree.depth[b, 1:] == tree.depth[b].gather(0, prop.parents[b]) + 1).all()


def test_a_level_is_grown_only_when_it_can_pay_for_its_draft_forward(trained):
    """_level_pays: the best tree in hand against the bound on what more levels can add (all
    their parents' mass accepted at each) for their draft forwards and a wider tree."""
    _, d, _ = trained
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0))  # 1 s a verify
    v = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.2, 0.1]])
    both, one = torch.tensor([True, True]), torch.tensor([True, False])
    sure, unsure = torch.tensor([[0.9, 0.5], [0.8, 0.2]]), torch.tensor([[1e-4, 1e-4], [1e-4, 1e-4]])
    assert g._level_pays(v, sure, 0.01, 0.01, both)  # likely tokens for a cheap forward
    assert not g._level_pays(v, unsure, 0.01, 0.01, both)  # nearly nothing to gain
    assert not g._level_pays(v, sure, 0.01, 100.0, both)  # a forward dearer than the gain
    # a finished sequence's candidates count for nothing
    mixed = torch.tensor([[1e-4, 1e-4], [0.8, 0.2]])
    assert g._level_pays(v, mixed, 0.01, 0.01, both) and not g._level_pays(v, mixed, 0.01, 0.01, one)
    # every verified slot dear (1 s each): even one more node costs more than it can bring,
    # over any number of levels; with a verification flat in size the same nodes pay
    modest = torch.tensor([[0.3, 0.1], [0.2, 0.1]])
    dear = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, cost=_flat_cost(1.0))
    assert not dear._level_pays(v, modest, 0.01, 0.01, both, levels=3)
    assert g._level_pays(v, modest, 0.01, 0.01, both)
    fixed = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=6)
    assert fixed._level_pays(v, unsure, 0.01, 100.0, both)  # a fixed size always grows
    off = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, cost=_flat_cost(1.0), growth_check=False)
    assert off._level_pays(v, unsure, 0.01, 100.0, both)  # and so does a draft told not to ask


class _PausingTree(DynamicTreeDraft):
    """Pauses ``pause`` steps after every drafted step, and checks each drafted step's proposal
    against a fresh draft that rebuilds its cache over the whole committed history."""

    def __init__(self, model, pause, **kw):
        super().__init__(model, **kw)
        self.pause, self.kw, self.checked, self.calls = pause, kw, 0, 0

    def _decide(self):
        self.calls += 1
        return (self.calls - 1) % (self.pause + 1) == 0

    def propose(self, ctx):
        got = super().propose(ctx)
        if self._last is None:  # a paused step
            assert got.num_nodes == 0
            return got
        fresh = DynamicTreeDraft(self.model, fallback=False, **self.kw)
        fresh.begin(ctx)
        fresh._lookup_counts = self._lookup_counts  # what the lookup learnt so far is not the cache's
        want = fresh.propose(ctx)
        live = ctx.active
        assert torch.equal(got.tokens[live], want.tokens[live])
        assert torch.equal(got.parents[live], want.parents[live])
        torch.testing.assert_close(got.draft_probs[live], want.draft_probs[live], rtol=1e-5, atol=1e-7)
        self.checked += 1
        return got


@pytest.mark.parametrize("pause", [1, 3])
def test_a_paused_tree_catches_up_on_every_token_committed_meanwhile(trained, pause):
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    g = _PausingTree(d, pause, depth=4, top_k=3, beam=2, max_nodes=12, cost=_flat_cost(0.0), min_expand=0.0)
    out = generate_ids(t, PROMPTS_SMALL, g, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    steps = len(g.sizes)
    assert g.checked >= 4 and g.skipped == steps - g.checked
    assert g.checked <= -(-steps // (pause + 1))  # one drafted step, then `pause` without
    assert max(a for o in out for a in o.accepted) >= 3  # the probes' trees still get accepted


class _StepClock:
    """A clock for the dynamic tree's step timing: a drafted step lasts ``drafted`` seconds, a
    plain one ``plain``."""

    def __init__(self, draft, drafted, plain):
        self.draft, self.drafted, self.plain, self.t = draft, drafted, plain, 0.0

    def __call__(self):
        if self.draft._prev is not None:
            self.t += self.drafted if self.draft._prev[0] else self.plain
        return self.t


def _timed_tree(d, drafted, plain, **kw):
    # the pause tests count steps: without lookup's extra tokens, a generation's step count is
    # the draft's alone
    kw.setdefault("lookup", 0)
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0), min_expand=0.0, **kw)
    g._clock = _StepClock(g, drafted, plain)
    return g


def test_drafting_pauses_while_drafted_steps_are_slower_and_stays_lossless(trained):
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    slow = _timed_tree(d, drafted=100.0, plain=1.0)  # drafting never pays at 100x the time
    out = generate_ids(t, PROMPTS_SMALL, slow, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    drafted = len(slow.sizes) - slow.skipped
    # 5 drafted steps (the first is not timed), a plain one that measures, then pauses of 1,
    # 2, 4, 8, 16 ... steps, each followed by one drafted probe
    assert slow.skipped > 0 and drafted <= 10, (drafted, slow.skipped)
    never = _timed_tree(d, drafted=100.0, plain=1.0, fallback=False)
    generate_ids(t, PROMPTS_SMALL, never, max_new_tokens=40)
    assert never.skipped == 0
    fast = _timed_tree(d, drafted=1.0, plain=1.0, refresh=8)  # >= 1 token a row: never slower
    generate_ids(t, PROMPTS_SMALL, fast, max_new_tokens=40)
    drafted = len(fast.sizes) - fast.skipped
    assert 1 <= fast.skipped <= 1 + drafted // 8  # only the plain steps that measure
    fixed = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=4)
    fixed._clock = _StepClock(fixed, 100.0, 1.0)
    generate_ids(t, PROMPTS_SMALL, fixed, max_new_tokens=20)
    assert fixed.skipped == 0 and set(fixed.sizes) == {4}  # a fixed size means every step
    for name in ("max_skip", "refresh"):
        with pytest.raises(ValueError, match=name):
            DynamicTreeDraft(d, **{name: 0})


def test_the_pause_policy_follows_the_measured_rates(trained):
    """_decide: draft the first WARM_UP (4) measured steps, then measure a plain step; pause 1,
    2, 4 ... up to max_skip steps (fewer for a small deficit) while drafted steps are slower than 0.9x plain ones, with a
    drafted probe after each pause; a step that drafts on the rates halves the back-off; re-measure the plain rate every `refresh` drafted steps."""
    _, d, _ = trained
    g = DynamicTreeDraft(d, max_skip=4, refresh=5)

    def run(n, drafted_rate, plain_rate=1.0):
        seen = []
        for _ in range(n):
            step = g._decide()
            seen.append("d" if step else "p")
            g._account(step, drafted_rate if step else plain_rate, 1.0)
        return "".join(seen)

    assert run(6, 0.2) == "dddd" + "p" + "p"  # warm-up, the plain measure, a first pause of 1
    assert run(18, 0.2) == "d" + "pp" + "d" + "pppp" + "d" + "pppp" + "d" + "pppp"  # pauses of 2, 4, 4, 4
    # probes at 3 tokens a step: the first leaves the weighted drafted rate at ~0.70, the
    # second lifts it to ~1.09 (and the drafted steps halve the back-off down to 0)
    assert run(8, 3.0) == "dpppp" + "ddd"
    g._rates[False] = (1.0, 1.0, 1)
    assert run(7, 3.0) == "dd" + "p" + "dddd"  # a plain step every 5 drafted ones
    assert g._backoff == 0
    g._rates, g._since_plain = {True: (0.95, 1.0, 9), False: (1.0, 1.0, 1)}, 0
    assert run(3, 0.95) == "ddd"  # within the margin: no pause
    # one step at 0.5 brings it to 0.89: pauses as long as the deficit allows (_longest_pause,
    # with max_skip 4): 1 at 0.89 and 0.84, 2 at 0.80, 3 at 0.76
    assert run(9, 0.5) == "d" + "p" + "d" + "p" + "d" + "pp" + "d" + "p"
    # the longest run of plain steps: a refresh step, then a full pause
    g = DynamicTreeDraft(d, max_skip=2, refresh=1)
    assert max(len(r) for r in run(60, 0.2).split("d")) == 3
    # a step that drafts on the rates halves the back-off, and losing again doubles it back
    g = DynamicTreeDraft(d, max_skip=8, refresh=100)
    g._rates, g._backoff = {True: (1.0, 1.0, 9), False: (1.0, 1.0, 1)}, 8
    assert run(1, 1.0) == "d" and g._backoff == 4
    # one more drafted step (4 -> 2) at 0.1 sinks the rate to 0.89, just below 0.9: a pause of
    # 1 only; a rate far below doubles the back-off again
    assert run(2, 0.1) == "dp" and g._backoff == 1 and g._skip == 0
    g._backoff, g._probe, g._rates[True] = 4, False, (0.5, 1.0, 9)
    assert run(1, 0.5) == "p" and g._backoff == 8 and g._skip == 7


def test_the_longest_pause_grows_with_the_deficit(trained):
    """Pauses may reach max_skip only when drafted steps lose by DEEP below PAUSE_BELOW; just
    below the threshold a probe follows every step or two."""
    _, d, _ = trained
    g = DynamicTreeDraft(d, max_skip=64)
    assert (g.PAUSE_BELOW, g.DEEP) == (0.9, 0.2)
    assert [g._longest_pause(r) for r in (0.95, 0.9, 0.89, 0.85, 0.8, 0.75, 0.7, 0.3)] == [1, 1, 3, 16, 32, 48, 64, 64]
    # through the policy: at 0.8x the plain rate, pauses double up to 32, not 64
    g._rates, g._since_plain, g.refresh = {True: (0.8, 1.0, 9), False: (1.0, 1.0, 1)}, 0, 10 ** 6
    lengths = []
    for _ in range(12):
        assert g._decide() is False
        lengths.append(g._backoff)
        g._skip, g._probe = 0, False  # skip the pause and its probe: ask again at once
    assert lengths == [1, 2, 4, 8, 16, 32, 32, 32, 32, 32, 32, 32]


def test_the_pause_policy_remembers_its_rates_per_batch_size(trained):
    """A second generation at the same batch size starts from the first one's rates and pause
    length (no warm-up, pauses of max_skip at once), its drafted rate down-weighted; a new batch
    size starts afresh."""
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    slow = _timed_tree(d, drafted=100.0, plain=1.0, max_skip=8)

    def drafted_steps(prompts):
        before, skipped = len(slow.sizes), slow.skipped
        out = generate_ids(t, prompts, slow, max_new_tokens=40)
        steps = len(slow.sizes) - before
        return out, steps - (slow.skipped - skipped), steps

    out, first, steps = drafted_steps(PROMPTS_SMALL)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    assert first >= 5 and slow._backoff == 8  # the warm-up, then pauses of 1, 2, 4, 8
    out, second, steps = drafted_steps(PROMPTS_SMALL)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    # a pause of 8 straight away (a cold plain step first, not timed): only the probes draft
    assert second <= -(-steps // 9) and second < first, (first, second, steps)
    _, single, _ = drafted_steps(PROMPTS_SMALL[:1])
    assert single >= 5  # batch 1 has no rates yet: it warms up
    _, again, steps = drafted_steps(PROMPTS_SMALL)  # batch 3's rates were kept aside
    assert again <= -(-steps // 9), (again, steps)
    # the drafted rate comes back as a weak prior: same rate, a quarter of the weight
    tok, sec, n = slow._rates[True]
    slow._new_generation(3)
    assert slow._rates[True] == (slow.CARRY * tok, slow.CARRY * sec, n) and slow.CARRY == 0.25


def test_calibration_records_what_was_accepted(trained):
    t, d, _ = trained
    rec = Calibration()
    out = generate_ids(t, PROMPTS_SMALL, DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=10, record=rec,
                                                          lookup=0), max_new_tokens=30)
    rows = rec.table()
    steps = sum(len(o.accepted) for o in out)
    assert sum(r["nodes"] for r in rows) == 10 * steps
    accepted_nodes = sum(a - 1 for o in out for a in o.accepted)
    assert sum(r["observed"] * r["nodes"] for r in rows) == pytest.approx(accepted_nodes)
    assert all(r["bucket"][0] <= r["predicted"] <= r["bucket"][1] for r in rows)
    back = Calibration.from_dict(rec.to_dict())
    v = torch.tensor([0.01, 0.5, 0.95])
    assert torch.equal(back.mapping(v), rec.mapping(v))


def test_mapping_ignores_buckets_with_too_few_nodes():
    cal = Calibration(edges=[0, 0.5, 1.0001])
    cal.add(torch.full((30,), 0.2), torch.arange(30) < 3)  # 30 nodes, 10% accepted
    cal.add(torch.full((5,), 0.9), torch.zeros(5, dtype=torch.bool))  # 5 nodes: too few
    f = cal.mapping(torch.tensor([0.3, 0.8]))
    assert f.tolist() == pytest.approx([0.1, 0.8])
    assert cal.mapping(torch.tensor([0.8]), min_nodes=5).tolist() == [0.0]
    cal.add(torch.full((30,), 0.2), torch.ones(30, dtype=torch.bool))  # new nodes: the rates are redone
    assert cal.mapping(torch.tensor([0.3])).tolist() == pytest.approx([0.55])


def test_calibration_ships_in_the_draft_folder_and_sizes_the_tree(trained, tmp_path):
    from glide import api
    from glide.draft import save_draft
    from glide.draft.dynamic import load_calibration, record_calibration, save_calibration

    t, d, _ = trained
    folder = save_draft(d, tmp_path / "d")
    assert load_calibration(folder, 0.0) is None  # none shipped: raw probabilities
    greedy, sizes, cost = record_calibration(t, d, PROMPTS_SMALL, max_new_tokens=12)
    assert len(cost.sizes) == len(cost.seconds) >= 2
    assert sum(greedy.count) >= len(sizes) > 0
    with pytest.raises(ValueError, match="prompts"):
        record_calibration(t, d, [], max_new_tokens=4)
    # an all-rejecting table for sampling: the tree must shrink to nothing beyond the root
    never = Calibration()
    never.add(torch.linspace(0, 1, 5000), torch.zeros(5000, dtype=torch.bool))  # every bucket well filled
    save_calibration(folder, {"greedy": greedy, "sampled": never}, {"prompts": len(PROMPTS_SMALL)})
    assert load_calibration(folder / "config.json", 0.0).count == greedy.count  # a file names its folder
    assert load_calibration(folder, 0.7).accepted == never.accepted  # any T > 0 reads "sampled"
    draft = api.make_draft("glide", str(folder), t, tree="dynamic", temperature=1.0)
    assert draft.calibration.accepted == never.accepted
    draft.cost = _flat_cost(0.01)  # no timing noise: only the calibration decides the size
    draft.fallback = False  # every step drafts: an empty tree is the calibration's doing
    draft.lookup = 0  # lookup's measured rates are not the calibration's (see the test below)
    out = generate_ids(t, PROMPTS_SMALL, draft, max_new_tokens=8, temperature=1.0)
    assert set(draft.sizes) == {0} and all(a == 1 for o in out for a in o.accepted)
    plain = DynamicTreeDraft(d, cost=_flat_cost(0.01))  # the same draft, uncalibrated, grows trees
    generate_ids(t, PROMPTS_SMALL, plain, max_new_tokens=8, temperature=1.0)
    assert max(plain.sizes) > 0
    with pytest.raises(ValueError, match="tables"):
        save_calibration(folder, {"hot": never})
    (folder / "calibration.json").write_text('{"format": "glide-calibration", "tables": {"greedy": {"edges": [0, 1]}}}')
    with pytest.raises(ValueError, match="^draft: cannot read"):
        load_calibration(folder, 0.0)
    with pytest.raises(api.ArgumentError, match="calibration.json"):
        api.make_draft("glide", str(folder), t, tree="dynamic")


def test_verify_cost_is_measured_and_cached(tmp_path):
    t = tiny_target(dtype=torch.float32)
    c = VerifyCost.cached(t, 2, 20, path=tmp_path / "vc.json")
    assert len(c.sizes) == len(c.seconds) and all(s > 0 for s in c.seconds)
    again = VerifyCost.cached(t, 2, 20, path=tmp_path / "vc.json")
    assert again.seconds == c.seconds  # read back, not measured again
    (tmp_path / "vc.json").write_text("{broken")
    assert len(VerifyCost.cached(t, 2, 20, path=tmp_path / "vc.json").seconds) == len(c.sizes)
    assert VerifyCost([1, 3], [1.0, 2.0])(np.array([2, 5])).tolist() == [1.5, 3.0]


def test_verify_cost_reads_a_non_decreasing_lower_envelope():
    # a spike at 24 and at 48 (a size measured while the machine was busy), unsorted sizes
    c = VerifyCost([1, 8, 32, 24, 16, 48, 64], [1.0, 1.2, 1.5, 3.0, 1.3, 4.0, 2.0])
    x, y = c.envelope()
    assert x.tolist() == [1, 8, 16, 24, 32, 48, 64]
    assert y.tolist() == [1.0, 1.2, 1.3, 1.5, 1.5, 2.0, 2.0]
    assert c(np.array([24, 40, 96])).tolist() == [1.5, 1.75, 2.0]  # flat last segment: flat beyond
    clean = VerifyCost([1, 2, 4], [1.0, 1.5, 3.0])
    assert clean.envelope()[1].tolist() == [1.0, 1.5, 3.0]  # a rising curve is left alone


def test_verify_cost_is_measured_in_rounds_over_the_sizes(monkeypatch):
    t = tiny_target(dtype=torch.float32)
    seen = []
    forward = type(t).forward

    def spy(self, ids, *a, **k):
        seen.append(ids.shape[1])
        return forward(self, ids, *a, **k)
    monkeypatch.setattr(type(t), "forward", spy)
    c = VerifyCost.measure(t, 1, 16, sizes=(1, 4, 8), reps=2)
    assert seen == [1, 4, 8] * 3  # a warm-up round, then two
    assert c.sizes == [1, 4, 8] and len(c.seconds) == 3


def test_sampling_with_the_dynamic_tree_has_the_ar_law():
    tv, first = _sampled_tv(1.0, 1.0, lambda m: _glide_on(m, DynamicTreeDraft, depth=2, top_k=3, beam=2,
                                                        fixed_size=6))
    assert (first >= 2).double().mean() > 0.3 and (first == 3).double().mean() > 0.01
    assert tv < TV_BOUND, f"TV {tv:.4f} >= {TV_BOUND:.4f}"


def test_verify_cost_key_tells_apart_what_changes_cpu_timings(monkeypatch):
    """A curve measured under another dtype, batch, thread count, OpenMP wait policy or forward
    version is not reused."""
    from glide.draft.dynamic import VerifyCost

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    t32, t64 = tiny_target(dtype=torch.float32), tiny_target(dtype=torch.float64)
    base = VerifyCost.key(t32, 1, 256)
    assert VerifyCost.key(t32, 1, 256) == base and VerifyCost.key(t32, 1, 300) == base  # same context bucket
    assert VerifyCost.key(t64, 1, 256) != base and VerifyCost.key(t32, 2, 256) != base
    assert VerifyCost.key(t32, 1, 1024) != base
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert VerifyCost.key(t32, 1, 256) != base
    monkeypatch.delenv("OMP_WAIT_POLICY")
    import glide.draft.dynamic as dynamic

    monkeypatch.setattr(dynamic, "FORWARD_VERSION", dynamic.FORWARD_VERSION + 1)  # a faster forward
    assert VerifyCost.key(t32, 1, 256) != base
    monkeypatch.undo()
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert VerifyCost.key(t32, 1, 256) != base
    finally:
        torch.set_num_threads(threads)


def test_the_draft_caches_room_is_checked_before_decoding(trained):
    """A request that leaves room for the verification tree but not for the dynamic tree's own
    scratch rows fails up front, naming max_new_tokens, not inside the draft's begin."""
    t, d, _ = trained
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, max_nodes=8)
    assert g.reserve() == g.cache_extra() > 1 + g.max_nodes
    prompt = PROMPTS_SMALL[0]
    n = t.config.max_position_embeddings - len(prompt) - (1 + g.max_nodes)  # fits the tree alone
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(t, [prompt], g, max_new_tokens=n)
    # the most that fits, with pauses up to max_skip: catch-ups run up to the cache's end
    slow = _timed_tree(d, drafted=100.0, plain=1.0, max_nodes=8)
    fit = t.config.max_position_embeddings - len(prompt) - slow.reserve()
    out = generate_ids(t, [prompt], slow, max_new_tokens=fit)
    assert len(out[0].output_ids) == fit and slow.skipped > 30
    assert out[0].output_ids == generate_ids(t, [prompt], None, max_new_tokens=fit)[0].output_ids


def test_a_paused_tree_through_the_static_graph_path_equals_ar(trained):
    """The empty proposals of a pause run as one-token forwards through CudaGraphs' static
    buffers (bucket 1, capture off on the CPU), committing nothing for finished rows."""
    from glide.model.graphs import CudaGraphs

    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    slow = _timed_tree(d, drafted=100.0, plain=1.0)
    out = generate_ids(t, PROMPTS_SMALL, slow, max_new_tokens=40, cuda_graphs=CudaGraphs(t, capture=False))
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    assert slow.skipped >= 5  # pauses of 1, 2, 4 ... after the warm-up


class _CheckedLevels(DynamicTreeDraft):
    """Runs every grown level through the static-buffer path and, beside it, eagerly with the
    same inputs (both write the same draft K/V rows): the two must agree exactly."""

    def _level_step(self, ctx, ids, pos, mask, cross, glimpse):
        want = self.model.step(ids, pos, mask, self.cache, cross, last_rows=self.beam, glimpse=glimpse)
        got = super()._level_step(ctx, ids, pos, mask, cross, glimpse)
        assert torch.equal(got, want)
        self.levels_checked = getattr(self, "levels_checked", 0) + 1
        return got


def test_the_dynamic_trees_levels_through_static_buffers_equal_eager_ones(trained):
    """With CUDA graphs asked for (capture off on the CPU), each level's forward runs from
    static copies of its inputs, one set per run width and generation: every level gives the
    eager logits, the output equals AR's, and the widths met each have their buffers."""
    from glide.model.graphs import CudaGraphs

    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    g = _CheckedLevels(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0), min_expand=0.0, fallback=False)
    out = generate_ids(t, PROMPTS_SMALL, g, max_new_tokens=40, cuda_graphs=CudaGraphs(t, capture=False))
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    assert g.levels_checked >= 10
    widths = sorted(k[1] for k in g._graphs if isinstance(k, tuple) and k[0] == "level")
    assert widths and set(widths) <= {2, 4, 6}  # beam 2: 2, 4 or 6 run rows at depths 2-4
    # eagerly (no graphs asked for), no buffers at all
    e = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0), min_expand=0.0, fallback=False)
    generate_ids(t, PROMPTS_SMALL, e, max_new_tokens=40)
    assert not any(isinstance(k, tuple) for k in e._graphs)


def test_a_refused_level_capture_falls_back_to_eager_levels_with_a_warning(trained, monkeypatch):
    """Where the CUDA runtime refuses a level's capture, the tree warns once and drafts its
    levels eagerly for the rest of the generation; the output stays AR's."""
    from glide.model import graphs

    class _Capturing(DynamicTreeDraft):
        def use_cuda_graphs(self, capture):
            self._graph_mode = True  # as on CUDA; the patched run below refuses to capture

    calls = []

    def refuse(self):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs.CapturedCall, "run", refuse)
    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=40)
    g = _Capturing(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0), min_expand=0.0, fallback=False)
    with pytest.warns(RuntimeWarning, match="level forwards run eagerly"):
        out = generate_ids(t, PROMPTS_SMALL, g, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    assert len(calls) == 1 and g._level_graphs_failed  # one refusal, then eager


def test_capturing_the_levels_in_begin_leaves_the_committed_draft_cache_alone(trained, monkeypatch):
    """begin() runs every level width once on placeholders (to capture it on CUDA; here the
    capture is faked, the function runs eagerly). Those writes must stay in rows the first
    catch-up rewrites: the prompt's draft K/V below each root are the same as without them."""
    from glide.model import graphs

    monkeypatch.setattr(graphs.CapturedCall, "run", lambda self: self.fn())
    snapshots = {}

    class _Snap(DynamicTreeDraft):
        def use_cuda_graphs(self, capture):
            self._graph_mode = True

        def _capture_levels(self, ctx):
            before = self.cache.kv.clone()
            super()._capture_levels(ctx)
            snapshots["rows"] = (ctx.lengths - 1).tolist()
            snapshots["before"], snapshots["after"] = before, self.cache.kv.clone()

    t, d, _ = trained
    ar = generate_ids(t, PROMPTS_SMALL, None, max_new_tokens=20)
    g = _Snap(d, depth=4, top_k=3, beam=2, cost=_flat_cost(0.0), min_expand=0.0, fallback=False)
    out = generate_ids(t, PROMPTS_SMALL, g, max_new_tokens=20)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    before, after = snapshots["before"], snapshots["after"]
    for b, root in enumerate(snapshots["rows"]):
        assert torch.equal(after[:, :, b, :, :root], before[:, :, b, :, :root]), b
        assert not torch.equal(after[:, :, b, :, root:root + 6], before[:, :, b, :, root:root + 6])  # written


# ---------------------------------------------------------------- prompt lookup in the dynamic tree
_lookup_ctx = history_context  # a context over committed rows (each history ends at its root)


def test_lookup_tokens_merge_into_equal_candidates_and_extend_the_tree(trained):
    t, d, _ = trained
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, lookup=3)
    # lookup tokens after 2-gram matches have all matched so far (rate 3/4 a level with the prior),
    # the others are at the prior 1/2
    g._lookup_counts = torch.zeros(2, 4, 3, dtype=torch.float64)
    g._lookup_counts[:, 2] = 2.0
    # row 0: the last 2-gram [1, 2] was followed by [3, 6, 1]; row 1: only [4] follows a 1-gram
    ctx = _lookup_ctx(t, [[5, 1, 2, 3, 6, 1, 2], [4, 4]])
    tok = torch.tensor([[3, 7, 6, 5], [2, 4, 5, 1]])
    v = torch.tensor([[0.5, 0.3, 0.45, 0.05], [0.6, 0.55, 0.3, 0.1]])
    parent = torch.tensor([[-1, -1, 0, 0], [-1, -1, 0, 0]])
    depth = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2]])
    tok, v, parent, depth, (chain, ok, n, touched) = g._merge_lookup(ctx, tok, v, parent, depth)
    assert chain[0].tolist() == [3, 6, 1] and ok.tolist() == [[True] * 3, [True, False, False]]
    assert n.tolist() == [2, 1]
    # row 0: 3 and 6 exist under the same parents and lookup's estimates are higher (0.75, then
    # 0.75 * 0.75): raised, not duplicated; 1 joins under 6 at 6's v times the rate
    assert v[0].tolist() == pytest.approx([0.75, 0.3, 0.5625, 0.05, -1, -1, 0.421875])
    assert parent[0].tolist() == [-1, -1, 0, 0, -1, 0, 2] and depth[0].tolist() == [1, 1, 2, 2, 1, 2, 3]
    assert touched[0].tolist() == [True, False, True, False, False, False, True]
    # row 1: 4 is a root candidate already, and the draft's 0.55 beats lookup's 0.5: it keeps
    # its own v and stays the draft's; nothing follows it
    assert v[1].tolist() == pytest.approx([0.6, 0.55, 0.3, 0.1, -1, -1, -1])
    assert parent[1].tolist() == [-1, -1, 0, 0, -1, 1, 5] and not touched[1].any()
    # told that the candidates are at most 2 deep (what propose knows), the walk up the
    # ancestors is shorter and the merge the same
    tok0 = torch.tensor([[3, 7, 6, 5], [2, 4, 5, 1]])
    v0 = torch.tensor([[0.5, 0.3, 0.45, 0.05], [0.6, 0.55, 0.3, 0.1]])
    par0 = torch.tensor([[-1, -1, 0, 0], [-1, -1, 0, 0]])
    dep0 = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2]])
    again = g._merge_lookup(ctx, tok0, v0, par0, dep0, deepest=2)
    for a, b in zip(again[:4] + again[4], (tok, v, parent, depth, chain, ok, n, touched)):
        assert torch.equal(a, b)


def _chain_estimates_by_loop(rate, own, found, ok):
    """chain_estimates as it was first written, one chain token at a time (the reference)."""
    cur = torch.ones(rate.shape[0], dtype=torch.float64)
    est, wants = [], []
    for j in range(rate.shape[1]):
        want = cur * rate[:, j].double()
        cur = torch.where(found[:, j], torch.maximum(own[:, j].double(), want),
                          torch.where(ok[:, j] & (cur >= 0), want, -1.0))
        est.append(cur)
        wants.append(want)
    return torch.stack(est, 1), torch.stack(wants, 1)


@pytest.mark.parametrize("seed", range(5))
def test_chain_estimates_equal_the_loop_down_the_chain(seed):
    """Random rates (down to 1e-5, whose products leave float32's range), own values, found
    tokens inside a valid prefix: the cumulative form gives the loop's estimates, and the
    loop's ``want`` wherever the token is valid."""
    from glide.draft.dynamic import chain_estimates

    g = torch.Generator().manual_seed(seed)
    B, k = 64, 12
    rate = torch.exp(-torch.rand(B, k, generator=g) * (11.5 if seed % 2 else 2.0))
    own = torch.rand(B, k, generator=g)
    valid_len = torch.randint(0, k + 1, (B,), generator=g)
    ok = torch.arange(k)[None, :] < valid_len[:, None]
    found = ok & (torch.rand(B, k, generator=g) < 0.4)
    est, want = chain_estimates(rate, own, found, ok)
    ref_est, ref_want = _chain_estimates_by_loop(rate, own, found, ok)
    assert est.dtype == rate.dtype and torch.isfinite(est).all()
    torch.testing.assert_close(est.double(), ref_est, rtol=1e-6, atol=0)
    torch.testing.assert_close(want.double()[ok], ref_want[ok], rtol=1e-6, atol=0)
    assert (est[~ok] == -1).all()


def test_lookup_estimates_are_not_calibrated_as_the_drafts(trained):
    """A calibration maps the draft's path probabilities; a lookup estimate is a measured rate."""
    _, d, _ = trained
    never = Calibration()
    never.add(torch.linspace(0, 1, 5000), torch.zeros(5000, dtype=torch.bool))  # the draft is never right
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, calibration=never)
    v = torch.tensor([[0.9, 0.8, 0.1]])
    measured = torch.tensor([[False, True, False]])
    f = g._expected(v, torch.tensor([True]), measured)
    assert f[0].tolist() == pytest.approx([0.0, 0.8, 0.0])
    g.cost = _flat_cost(0.01)
    assert g._best_size(v, 0.0, torch.tensor([True]))[0] == 0  # the calibration alone: nothing pays
    assert g._best_size(v, 0.0, torch.tensor([True]), measured)[0] == 2  # the lookup node does


def test_lookup_rates_count_the_target_tokens_and_the_calibration_skips_lookup_nodes(trained):
    t, d, _ = trained
    rec = Calibration()
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, lookup=3, record=rec)
    g._lookup_counts = torch.zeros(2, 4, 3, dtype=torch.float64)
    prop = Proposal(torch.tensor([[3, 6, 9], [4, 5, 2]]), torch.tensor([[0, 1, 1], [0, 0, 2]]),
                    torch.ones(2, 3, dtype=torch.bool), torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.4, 0.1]]))
    # row 0's lookup guessed 3, 9, 2: the 2 is right, but after a miss it is not counted
    chain, ok = torch.tensor([[3, 9, 2], [4, 0, 0]]), torch.tensor([[True] * 3, [True, False, False]])
    touched = torch.tensor([[True, False, False], [True, False, False]])
    root_pos = torch.tensor([2, 1])
    g._last = (prop, root_pos, torch.tensor([[1, 2, 2], [1, 1, 2]]), (chain, ok, torch.tensor([3, 1])), touched)
    # committed after the roots: row 0 took 3, 6 and the bonus 2; row 1 took 5, 2 and the bonus 8
    ctx = _lookup_ctx(t, [[7, 8, 9, 3, 6, 2], [7, 8, 5, 2, 8]])
    g.observe(ctx)
    seen, matched = g._lookup_counts
    # seen: the target's token is known and every lookup token above matched; by suffix length
    assert seen.tolist() == [[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert matched.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert sum(rec.count) == 4  # the untouched nodes: 6 and 9 (row 0), 5 and 2 (row 1)
    assert sum(rec.accepted) == 3  # 6, 5 and 2; 3 was accepted too, but lookup touched it


@pytest.mark.parametrize("kw", [dict(depth=4, top_k=3, beam=2, fixed_size=12, lookup=3),
                                dict(depth=3, top_k=2, beam=2, cost=_flat_cost(0.01), lookup=8)])
def test_dynamic_tree_with_lookup_equals_ar(trained, kw):
    t, d, _ = trained
    prompts = PROMPTS_SMALL + [[2, 5, 2, 5, 2, 5, 2]]
    ar = generate_ids(t, prompts, None, max_new_tokens=40)
    dyn = DynamicTreeDraft(d, **kw)
    out = generate_ids(t, prompts, dyn, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    seen, matched = dyn._lookup_counts
    assert seen[:, 0].sum() > 0 and matched[:, 0].sum() > 0  # lookup guessed, and the target agreed at times
    if kw["lookup"] > kw["depth"]:  # chains deeper than the grown tree were accepted, and caught up
        assert max(a for o in out for a in o.accepted) > kw["depth"] + 1


def test_a_tree_with_lookup_keeps_its_invariants(trained):
    t, d, _ = trained
    prompts = [[1, 3, 0, 4, 3, 1, 3], [4, 0, 4]]
    B = 2
    for size in (15, 40):  # 40: every column, lookup's not offered (row 1's) too
        g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, max_nodes=40, fixed_size=size, min_expand=0.0, lookup=4)
        ctx = _lookup_ctx(t, prompts)
        g.begin(ctx)
        prop = g.propose(ctx)
        prop.validate(B, vocab_size=t.config.vocab_size)
        build_tree(ctx.root, prop)
        columns = 3 + 3 * 2 * 3 + 4  # the root's top-3, three grown levels of beam 2 x top-3, lookup's
        assert prop.num_nodes == min(size, columns) and (size == 15 or not prop.valid.all())
        v = torch.where(prop.valid, prop.draft_probs, -1.0)
        pv = torch.cat([torch.ones(B, 1), v], 1).gather(1, prop.parents.clamp(min=0))
        assert (v[prop.valid] <= pv[prop.valid] + 1e-6).all()  # a child never outranks its parent
        for b in range(B):
            kids = {}
            for i in range(prop.num_nodes):
                if prop.valid[b, i]:
                    kids.setdefault(int(prop.parents[b, i]), []).append(int(prop.tokens[b, i]))
            assert all(len(k) == len(set(k)) for k in kids.values())  # no duplicate siblings
        # row 0's last 2-gram [1, 3] was followed by [0, 4, 3, 1]: the chain hangs under the root,
        # once, whether the draft proposed its tokens too or not
        path, slot = [], 0
        for want in (0, 4, 3, 1):
            nxt = [i + 1 for i in range(prop.num_nodes) if prop.valid[0, i] and prop.parents[0, i] == slot
                   and prop.tokens[0, i] == want]
            if not nxt:
                break
            assert len(nxt) == 1
            path.append(want)
            slot = nxt[0]
        assert path[:1] == [0]
        if size == 40:  # every live candidate is in: the whole chain
            assert path == [0, 4, 3, 1]


def test_sampling_with_lookup_in_the_dynamic_tree_has_the_ar_law():
    tv, first = _sampled_tv(1.0, 1.0, lambda m: _glide_on(m, DynamicTreeDraft, depth=2, top_k=3, beam=2,
                                                        fixed_size=6, lookup=2))
    assert (first >= 2).double().mean() > 0.3
    assert tv < TV_BOUND, f"TV {tv:.4f} >= {TV_BOUND:.4f}"


def test_lookup_sizes_are_checked(trained):
    _, d, _ = trained
    with pytest.raises(ValueError, match="lookup must"):
        DynamicTreeDraft(d, lookup=-1)
    with pytest.raises(ValueError, match="lookup_ngram"):
        DynamicTreeDraft(d, lookup=2, lookup_ngram=0)
    for name in ("depth", "top_k", "beam", "max_nodes"):  # each error names the argument given
        with pytest.raises(ValueError, match=f"^{name} must"):
            DynamicTreeDraft(d, **{name: 0})
    deep = DynamicTreeDraft(d, depth=3, beam=2, max_nodes=8, lookup=9)
    assert deep.lookup == 8  # a chain fits the tree's nodes
    assert deep.cache_extra() == max(8, 2 * 2) + 8 + 2  # the catch-up window reaches as deep
