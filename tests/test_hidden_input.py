"""Drafts that read the target's final hidden state (``hidden_input``): the runner's hidden
output, the features that store it, the engine's bookkeeping of it, the draft's decoding path
against its training path, and training from a draft without it."""

import json

import numpy as np
import pytest
import torch

from glide.draft import GlideDraft, block_cross_mask, load_draft, save_draft
from glide.draft.cape import CapeDraft
from glide.draft.dynamic import DynamicTreeDraft
from glide.speculative.drafts import DraftContext, RandomTreeDraft
from glide.speculative.engine import generate_ids

from glide_helpers import self_distilled_corpus, tiny_draft, tiny_target

PROMPTS = [[1, 5, 7, 9, 3], [4, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def _full_hidden(target, ids):
    """The target's final hidden states over ``ids`` (list of int), from an empty cache."""
    S = len(ids)
    cache = target.new_cache(1, S)
    x = torch.tensor([ids])
    causal = torch.ones(1, S, S, dtype=torch.bool).tril()
    return target.forward(x, torch.arange(S)[None], causal, cache, return_hidden=True)[1][0]


# ---------------------------------------------------------------- the runner
def test_forward_returns_the_heads_input(target):
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    B, S = ids.shape
    pos = torch.arange(S).expand(B, S)
    causal = torch.ones(B, S, S, dtype=torch.bool).tril()
    plain = target.forward(ids, pos, causal, target.new_cache(B, S))
    logits, hidden = target.forward(ids, pos, causal, target.new_cache(B, S), return_hidden=True)
    assert hidden.shape == (B, S, target.config.hidden_size) and hidden.dtype == target.dtype
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    torch.testing.assert_close(target.lm_head(hidden), plain, rtol=1e-12, atol=1e-12)
    # the head's rows do not change the hidden states, which cover every new token
    idx = torch.tensor([2, 4])
    li, hi = target.forward(ids, pos, causal, target.new_cache(B, S), logits_index=idx, return_hidden=True)
    torch.testing.assert_close(hi, hidden, rtol=0, atol=0)
    torch.testing.assert_close(li, plain[torch.arange(B), idx], rtol=1e-12, atol=1e-12)
    rows = torch.zeros(B, S, dtype=torch.bool)
    lr, hr = target.forward(ids, pos, causal, target.new_cache(B, S), logits_rows=rows, return_hidden=True)
    assert lr.shape == (0, target.config.vocab_size)
    torch.testing.assert_close(hr, hidden, rtol=0, atol=0)


def test_prefill_and_decode_return_hidden_states(target):
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    cache = target.new_cache(2, 12)
    logits, hidden = target.prefill(prompts, cache, return_hidden=True)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(hidden[b, :len(p)], _full_hidden(target, p), rtol=1e-10, atol=1e-12)
    nxt = logits.argmax(-1)
    logits2, h2 = target.decode(nxt, cache, return_hidden=True)
    assert logits2.shape == (2, target.config.vocab_size) and h2.shape == (2, target.config.hidden_size)
    for b, p in enumerate(prompts):
        want = _full_hidden(target, p + [int(nxt[b])])[-1]
        torch.testing.assert_close(h2[b], want, rtol=1e-10, atol=1e-12)
    assert cache.lens.tolist() == [6, 3]


# ---------------------------------------------------------------- the engine's bookkeeping
class _Checking(RandomTreeDraft):
    """A random-tree draft that reads the hidden states, and checks them after every commit
    against a fresh target pass over each sequence's committed tokens."""

    needs_hidden = True

    def __init__(self, target, **kw):
        super().__init__(**kw)
        self.target, self.checked, self.empty = target, 0, 0

    def propose(self, ctx):
        prop = super().propose(ctx)
        self.empty += prop.tokens.shape[1] == 0
        return prop

    def begin(self, ctx):
        super().begin(ctx)
        self._check(ctx)

    def observe(self, ctx):
        super().observe(ctx)
        self._check(ctx)

    def _check(self, ctx):
        for b in range(ctx.tokens.shape[0]):
            if not bool(ctx.active[b]):
                continue
            n = int(ctx.lengths[b]) - 1  # the verified positions: all but the root
            want = _full_hidden(self.target, ctx.tokens[b, :n].tolist())
            torch.testing.assert_close(ctx.hidden_states[b, :n], want, rtol=1e-9, atol=1e-11)
            self.checked += 1


@pytest.mark.parametrize("greedy", [True, False])
def test_the_engine_keeps_the_targets_hidden_state_at_every_verified_position(target, greedy):
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=30)
    refs = [o.output_ids for o in ar]
    draft = _Checking(target, max_nodes=6, seed=3, references=refs, p_correct=0.7)
    kw = {} if greedy else dict(temperature=1.0, seed=5)
    out = generate_ids(target, PROMPTS, draft, max_new_tokens=30, **kw)
    accepted = [a for o in out for a in o.accepted]
    # ragged acceptance (several tokens a step), and paused steps (random trees of no node)
    assert draft.checked > 20 and draft.empty > 0 and max(accepted) >= (3 if greedy else 2) and 1 in accepted
    if greedy:
        assert [o.output_ids for o in out] == refs


def test_the_static_graph_path_keeps_the_hidden_states_too(target):
    """CudaGraphs' static buffers (capture off on the CPU) return the hidden states as the eager
    forward does: graphs of their own, padding rows cut."""
    from glide.model.graphs import CudaGraphs

    ar = generate_ids(target, PROMPTS, None, max_new_tokens=30)
    refs = [o.output_ids for o in ar]
    graphs = CudaGraphs(target, capture=False)
    draft = _Checking(target, max_nodes=6, seed=4, references=refs, p_correct=0.7)
    out = generate_ids(target, PROMPTS, draft, max_new_tokens=30, cuda_graphs=graphs)
    assert [o.output_ids for o in out] == refs
    assert draft.checked > 20 and draft.empty > 0 and graphs.replays > 10
    assert any(key[-1] for key in graphs._graphs)  # graphs that return the hidden states


# ---------------------------------------------------------------- decoding == training
def test_hidden_proposal_equals_the_training_forward(target):
    """The chain drafted over the caches equals one teacher-forced training forward given the
    glimpses decoding uses: the prompt's rows, the token before the root and the root read the
    target's state before themselves; the drafted rows read the root's."""
    draft = tiny_draft(target, hidden=True)
    prompt, first = [1, 5, 7, 9, 3, 6, 2], 4
    P = len(prompt)
    cache = target.new_cache(1, P + 16)
    _, hid = target.prefill([prompt], cache, return_hidden=True)
    tokens = torch.zeros(1, P + 12, dtype=torch.int64)
    tokens[0, :P] = torch.tensor(prompt)
    tokens[0, P] = first
    states = torch.zeros(1, P + 12, target.config.hidden_size, dtype=target.dtype)
    states[0, :P] = hid[0]
    ctx = DraftContext(target, cache, tokens, torch.tensor([P + 1]), torch.tensor([first]),
                       torch.tensor([True]), hidden_states=states)
    g = GlideDraft(draft, gamma=4)
    g.begin(ctx)
    prop = g.propose(ctx)
    seq = torch.tensor([prompt + [first] + prop.tokens[0, :3].tolist()])
    S = seq.shape[1]
    pos = torch.arange(S)
    visible = pos[None, :] < torch.where(pos >= P - 1, P, pos)[:, None]
    read = torch.where(pos <= P, pos - 1, P - 1)  # the position of the state each row reads
    th = torch.where((read >= 0)[:, None], hid[0, read.clamp(min=0)], 0.0)[None]
    kv = [(cache.k(draft.config.target_layer(0))[:, :, :S], cache.v(draft.config.target_layer(0))[:, :, :S])]
    logits = draft(seq, kv, visible[None], target_hidden=th)[0, P:]
    probs = logits.softmax(-1)
    assert prop.tokens[0].tolist() == draft.vocab_ids[probs.argmax(-1)].tolist()
    torch.testing.assert_close(prop.draft_probs[0], probs.max(-1).values, rtol=1e-10, atol=1e-12)
    # and the glimpse matters: without it the same rows predict otherwise
    plain = draft(seq, kv, visible[None], target_hidden=torch.zeros_like(th))[0, P:]
    assert not torch.allclose(plain, logits)


def test_a_zero_glimpse_leaves_the_draft_unchanged(target):
    """A hidden-input draft with its projection at zero (how training starts one from a draft
    without it) proposes exactly what the draft without it proposes."""
    base = tiny_draft(target, seed=3)
    grown = tiny_draft(target, seed=3, hidden=True)
    with torch.no_grad():
        grown.hidden_proj.weight.zero_()
        for name, p in base.state_dict().items():
            grown.state_dict()[name].copy_(p)
    a = generate_ids(target, PROMPTS, GlideDraft(base, 3), max_new_tokens=16)
    b = generate_ids(target, PROMPTS, GlideDraft(grown, 3), max_new_tokens=16)
    assert [o.accepted for o in a] == [o.accepted for o in b]


@pytest.mark.parametrize("make", [lambda d: GlideDraft(d, 4), lambda d: CapeDraft(d, 3),
                                  lambda d: DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=10)])
