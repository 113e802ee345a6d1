"""The residual rule for sampled chains (``verify_residual``): exact on a synthetic target
(with a broken variant failing the same check), its acceptance rate, and the GliDe chain that
samples its tokens, end to end through the engine."""

import math

import pytest
import torch

from glide.speculative.tree import Proposal, build_tree
from glide.speculative.verify import process_logits, sample, verify_residual, walk

from test_verify import EMIT, V, _exact_law, _target_table, _tv, _tv_bound

GAMMA = 3


def _draft_table(seed=11):
    """The draft's q(next | prev, cur): another random table, so q differs from p."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(1.5 * torch.randn(V, V, V, dtype=torch.float64, generator=g), -1)


def _chain(prev, cur, table, qtable, gen, max_depth=None):
    """A chain of GAMMA tokens sampled from the draft table; the tree, the target's logits at
    every slot, and the draft's distribution of every node."""
    B = prev.shape[0]
    toks, dists, slot_prev, slot_tok = [], [], [prev], [cur]
    for _ in range(GAMMA):
        q = qtable[slot_prev[-1], slot_tok[-1]]
        x = torch.multinomial(q, 1, generator=gen)[:, 0]
        toks.append(x)
        dists.append(q)
        slot_prev.append(slot_tok[-1])
        slot_tok.append(x)
    tokens = torch.stack(toks, 1)
    prop = Proposal(tokens, torch.arange(GAMMA).expand(B, GAMMA).contiguous(),
                    torch.ones(B, GAMMA, dtype=torch.bool), None, torch.stack(dists, 1))
    prop.check_shapes(B)
    tree = build_tree(cur, prop, max_depth=max_depth)
    probs = table[torch.stack(slot_prev, 1), torch.stack(slot_tok, 1)]  # (B, T, V)
    return tree, probs.log(), prop.draft_dists


def _broken_residual(tree, logits, dists, temperature, top_p, u, ua):
    """Accept with min(1, p/q) but, on a rejection, resample from p itself (not p - q)."""
    p = process_logits(logits, temperature, top_p).double()
    B, T = tree.tokens.shape
    x = torch.cat([tree.tokens[:, 1:], tree.tokens[:, :1]], 1)
    q = torch.cat([dists, torch.zeros_like(p[:, :1])], 1)
    px, qx = p.gather(2, x[..., None])[..., 0], q.gather(2, x[..., None])[..., 0]
    has_child = torch.zeros(B, T, dtype=torch.bool)
    has_child[:, :-1] = tree.parents[:, 1:] == torch.arange(T - 1)
    return walk(tree, torch.where(has_child & (ua * qx < px), x, sample(p, uniforms=u)))


def _simulate(verifier, table, qtable, n, seed, cut=False):
    gen = torch.Generator().manual_seed(seed)
    hist = torch.zeros(n, 2 + EMIT * (GAMMA + 1), dtype=torch.int64)
    hist[:, 0], hist[:, 1] = 3, 1  # the prompt: prev=3, root=1
    length = torch.full((n,), 2)
    rows = torch.arange(n)
    for _ in range(EMIT):
        prev, cur = hist[rows, length - 2], hist[rows, length - 1]
        # with cut, each row's chain is cut at a random depth (0 .. GAMMA), as max_new_tokens does
        depth = torch.randint(0, GAMMA + 1, (n,), generator=gen) if cut else None
        tree, logits, dists = _chain(prev, cur, table, qtable, gen, depth)
        T = tree.tokens.shape[1]
        u = torch.rand(n, T, dtype=torch.float64, generator=gen)
        ua = torch.rand(n, T, dtype=torch.float64, generator=gen)
        v = verifier(tree, logits, dists, 1.0, 1.0, u, ua)
        pos = length[:, None] + torch.arange(T)
        keep = torch.arange(T)[None] < v.path_lens[:, None]
        hist[rows[:, None].expand_as(pos)[keep], pos[keep]] = v.tokens[keep]
        length = length + v.path_lens
    return hist[:, 2:2 + EMIT]


N_RUNS = 20000


@pytest.mark.parametrize("cut", [False, True])
def test_the_residual_rule_is_lossless_on_sampled_chains(cut):
    table, qtable = _target_table(), _draft_table()
    bound = _tv_bound(V ** EMIT, N_RUNS)
    tv = _tv(_simulate(verify_residual, table, qtable, N_RUNS, seed=7, cut=cut), _exact_law(table))
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


