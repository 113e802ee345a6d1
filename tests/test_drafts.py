"""Drafts on their own: the proposals they make from hand-built contexts."""

import pytest
import torch

from glide.model import LlamaModel, ModelConfig
from glide.speculative.drafts import (
    DraftContext,
    ModelDraft,
    OracleDraft,
    PromptLookupDraft,
    lookup_continuation,
    RandomTreeDraft,
    WrongDraft,
)
from glide.speculative.tree import build_tree


def tiny_model(vocab=29, seed=0, std=0.3):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=96)
    torch.manual_seed(seed)
    model = LlamaModel(cfg, dtype=torch.float64, init_std=std)
    model.attn_backend = "reference"
    return model


def _ctx(histories, capacity=20, active=None, model=None):
    B = len(histories)
    tokens = torch.full((B, capacity), 7777, dtype=torch.int64)  # garbage past the lengths
    for b, h in enumerate(histories):
        tokens[b, : len(h)] = torch.tensor(h)
    lengths = torch.tensor([len(h) for h in histories])
    active = torch.ones(B, dtype=torch.bool) if active is None else torch.tensor(active)
    return DraftContext(model, None, tokens, lengths, tokens[torch.arange(B), lengths - 1], active)


def _chain(p, b):
    """The valid prefix of a chain proposal, as a list."""
    return p.tokens[b][p.valid[b]].tolist()


# ---------------------------------------------------------------- prompt lookup
def test_prompt_lookup_finds_the_latest_match_and_falls_back():
    d = PromptLookupDraft(ngram=3, num_tokens=3)
    ctx = _ctx([
        [1, 2, 3, 9, 8, 5, 1, 2, 3, 4, 6, 1, 2, 3],  # latest 3-gram match at 6: continue 4, 6, 1
        [5, 6, 7, 8, 0, 7, 8],  # no 3-gram [0, 7, 8] earlier; 2-gram [7, 8] at 2: continue 0, 7, 8
        [4, 1, 2, 3],  # no earlier occurrence of any suffix
        [3, 3, 3],  # 2-gram [3, 3] at 0: continue 3 (only one committed token follows)
        [1, 2, 1, 2],  # 3-gram [2, 1, 2] no; 2-gram [1, 2] at 0: continue 1, 2
    ])
    p = d.propose(ctx)
    p.validate(5, vocab_size=100)
    assert p.parents.tolist() == [[0, 1, 2]] * 5  # a chain
    assert [_chain(p, b) for b in range(5)] == [[4, 6, 1], [0, 7, 8], [], [3], [1, 2]]


def test_lookup_continuation_reports_the_suffix_length_it_matched():
    ctx = _ctx([[1, 2, 3, 9, 8, 5, 1, 2, 3, 4, 6, 1, 2, 3], [5, 6, 7, 8, 0, 7, 8], [4, 1, 2, 3], [3, 3, 3],
                [1, 2, 1, 2]], active=[True, True, True, True, False])
    chain, valid, n = lookup_continuation(ctx.tokens, ctx.lengths, ctx.active, 3, 2)
    assert n.tolist() == [3, 2, 0, 2, 0]  # a finished row and a row without a match: 0
    assert valid.tolist() == [[True, True], [True, True], [False, False], [True, False], [False, False]]
    assert chain[:2].tolist() == [[4, 6], [0, 7]]


def _lookup_by_suffix_length(tokens, lengths, active, ngram, num_tokens):
    """lookup_continuation as it was first written: one pass over the history per suffix
    length, longest first (the reference for the one-pass version)."""
    B, cap = tokens.shape
    start = torch.full((B,), -1, dtype=torch.int64)
    matched = torch.zeros(B, dtype=torch.int64)
    for n in range(min(ngram, cap - 1), 0, -1):
        windows = tokens.unfold(1, n, 1)
        key = tokens.gather(1, (lengths[:, None] - n + torch.arange(n)).clamp(min=0))
        s = torch.arange(windows.shape[1])
        hit = (windows == key[:, None, :]).all(-1) & (s[None, :] + n < lengths[:, None]) & (lengths[:, None] > n)
        last = torch.where(hit, s, -1).amax(-1)
        first = (start < 0) & (last >= 0)
        matched = torch.where(first, n, matched)
        start = torch.where(first, last + n, start)
    idx = start[:, None] + torch.arange(num_tokens)
    valid = (start[:, None] >= 0) & (idx < lengths[:, None]) & active[:, None]
    matched = torch.where(valid[:, 0], matched, 0)
    return torch.where(valid, tokens.gather(1, idx.clamp(0, cap - 1)), 0), valid, matched


@pytest.mark.parametrize("seed", range(6))
def test_lookup_continuation_equals_the_loop_over_suffix_lengths(seed):
    """Random histories over a small alphabet (many repeats), ragged lengths, garbage past
    them, finished rows, ngram up to past the capacity: the one-pass search returns what the
    loop over suffix lengths returns."""
    g = torch.Generator().manual_seed(seed)
    B, cap = 16, 3 + seed * 5
    tokens = torch.randint(0, 2 + seed % 3, (B, cap), generator=g)
    lengths = torch.randint(1, cap + 1, (B,), generator=g)
    tokens[torch.arange(cap)[None, :] >= lengths[:, None]] = 9  # garbage past the lengths
    active = torch.rand(B, generator=g) > 0.2
    for ngram in (1, 3, cap + 2):
        for k in (1, 4):
            got = lookup_continuation(tokens, lengths, active, ngram, k)
            want = _lookup_by_suffix_length(tokens, lengths, active, ngram, k)
            for a, b in zip(got, want):
                assert torch.equal(a, b), (seed, ngram, k)


