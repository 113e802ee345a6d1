"""Drafts that read the previous token (``prev_token_input``): the decoding paths (chain, CaPE,
dynamic tree) against the training forward, losslessness, checkpoints, and training from a
draft without it."""

import json

import pytest
import torch

from glide.draft import GlideDraft, block_cross_mask, load_draft, save_draft
from glide.draft.cape import CapeDraft
from glide.draft.dynamic import DynamicTreeDraft
from glide.speculative.drafts import DraftContext
from glide.speculative.engine import generate_ids

from glide_helpers import self_distilled_corpus, tiny_draft, tiny_target

PROMPTS = [[1, 5, 7, 9, 3], [4, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_the_chain_equals_the_training_forward(target):
    """The chain drafted over the caches equals one teacher-forced training forward over the
    prompt, the root and the drafted tokens (each row reads the token before it)."""
    draft = tiny_draft(target, prev=True)
    prompt, first = [1, 5, 7, 9, 3, 6, 2], 4
    P = len(prompt)
    cache = target.new_cache(1, P + 16)
    target.prefill([prompt], cache)
    tokens = torch.zeros(1, P + 12, dtype=torch.int64)
    tokens[0, :P] = torch.tensor(prompt)
    tokens[0, P] = first
    ctx = DraftContext(target, cache, tokens, torch.tensor([P + 1]), torch.tensor([first]), torch.tensor([True]))
    g = GlideDraft(draft, gamma=4)
    g.begin(ctx)
    prop = g.propose(ctx)
    seq = torch.tensor([prompt + [first] + prop.tokens[0, :3].tolist()])
    S = seq.shape[1]
    pos = torch.arange(S)
    visible = pos[None, :] < torch.where(pos >= P - 1, P, pos)[:, None]
    kv = [(cache.k(draft.config.target_layer(0))[:, :, :S], cache.v(draft.config.target_layer(0))[:, :, :S])]
    probs = draft(seq, kv, visible[None])[0, P:].softmax(-1)
    assert prop.tokens[0].tolist() == draft.vocab_ids[probs.argmax(-1)].tolist()
    torch.testing.assert_close(prop.draft_probs[0], probs.max(-1).values, rtol=1e-10, atol=1e-12)
    # and the previous token matters: without its projection the same rows predict otherwise
    with torch.no_grad():
        draft.prev_proj.weight.zero_()
    assert not torch.allclose(draft(seq, kv, visible[None])[0, P:].softmax(-1), probs)


def test_a_zero_projection_leaves_the_draft_unchanged(target):
    """With its projection at zero (how training starts one from a draft without it), a
    previous-token draft proposes exactly what the draft without it proposes."""
    base = tiny_draft(target, seed=3)
    grown = tiny_draft(target, seed=3, prev=True)
    with torch.no_grad():
        grown.prev_proj.weight.zero_()
        for name, p in base.state_dict().items():
            grown.state_dict()[name].copy_(p)
    for make in (lambda d: GlideDraft(d, 3), lambda d: DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=8)):
        a = generate_ids(target, PROMPTS, make(base), max_new_tokens=16)
        b = generate_ids(target, PROMPTS, make(grown), max_new_tokens=16)
        assert [o.accepted for o in a] == [o.accepted for o in b]


@pytest.mark.parametrize("make", [lambda d: GlideDraft(d, 4), lambda d: CapeDraft(d, 3),
                                  lambda d: DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=10)])
def test_prev_token_drafts_are_lossless_at_batch_3(target, make):
    d = tiny_draft(target, prev=True)
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=24, eos_token_ids=(2,))
    sp = generate_ids(target, PROMPTS, make(d), max_new_tokens=24, eos_token_ids=(2,))
    assert [o.output_ids for o in sp] == [o.output_ids for o in ar]
    assert sum(a for o in sp for a in o.accepted) > 0


def test_the_static_graph_paths_feed_the_previous_token_too(target):
    """With CUDA graphs asked for (capture off on the CPU) the chain and the tree's levels run
    from static copies of their inputs, the previous tokens among them: still AR's output."""
    from glide.model.graphs import CudaGraphs

    d = tiny_draft(target, prev=True)
    ar = generate_ids(target, PROMPTS, None, max_new_tokens=24)
    for make in (lambda: GlideDraft(d, 4),
                 lambda: DynamicTreeDraft(d, depth=4, top_k=3, beam=2, fixed_size=10)):
        out = generate_ids(target, PROMPTS, make(), max_new_tokens=24, cuda_graphs=CudaGraphs(target, capture=False))
        assert [o.output_ids for o in out] == [o.output_ids for o in ar]