def _misaligned(tree, logits, dists, temperature, top_p, u, ua):
    """Reads each node's distribution one slot off (a wrong slice of ``dists``)."""
    return verify_residual(tree, logits, torch.cat([dists[:, 1:], dists[:, :1]], 1), temperature, top_p, u, ua)


def test_a_misaligned_dists_slice_fails_the_check():
    table, qtable = _target_table(), _draft_table()
    bound = _tv_bound(V ** EMIT, N_RUNS)
    tv = _tv(_simulate(_misaligned, table, qtable, N_RUNS, seed=7, cut=True), _exact_law(table))
    assert tv > bound, f"a misaligned slice passed: TV {tv:.4f} <= bound {bound:.4f}"


def test_substreams_are_not_the_main_streams_values():
    """A substream key is none of the main stream's first outputs (which a key offset by a
    multiple of the stream's step would be), and substreams differ from each other."""
    from glide.speculative.verify import ACCEPT_STREAM, DRAFT_STREAM, counter_uniforms, stream_keys, substream_keys

    keys = stream_keys(5, list(range(64)))
    main = counter_uniforms(keys[:, None], torch.arange(256)[None].expand(64, 256))
    for which in (ACCEPT_STREAM, DRAFT_STREAM):
        sub = substream_keys(keys, which)
        first = (((sub >> 11) & ((1 << 53) - 1)).double() * 2.0 ** -53)[:, None]
        assert not (main == first).any()
    a = counter_uniforms(substream_keys(keys, ACCEPT_STREAM), torch.zeros(64, dtype=torch.int64))
    d = counter_uniforms(substream_keys(keys, DRAFT_STREAM), torch.zeros(64, dtype=torch.int64))
    assert not torch.equal(a, d) and torch.equal(substream_keys(keys, 0), keys)


def test_a_broken_residual_fails_the_same_check():
    table, qtable = _target_table(), _draft_table()
    bound = _tv_bound(V ** EMIT, N_RUNS)
    tv = _tv(_simulate(_broken_residual, table, qtable, N_RUNS, seed=7), _exact_law(table))
    assert tv > bound, f"a broken rule passed: TV {tv:.4f} <= bound {bound:.4f}"


def test_the_first_node_is_accepted_at_sum_min_p_q():
    table, qtable = _target_table(), _draft_table()
    n = 20000
    gen = torch.Generator().manual_seed(3)
    prev, cur = torch.full((n,), 3), torch.full((n,), 1)
    tree, logits, dists = _chain(prev, cur, table, qtable, gen)
    u = torch.rand(n, GAMMA + 1, dtype=torch.float64, generator=gen)
    ua = torch.rand(n, GAMMA + 1, dtype=torch.float64, generator=gen)
    got = (verify_residual(tree, logits, dists, 1.0, 1.0, u, ua).path_lens > 1).double().mean().item()
    p, q = table[3, 1], qtable[3, 1]
    want = torch.minimum(p, q).sum().item()
    assert abs(got - want) < 4 * math.sqrt(0.25 / n)
    assert want > (p * q).sum().item()  # more than an argmax-free draw under the fixed-set rule


def test_a_cut_or_invalid_child_is_a_plain_draw():
    """A chain cut by ``max_depth`` (or a node marked invalid) picks from ``p`` there: with a
    one-hot target the emitted tokens are the target's, however the draft drew."""
    table = torch.nn.functional.one_hot(_target_table().argmax(-1), V).double()
    qtable = _draft_table()
    gen = torch.Generator().manual_seed(5)
    n = 200
    prev, cur = torch.full((n,), 3), torch.full((n,), 1)
    tree, logits, dists = _chain(prev, cur, table, qtable, gen)
    cut = build_tree(cur, Proposal(tree.tokens[:, 1:], torch.arange(GAMMA).expand(n, GAMMA).contiguous(),
                                   torch.ones(n, GAMMA, dtype=torch.bool)), max_depth=torch.full((n,), 1))
    u = torch.rand(n, GAMMA + 1, dtype=torch.float64, generator=gen)
    v = verify_residual(cut, logits.clamp(min=-1e4), dists, 1.0, 1.0, u, u.flip(1))
    a = table[3, 1].argmax().item()
    b = table[1, a].argmax().item()
    assert (v.path_lens <= 2).all()
    assert (v.tokens[:, 0] == a).all()
    two = v.path_lens == 2
    assert (v.tokens[two, 1] == b).all()