def test_prompt_lookup_skips_finished_sequences():
    p = PromptLookupDraft(2, 2).propose(_ctx([[1, 2, 1], [1, 2, 1]], active=[True, False]))
    assert _chain(p, 0) == [2, 1] and _chain(p, 1) == []


@pytest.mark.parametrize("kwargs, name", [(dict(ngram=0), "ngram"), (dict(num_tokens=0), "num_tokens"),
                                          (dict(ngram=2.5), "ngram")])
def test_prompt_lookup_rejects_bad_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PromptLookupDraft(**kwargs)


# ---------------------------------------------------------------- oracle / wrong / random
def test_oracle_and_wrong_drafts():
    model = tiny_model()
    refs = [[5, 6, 7, 8], [9, 10]]
    ctx = _ctx([[1, 2, 5], [3, 9]], model=model)  # one new token emitted for each
    o = OracleDraft(refs, num_tokens=3, width=2)
    o.check(model)
    o.begin(ctx)
    p = o.propose(ctx)
    p.validate(2, vocab_size=29)
    tree = build_tree(ctx.root, p)
    for b, want in enumerate([[6, 7, 8], [10]]):
        # the spine: the last node of every level, each under the previous spine node
        spine = [2, 4, 6][: len(want)]
        assert tree.tokens[b, spine].tolist() == want
        assert tree.parents[b, spine].tolist() == [0, 2, 4][: len(want)]
        leaves = [1, 3, 5][: len(want)]
        assert all(t != w for t, w in zip(tree.tokens[b, leaves].tolist(), want))
    assert p.valid[1].tolist() == [True, True, False, False, False, False]  # the reference ends
    w = WrongDraft(refs, num_tokens=3, width=2)
    w.begin(ctx)
    q = w.propose(ctx)
    assert torch.equal(q.parents, p.parents)
    right = torch.tensor([[6, 7, 8], [10, 0, 0]]).repeat_interleave(2, 1)
    assert not (q.tokens == right)[q.valid].any()
    with pytest.raises(ValueError, match="draft"):
        OracleDraft([[1, 99]]).check(model)


def test_random_tree_draft_is_seeded_and_well_formed():
    model = tiny_model()
    ctx = _ctx([[1, 2, 3], [4, 5], [6]], model=model)

    def run(seed):
        d = RandomTreeDraft(max_nodes=12, seed=seed, p_invalid=0.3)
        d.begin(ctx)
        return [d.propose(ctx) for _ in range(6)]

    a, b, c = run(1), run(1), run(2)
    sizes = {p.num_nodes for p in a}
    assert len(sizes) > 1 and max(sizes) <= 12
    for p, q in zip(a, b):
        p.validate(3, vocab_size=29)  # parents in range, invalid closed under descent
        assert torch.equal(p.tokens, q.tokens) and torch.equal(p.parents, q.parents)
        assert torch.equal(p.valid, q.valid)
    assert any(p.num_nodes != q.num_nodes or not torch.equal(p.tokens, q.tokens) for p, q in zip(a, c))
    assert any((~p.valid).any() and p.valid.any() for p in a)


# ---------------------------------------------------------------- model draft
def _topk_after(model, history, k):
    cache = model.new_cache(1, len(history) + 1)
    return torch.softmax(model.prefill([history], cache)[0], -1).topk(k)


def test_model_draft_expands_the_top_k_and_keeps_its_cache_in_step():
    draft_model = tiny_model(seed=1)
    d = ModelDraft(draft_model, branching=(3, 2))
    assert d.max_nodes == 9
    hist = [[1, 2, 3, 4, 5], [6, 7]]
    ctx = _ctx(hist, capacity=16, model=tiny_model())
    d.begin(ctx)
    for step in range(3):
        p = d.propose(ctx)
        p.validate(2, vocab_size=29)
        assert p.parents[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
        for b, h in enumerate(hist):
            probs, ids = _topk_after(draft_model, h, 3)
            assert p.tokens[b, :3].tolist() == ids.tolist()
            torch.testing.assert_close(p.draft_probs[b, :3], probs)
            for j in range(3):  # the children of level-1 node j: top-2 after h + [its token]
                _, ids2 = _topk_after(draft_model, h + [ids[j].item()], 2)
                assert p.tokens[b, 3 + 2 * j: 5 + 2 * j].tolist() == ids2.tolist()
        # commit a ragged number of tokens (as accepted paths would; none for a finished
        # sequence) and go on
        grow = [[[p.tokens[0, 0].item(), 11, 12], []], [[14], [13]], [[], [9, 8]]][step]
        for b, g in enumerate(grow):
            hist[b] = hist[b] + g
            ctx.tokens[b, : len(hist[b])] = torch.tensor(hist[b])
        ctx.lengths.copy_(torch.tensor([len(h) for h in hist]))
        ctx.root.copy_(ctx.tokens[torch.arange(2), ctx.lengths - 1])


def test_model_draft_checks_the_target():
    with pytest.raises(ValueError, match="draft"):
        ModelDraft(tiny_model(vocab=30)).check(tiny_model())
    with pytest.raises(ValueError, match="branching"):
        ModelDraft(tiny_model(), branching=(2, 0))
    d = ModelDraft(tiny_model(), (2,))
    with pytest.raises(ValueError, match="draft"):
        d.begin(_ctx([[1]], capacity=95))  # 95 + 2 + 1 positions > 96