def test_hidden_drafts_are_lossless_at_batch_3(target, make):
    d = tiny_draft(target, hidden=True)
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=24, eos_token_ids=(2,))
    sp = generate_ids(target, PROMPTS, make(d), max_new_tokens=24, eos_token_ids=(2,))
    assert [o.output_ids for o in sp] == [o.output_ids for o in ar]


def test_the_dynamic_tree_feeds_each_row_its_glimpse(target):
    """Every draft forward of the dynamic tree, through pauses, ragged acceptance and EOS: its
    catch-up rows at ``pos <= root`` read the target's state at ``pos - 1`` (a root's view, as
    in training), and every tree level reads the root's, at ``root - 1``."""
    d = tiny_draft(target, hidden=True)
    prompts = PROMPTS + [[6]]
    seen = {"checked": 0, "catch_up": 0}
    tree = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, max_nodes=12, fixed_size=8)
    tree.fallback = True
    gen = torch.Generator().manual_seed(0)
    tree._plan = lambda ctx: bool(torch.rand((), generator=gen) < 0.4)  # random pauses
    propose, step = tree.propose, d.step

    def spy_propose(ctx):
        seen["ctx"], seen["n"] = ctx, 0
        return propose(ctx)

    def spy_step(ids, pos, mask, cache, cross, **kw):
        ctx = seen.get("ctx")
        if ctx is not None:
            seen["n"] += 1
            hs, root, live = ctx.hidden_states, ctx.lengths - 1, ctx.active
            rows = torch.arange(len(root))
            if seen["n"] == 1:
                prev = (pos - 1).clamp(0, hs.shape[1] - 1)
                want = d.glimpse(torch.where((pos >= 1)[..., None], hs[rows[:, None], prev], 0.0))
                use = (pos <= root[:, None]) & live[:, None]
                seen["catch_up"] += int((use.sum(1) > 1).any())
            else:  # one glimpse a sequence, (batch, hidden), for every node of the level
                want, use = d.glimpse(hs[rows, root - 1]), live
            torch.testing.assert_close(kw["glimpse"][use], want[use], rtol=0, atol=0)
            seen["checked"] += 1
        return step(ids, pos, mask, cache, cross, **kw)

    tree.propose, d.step = spy_propose, spy_step
    out = generate_ids(target, prompts, tree, max_new_tokens=50, eos_token_ids=(2,))
    assert seen["checked"] > 30 and seen["catch_up"] > 3 and tree.skipped > 5
    assert max(a for o in out for a in o.accepted) >= 1