def test_the_dynamic_tree_feeds_each_row_its_previous_token(target):
    """Every draft forward of the dynamic tree, through pauses, ragged acceptance and EOS: a
    catch-up row at ``pos <= root`` reads the committed token at ``pos - 1``; a tree node reads
    its parent's token (the root's for the first level)."""
    d = tiny_draft(target, prev=True)
    prompts = PROMPTS + [[6]]
    seen = {"checked": 0, "levels": 0}
    tree = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, max_nodes=12, fixed_size=8)
    tree.fallback = True
    gen = torch.Generator().manual_seed(0)
    tree._plan = lambda ctx: bool(torch.rand((), generator=gen) < 0.5)  # random pauses
    propose, step = tree.propose, d.step

    def spy_propose(ctx):
        seen["ctx"], seen["n"], seen["rows"] = ctx, 0, None
        return propose(ctx)

    def spy_step(ids, pos, mask, cache, cross, **kw):
        ctx = seen.get("ctx")
        prev = kw["prev_ids"]
        if ctx is not None:
            seen["n"] += 1
            root, live = ctx.lengths - 1, ctx.active
            if seen["n"] == 1:  # the catch-up
                want = torch.where(pos >= 1, ctx.tokens.gather(1, (pos - 1).clamp(0, ctx.tokens.shape[1] - 1)), -1)
                use = (pos <= root[:, None]) & live[:, None]
            else:  # a level: each row's parent is its nearest ancestor in the mask, else the root
                anc = mask & ~torch.eye(ids.shape[1], dtype=torch.bool)
                depth = anc.sum(-1)
                want = ctx.root[:, None].expand_as(ids).clone()
                for b in range(ids.shape[0]):
                    for r in range(ids.shape[1]):
                        par = [a for a in range(ids.shape[1]) if anc[b, r, a] and depth[b, a] == depth[b, r] - 1]
                        if par:
                            want[b, r] = ids[b, par[0]]
                use = live[:, None].expand_as(ids)
                seen["levels"] += 1
            assert torch.equal(prev[use], want[use])
            seen["checked"] += 1
        return step(ids, pos, mask, cache, cross, **kw)

    tree.propose, d.step = spy_propose, spy_step
    out = generate_ids(target, prompts, tree, max_new_tokens=50, eos_token_ids=(2,))
    assert seen["checked"] > 30 and seen["levels"] > 10 and tree.skipped > 5
    assert max(a for o in out for a in o.accepted) >= 1


def test_a_prev_token_draft_round_trips_and_needs_its_prev_ids(target, tmp_path):
    d = tiny_draft(target, prev=True)
    save_draft(d, tmp_path / "d", dtype=torch.float64)
    back = load_draft(tmp_path / "d", target)
    assert back.config.prev_token_input and torch.equal(back.prev_proj.weight, d.prev_proj.weight)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["config"]["prev_token_input"] is True
    ids, pos = torch.tensor([[1, 2]]), torch.tensor([[0, 1]])
    mask = torch.ones(1, 2, 2, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="prev_ids"):
        back.step(ids, pos, mask, back.new_cache(1, 4), lambda i, q: torch.zeros_like(q))
    with pytest.raises(ValueError, match="prev_ids"):
        tiny_draft(target).step(ids, pos, mask, back.new_cache(1, 4), lambda i, q: torch.zeros_like(q),
                                prev_ids=torch.tensor([[-1, 1]]))
    # -1 (no token before) adds nothing: the same as a zero embedding
    out = back.previous(torch.tensor([[-1, 3]]))
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])) and out[0, 1].abs().max() > 0


def test_training_a_prev_token_draft_from_one_without(tmp_path):
    """From a draft without the input, the first validation equals the prior's (the projection
    starts at zero); training moves the projection. A prior with it needs the flag."""
    from glide.train.features import build_features
    from glide.train.trainer import TrainSettings, evaluate, train_draft

    t = tiny_target()
    samples = self_distilled_corpus(t, n=24)
    feats = build_features(t, samples, tmp_path / "g", topk=4, progress=False)
    base = TrainSettings(batch_size=4, epochs=1, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None)
    train_draft(t, samples, feats, tmp_path / "base", base, progress=False)
    settings = TrainSettings(batch_size=4, epochs=2, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None,
                             prev_token_input=True, init_from=str(tmp_path / "base" / "draft"))
    summary = train_draft(t, samples, feats, tmp_path / "p", settings, progress=False,
                          validation=(samples, feats), eval_every=1000)
    assert summary["steps"] == summary["planned_steps"]
    first = json.loads((tmp_path / "p" / "val.jsonl").read_text().splitlines()[0])
    prior = load_draft(tmp_path / "base" / "draft", t)
    # (training keeps float32 weights, the saved prior is the target's float64: rounding apart)
    assert first["loss"] == pytest.approx(evaluate(prior, samples, feats, base)["loss"], abs=5e-5)
    trained = load_draft(tmp_path / "p" / "draft", t)
    assert trained.config.prev_token_input and trained.prev_proj.weight.abs().max() > 0
    again = TrainSettings(batch_size=4, epochs=1, lr=3e-3, warmup_steps=2, save_every=100, draft_vocab_size=None,
                          init_from=str(tmp_path / "p" / "draft"))
    with pytest.raises(ValueError, match="prev-token-input"):
        train_draft(t, samples, feats, tmp_path / "p2", again, progress=False)


def test_training_forward_reads_the_token_before_each_position(target):
    """The training forward's previous-token input is the token one to the left (none at
    position 0): it equals decoding steps given those ``prev_ids``, and not others."""
    d = tiny_draft(target, prev=True)
    ids = torch.tensor([[1, 5, 7, 9]])
    S = ids.shape[1]
    kv = [(torch.zeros(1, 2, S, 8, dtype=target.dtype), torch.zeros(1, 2, S, 8, dtype=target.dtype))]
    train = d(ids, kv, block_cross_mask(S, 5))  # one block: no target position is visible
    pos, causal = torch.arange(S)[None], torch.ones(1, S, S, dtype=torch.bool).tril()

    def decode(prev):
        return d.step(ids, pos, causal, d.new_cache(1, 8), lambda i, q: torch.zeros_like(q),
                      prev_ids=torch.tensor([prev]))
    torch.testing.assert_close(train[0], decode([-1, 1, 5, 7])[0], rtol=1e-10, atol=1e-12)
    other = decode([-1, 1, 6, 7])[0]
    torch.testing.assert_close(train[0, :2], other[:2], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(train[0, 2], other[2])