def test_dists_of_the_wrong_shape_are_refused():
    table, qtable = _target_table(), _draft_table()
    gen = torch.Generator().manual_seed(1)
    tree, logits, dists = _chain(torch.full((4,), 3), torch.full((4,), 1), table, qtable, gen)
    u = torch.rand(4, GAMMA + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="dists"):
        verify_residual(tree, logits, dists[:, :2], 1.0, 1.0, u, u)
    with pytest.raises(ValueError, match="draft_dists"):
        Proposal(tree.tokens[:, 1:], tree.parents[:, 1:], torch.ones(4, GAMMA, dtype=torch.bool), None,
                 dists[:, :2]).check_shapes(4)


# ---------------------------------------------------------------- through the engine
from glide.draft import GlideDraft  # noqa: E402
from glide.speculative import engine as engine_module  # noqa: E402
from glide.speculative.engine import generate_ids  # noqa: E402

from glide_helpers import tiny_draft, tiny_target  # noqa: E402
from test_engine import TV_BOUND, _sampled_tv  # noqa: E402


def _sampling_chain(model, sample=True):
    return GlideDraft(tiny_draft(model, seed=2, std=0.5), gamma=2, sample=sample)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.3, 0.9)])
def test_a_sampling_glide_chain_has_the_ar_law_and_accepts_more(temperature, top_p):
    """The engine's statistical test (first three tokens, TV to the exact law) with a GliDe
    chain that samples its tokens; on the same prompts it is accepted more often than the
    chain that proposes its argmax."""
    tv, first = _sampled_tv(temperature, top_p, _sampling_chain)
    assert tv < TV_BOUND, f"TV {tv:.4f} >= {TV_BOUND:.4f}"
    _, argmax_first = _sampled_tv(temperature, top_p, lambda m: _sampling_chain(m, sample=False))
    assert (first >= 2).double().mean() > 0.03
    assert first.double().mean() > argmax_first.double().mean()


def test_the_engine_law_check_catches_a_broken_residual(monkeypatch):
    monkeypatch.setattr(engine_module, "verify_residual", _broken_residual)
    tv, _ = _sampled_tv(1.0, 1.0, _sampling_chain)
    assert tv > TV_BOUND, f"a broken rule passed: TV {tv:.4f} <= {TV_BOUND:.4f}"


def test_greedy_decoding_ignores_sample_and_batches_stay_exact():
    t = tiny_target()
    prompts = [[1, 5, 7, 9, 3], [4, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]
    ar = generate_ids(t, prompts, None, max_new_tokens=24, eos_token_ids=(2,))
    d = tiny_draft(t)
    sp = generate_ids(t, prompts, GlideDraft(d, 4, sample=True), max_new_tokens=24, eos_token_ids=(2,))
    assert [o.output_ids for o in sp] == [o.output_ids for o in ar]
    # sampled, at batch 3 with ragged acceptance: a seed reproduces, and the proposals carry
    # their distributions (rows sum to 1, the drafted token inside)
    g = GlideDraft(d, 4, sample=True)
    seen = []
    propose = g.propose

    def spy(ctx):  # a proposal's distributions hold until the next proposal: check them now
        prop = propose(ctx)
        d = prop.draft_dists
        assert d is not None and d.shape[:2] == prop.tokens.shape
        torch.testing.assert_close(d.sum(-1), torch.ones(prop.tokens.shape, dtype=d.dtype))
        assert (d.gather(2, prop.tokens[..., None]) > 0).all()
        seen.append(d.data_ptr())
        return prop
    g.propose = spy
    a = generate_ids(t, prompts, g, max_new_tokens=24, temperature=1.0, seed=3)
    b = generate_ids(t, prompts, GlideDraft(d, 4, sample=True), max_new_tokens=24, temperature=1.0, seed=3)
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert len(seen) > 3 and len(set(seen)) == 1  # one buffer for the generation, no per-step allocation
    with pytest.raises(TypeError, match="sample"):
        GlideDraft(d, 4, sample=1)