def test_a_hidden_draft_round_trips_and_needs_its_glimpse(target, tmp_path):
    d = tiny_draft(target, hidden=True)
    save_draft(d, tmp_path / "d", dtype=torch.float64)
    back = load_draft(tmp_path / "d", target)
    assert back.config.hidden_input and torch.equal(back.hidden_proj.weight, d.hidden_proj.weight)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["config"]["hidden_input"] is True
    g = GlideDraft(back)
    assert g.needs_hidden
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="glimpse"):
        back.step(ids, torch.tensor([[0, 1]]), torch.ones(1, 2, 2, dtype=torch.bool).tril(),
                  back.new_cache(1, 4), lambda i, q: torch.zeros_like(q))
    S = 2
    kv = [(torch.zeros(1, 2, S, 8, dtype=target.dtype), torch.zeros(1, 2, S, 8, dtype=target.dtype))]
    with pytest.raises(ValueError, match="target_hidden"):
        back(ids, kv, block_cross_mask(S, 5))
    with pytest.raises(ValueError, match="target_hidden"):
        back(ids, kv, block_cross_mask(S, 5), target_hidden=torch.zeros(1, S, 3, dtype=target.dtype))


def test_training_glimpses_read_the_state_before_each_block():
    """With the training mask, each query's glimpse is the target state at the position before
    its block's start (the root of the step that drafts it); none before the first block. A
    staler mask (one target position less) moves the glimpse with it."""
    from glide.train.trainer import _Batch, _target_hidden

    S, block, shift = 13, 5, torch.tensor([0, 2, 4])
    states = torch.randn(3, S, 6)
    batch = _Batch(torch.zeros(3, S, dtype=torch.int64), [], None, None, None, None, None, None, shift, states)
    got = _target_hidden(batch, block_cross_mask(S, block, shift))
    for b in range(3):
        for q in range(S):
            start = (q - int(shift[b])) // block * block + int(shift[b])
            want = states[b, start - 1] if start >= 1 else torch.zeros(6)
            assert torch.equal(got[b, q], want), (b, q)
    base = block_cross_mask(S, block, shift)
    stale = base & (torch.arange(S) < base.sum(-1, keepdim=True) - 1)  # one position less of the target
    lag = _target_hidden(batch, stale)
    for b in range(3):
        for q in range(S):
            start = (q - int(shift[b])) // block * block + int(shift[b])
            want = states[b, start - 2] if start >= 2 else torch.zeros(6)
            assert torch.equal(lag[b, q], want), (b, q)


# ---------------------------------------------------------------- features and training
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    t = tiny_target(seed=3, vocab=11, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=12, new_tokens=12)
    return t, samples, tmp_path_factory.mktemp("hidden")


def test_features_store_the_targets_hidden_states_and_resume(corpus):
    from glide.train.features import build_features, build_hidden, open_features

    t, samples, root = corpus
    feats = build_features(t, samples, root / "f", topk=4, progress=False, tokens_per_batch=40)
    assert not feats.has_hidden
    with pytest.raises(ValueError, match="hidden"):
        feats.sample_hidden(0)
    feats = build_hidden(t, samples, root / "f", tokens_per_batch=40, progress=False)
    assert feats.has_hidden
    want = [_full_hidden(t, s.tokens.tolist()).to(torch.bfloat16) for s in samples]
    for i, w in enumerate(want):
        torch.testing.assert_close(feats.sample_hidden(i).float(), w.float(), rtol=2e-2, atol=2e-2)
    # an interrupted pass resumes where its last whole chunk ended
    meta_path = root / "f" / "hidden.json"
    meta = json.loads(meta_path.read_text())
    meta["done"] = 5
    meta_path.write_text(json.dumps(meta))
    raw = np.memmap(root / "f" / "hidden.bin", dtype=np.int16, mode="r+").reshape(-1, t.config.hidden_size)
    order = sorted(range(len(samples)), key=lambda k: (len(samples[k].tokens), k))  # the pass's order
    for k in order:  # marked: the done samples must be kept, the rest recomputed
        a, b = int(feats.offsets[k]), int(feats.offsets[k + 1])
        raw[a:b] = 7
    raw.flush()
    assert not open_features(root / "f").has_hidden  # unfinished: not offered to training
    again = build_hidden(t, samples, root / "f", tokens_per_batch=40, progress=False)
    for rank, k in enumerate(order):
        got = again.sample_hidden(k)
        if rank < 5:
            assert (got.view(torch.int16) == 7).all()  # not recomputed
        else:
            torch.testing.assert_close(got.float(), want[k].float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="another corpus"):
        build_hidden(t, samples[:-1], root / "f", progress=False)


def test_training_a_hidden_draft_from_one_without(corpus):
    """Starting from a draft without the hidden input, the first validation equals the prior's
    (the glimpse starts at zero); training then moves the glimpse. A prior with it needs the flag,
    and features without hidden states are refused."""
    from glide.train.features import build_features, build_hidden
    from glide.train.trainer import TrainSettings, evaluate, train_draft

    t, samples, root = corpus
    feats = build_features(t, samples, root / "g", topk=4, progress=False)
    base = TrainSettings(batch_size=4, epochs=2, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None)
    train_draft(t, samples, feats, root / "base", base, progress=False)
    settings = TrainSettings(batch_size=4, epochs=2, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None,
                             hidden_input=True, init_from=str(root / "base" / "draft"))
    with pytest.raises(ValueError, match="hidden"):
        train_draft(t, samples, feats, root / "h", settings, progress=False)
    feats = build_hidden(t, samples, root / "g", progress=False)
    summary = train_draft(t, samples, feats, root / "h", settings, progress=False,
                          validation=(samples, feats), eval_every=1000)
    assert summary["steps"] == summary["planned_steps"]
    first = json.loads((root / "h" / "val.jsonl").read_text().splitlines()[0])
    prior = load_draft(root / "base" / "draft", t)
    assert first["loss"] == evaluate(prior, samples, feats, base)["loss"]
    trained = load_draft(root / "h" / "draft", t)
    assert trained.config.hidden_input and trained.hidden_proj.weight.abs().max() > 0
    # a custom cross mask pairs each query with the state at the last position it reads: for the
    # training mask itself, the same scores
    same = evaluate(trained, samples, feats, settings, cross_mask=lambda S, shift: block_cross_mask(S, 5, shift))
    assert same == evaluate(trained, samples, feats, settings)
    stale = evaluate(trained, samples, feats, settings, cross_mask=lambda S, shift: block_cross_mask(S, 5, shift + 1))
    assert stale != same
    again = TrainSettings(batch_size=4, epochs=2, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None,
                          init_from=str(root / "h" / "draft"))
    with pytest.raises(ValueError, match="hidden-input"):
        train_draft(t, samples, feats, root / "h2", again, progress=False)
