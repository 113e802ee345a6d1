"""Trees and verification: masks, greedy paths, logits processing, lossless sampling.

The sampling tests are statistical: the empirical law of the first emitted tokens must match
the exact target law within a total-variation bound derived from the sample size, and the
same check must fail on deliberately broken verifiers.
"""

import math

import pytest
import torch

from glide.speculative.tree import Proposal, ancestor_mask, build_tree, depths, empty_proposal
from glide.speculative.verify import (
    process_logits,
    sample,
    verify_greedy,
    verify_sampling,
    walk,
)


# ---------------------------------------------------------------- brute-force references
def _py_ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def _py_greedy(tokens, parents, argmax):
    """Longest matching root path (ties: lowest end slot), by enumerating every node."""
    T = len(tokens)
    best, best_depth = 0, 0
    for i in range(T):
        path = sorted(_py_ancestors(parents, i))
        if path[0] != 0:
            continue  # invalid node: not under the root
        if all(tokens[path[k]] == argmax[path[k - 1]] for k in range(1, len(path))):
            if len(path) - 1 > best_depth:
                best, best_depth = i, len(path) - 1
    path = sorted(_py_ancestors(parents, best))
    return path, [tokens[s] for s in path[1:]] + [argmax[best]]


def _py_walk_first(tokens, parents, picked):
    """The sampling walk, one node at a time: descend to the first child carrying the pick."""
    c, path = 0, [0]
    while True:
        child = next((i for i in range(len(tokens)) if parents[i] == c and tokens[i] == picked[c]), None)
        if child is None:
            return path, [tokens[s] for s in path[1:]] + [picked[c]]
        c = child
        path.append(c)


def _tree(tokens, parents, valid=None, root=0):
    """One-sequence Tree from lists of node tokens / parent slots."""
    n = len(tokens)
    valid = [True] * n if valid is None else valid
    p = Proposal(torch.tensor([tokens]), torch.tensor([parents]), torch.tensor([valid]))
    p.validate(1)
    return build_tree(torch.tensor([root]), p)


def _logits_with_argmax(argmax, vocab=10):
    logits = torch.randn(1, len(argmax), vocab, generator=torch.Generator().manual_seed(0))
    logits[0, torch.arange(len(argmax)), torch.tensor(argmax)] = 10.0
    return logits


def _random_proposal(batch, n, vocab, gen, p_invalid=0.2):
    parents = torch.stack([torch.randint(0, k + 1, (batch,), generator=gen) for k in range(n)], 1) if n else \
        torch.zeros(batch, 0, dtype=torch.int64)
    tokens = torch.randint(0, vocab, (batch, n), generator=gen)
    valid = torch.rand(batch, n, generator=gen) > p_invalid
    slot_valid = torch.ones(batch, n + 1, dtype=torch.bool)
    for k in range(n):  # an invalid parent makes the child invalid
        valid[:, k] &= slot_valid.gather(1, parents[:, k:k + 1]).squeeze(1)
        slot_valid[:, k + 1] = valid[:, k]
    return Proposal(tokens, parents, valid)


# ---------------------------------------------------------------- trees
def test_ancestor_mask_and_depths_match_brute_force():
    gen = torch.Generator().manual_seed(1)
    for n in (0, 1, 5, 17, 40):
        p = _random_proposal(6, n, 7, gen)
        tree = build_tree(torch.zeros(6, dtype=torch.int64), p)
        for b in range(6):
            par = tree.parents[b].tolist()
            want = torch.zeros(n + 1, n + 1, dtype=torch.bool)
            for i in range(n + 1):
                for j in _py_ancestors(par, i):
                    want[i, j] = True
            assert torch.equal(tree.mask[b], want), (n, b)
            assert torch.equal(ancestor_mask(tree.parents)[b], want)
            assert tree.depth[b].tolist() == [len(_py_ancestors(par, i)) - 1 for i in range(n + 1)]
        assert torch.equal(depths(tree.parents), tree.depth)
        # invalid nodes see only themselves and hang under nobody
        inval = ~torch.cat([torch.ones(6, 1, dtype=torch.bool), p.valid], 1)
        assert (tree.mask.sum(-1)[inval] == 1).all()
        assert (tree.parents[inval] == -1).all()


def test_build_tree_cuts_deep_nodes():
    # chain of 4 under the root, plus a side leaf at depth 1
    p = Proposal(torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[0, 1, 2, 3, 0]]), torch.ones(1, 5, dtype=torch.bool))
    tree = build_tree(torch.tensor([9]), p, max_depth=torch.tensor([2]))
    assert tree.depth.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert tree.parents.tolist() == [[-1, 0, 1, -1, -1, 0]]
    assert tree.mask[0, 3].tolist() == [False, False, False, True, False, False]
    assert tree.mask[0, 2].tolist() == [True, True, True, False, False, False]


def test_empty_proposal_is_root_only():
    tree = build_tree(torch.tensor([3, 4]), empty_proposal(2))
    assert tree.tokens.tolist() == [[3], [4]] and tree.mask.all() and (tree.depth == 0).all()
    v = verify_greedy(tree, _logits_with_argmax([7]).expand(2, 1, 10))
    assert v.path_lens.tolist() == [1, 1] and v.tokens.tolist() == [[7], [7]]


@pytest.mark.parametrize(
    "field, kwargs, exc",
    [
        ("parents", dict(parents=torch.tensor([[0, 2]])), ValueError),  # node 1 may use [0, 1]
        ("parents", dict(parents=torch.tensor([[-1, 0]])), ValueError),
        ("valid", dict(valid=torch.tensor([[False, True]])), ValueError),  # orphan
        ("tokens", dict(tokens=torch.tensor([[1, 10]])), ValueError),  # vocab 10
        ("tokens", dict(tokens=torch.tensor([[1.0, 2.0]])), TypeError),
        ("valid", dict(valid=torch.tensor([[1, 1]])), TypeError),
        ("parents", dict(parents=torch.tensor([[0, 0, 0]])), ValueError),  # shape
        ("draft_probs", dict(draft_probs=torch.ones(1, 3)), ValueError),
    ],
)
def test_proposal_validation_names_the_field(field, kwargs, exc):
    base = dict(tokens=torch.tensor([[1, 2]]), parents=torch.tensor([[0, 1]]),
                valid=torch.tensor([[True, True]]))
    base.update(kwargs)
    with pytest.raises(exc, match=field):
        Proposal(**base).validate(1, vocab_size=10)


def test_invalid_node_parent_out_of_range_is_fine():
    # only valid nodes are constrained; the invalid node's parent is garbage
    Proposal(torch.tensor([[1, 2]]), torch.tensor([[0, 99]]), torch.tensor([[True, False]])).validate(1, 10)


# ---------------------------------------------------------------- greedy on hand-built trees
def test_greedy_chain():
    tree = _tree([5, 6, 7], [0, 1, 2], root=4)
    # argmax per slot: root->5, 5->6, 6->2 (mismatch with 7), 7->anything
    v = verify_greedy(tree, _logits_with_argmax([5, 6, 2, 1]))
    assert v.path_lens.tolist() == [3]
    assert v.path_idx[0, :3].tolist() == [0, 1, 2]
    assert v.tokens[0].tolist() == [5, 6, 2, -1]
    # whole chain accepted: bonus from the last node
    v = verify_greedy(tree, _logits_with_argmax([5, 6, 7, 8]))
    assert v.path_lens.tolist() == [4] and v.tokens[0].tolist() == [5, 6, 7, 8]
    # nothing accepted: just the bonus at the root
    v = verify_greedy(tree, _logits_with_argmax([1, 6, 7, 8]))
    assert v.path_lens.tolist() == [1] and v.tokens[0].tolist() == [1, -1, -1, -1]
    assert v.path_idx[0].tolist() == [0, 0, 0, 0]


def test_greedy_star():
    tree = _tree([1, 2, 3, 4], [0, 0, 0, 0])
    v = verify_greedy(tree, _logits_with_argmax([3, 0, 0, 9, 0]))
    assert v.path_idx[0, :2].tolist() == [0, 3] and v.tokens[0, :2].tolist() == [3, 9]


def test_greedy_cape_spine_with_side_leaves():
    # spine 1 -> 2 -> 3 (slots 1, 3, 5) with side leaves 7, 8, 9 (slots 2, 4, 6)
    tree = _tree([1, 7, 2, 8, 3, 9], [0, 0, 1, 1, 3, 3])
    # the target leaves the spine at depth 2 for the side leaf 8
    v = verify_greedy(tree, _logits_with_argmax([1, 8, 0, 0, 5, 0, 0]))
    assert v.path_idx[0, :3].tolist() == [0, 1, 4] and v.tokens[0, :3].tolist() == [1, 8, 5]
    # side leaf at depth 3
    v = verify_greedy(tree, _logits_with_argmax([1, 2, 0, 9, 0, 0, 4]))
    assert v.path_idx[0, :4].tolist() == [0, 1, 3, 6] and v.tokens[0].tolist() == [1, 2, 9, 4, -1, -1, -1]


def test_greedy_ignores_invalid_nodes():
    # slot 1 matches but is invalid (and so is its child); slot 3 is the valid twin
    tree = _tree([5, 6, 5], [0, 1, 0], valid=[False, False, True])
    v = verify_greedy(tree, _logits_with_argmax([5, 6, 0, 2]))
    assert v.path_idx[0, :2].tolist() == [0, 3] and v.tokens[0, :2].tolist() == [5, 2]
    tree = _tree([5, 6], [0, 1], valid=[False, False])
    v = verify_greedy(tree, _logits_with_argmax([5, 6, 0]))
    assert v.path_lens.tolist() == [1] and v.tokens[0, 0].item() == 5


def test_duplicate_siblings():
    # two children carry token 5; only the second one's subtree continues correctly
    tree = _tree([5, 5, 6], [0, 0, 2])
    logits = _logits_with_argmax([5, 1, 6, 3])
    g = verify_greedy(tree, logits)  # greedy takes the longest matching path
    assert g.path_idx[0, :3].tolist() == [0, 2, 3] and g.tokens[0, :3].tolist() == [5, 6, 3]
    # the sampling rule: the first valid sibling wins, even with a one-hot target
    probs = process_logits(logits, 0.0)
    s = verify_sampling(tree, probs, torch.Generator().manual_seed(0))
    assert s.path_idx[0, :2].tolist() == [0, 1] and s.tokens[0, :2].tolist() == [5, 1]
    # unless the first one is invalid
    tree = _tree([5, 5, 6], [0, 0, 2], valid=[False, True, True])
    s = verify_sampling(tree, probs, torch.Generator().manual_seed(0))
    assert s.tokens[0, :3].tolist() == [5, 6, 3]


def test_greedy_and_walk_match_brute_force_on_random_trees():
    gen = torch.Generator().manual_seed(2)
    B, V = 64, 3  # a tiny vocabulary so that long paths match often
    for n in (1, 4, 12, 30):
        p = _random_proposal(B, n, V, gen)
        tree = build_tree(torch.randint(0, V, (B,), generator=gen), p)
        picked = torch.randint(0, V, (B, n + 1), generator=gen)
        logits = torch.nn.functional.one_hot(picked, V).double()
        for first, v in ((False, verify_greedy(tree, logits)), (True, walk(tree, picked))):
            for b in range(B):
                args = (tree.tokens[b].tolist(), tree.parents[b].tolist(), picked[b].tolist())
                path, emitted = (_py_walk_first if first else _py_greedy)(*args)
                A = v.path_lens[b].item()
                assert v.path_idx[b, :A].tolist() == path, (n, b, first)
                assert v.tokens[b, :A].tolist() == emitted
                # a contiguous root path: every slot's parent is the previous one
                assert all(tree.parents[b, path[k]] == path[k - 1] for k in range(1, A))
                assert (v.tokens[b, A:] == -1).all() and (v.path_idx[b, A:] == 0).all()


# ---------------------------------------------------------------- logits processing
def test_process_logits_temperature_and_greedy():
    logits = torch.randn(3, 4, 111, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(process_logits(logits, 0.7), torch.softmax(logits / 0.7, -1))
    g = process_logits(logits, 0.0)
    assert torch.equal(g, torch.nn.functional.one_hot(logits.argmax(-1), 111).double())
    assert process_logits(logits.float(), 1.0).dtype == torch.float32


def test_process_logits_top_p_brute_force():
    gen = torch.Generator().manual_seed(4)
    # integer logits give exact ties, broken towards the lower token id
    logits = torch.randint(0, 4, (50, 7), generator=gen).double()
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.999):
        probs = process_logits(logits, 1.3, top_p)
        full = torch.softmax(logits / 1.3, -1)
        for r in range(50):
            order = sorted(range(7), key=lambda t: (-full[r, t].item(), t))
            kept, mass = [], 0.0
            for t in order:
                kept.append(t)
                mass += full[r, t].item()
                if mass >= top_p - 1e-12:
                    break
            want = torch.zeros(7, dtype=torch.float64)
            want[kept] = full[r, kept] / full[r, kept].sum()
            torch.testing.assert_close(probs[r], want)


@pytest.mark.parametrize("temperature, top_p, name", [(-0.1, 1.0, "temperature"), (float("nan"), 1.0, "temperature"),
                                                       (1.0, 0.0, "top_p"), (1.0, 1.5, "top_p")])
def test_process_logits_rejects_bad_arguments(temperature, top_p, name):
    with pytest.raises(ValueError, match=name):
        process_logits(torch.zeros(2, 5), temperature, top_p)


def test_sample_reproduces_with_seed():
    probs = torch.softmax(torch.randn(100, 9, generator=torch.Generator().manual_seed(5)), -1)
    a = sample(probs, torch.Generator().manual_seed(11))
    b = sample(probs, torch.Generator().manual_seed(11))
    c = sample(probs, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- statistical exactness
V = 5
EMIT = 3  # compare the law of the first 3 emitted tokens: 125 outcomes
# A fixed adversarial tree: node tokens are chosen by *rank* under the target at the parent
# (0 = most likely, V-1 = least likely), so the candidates are deterministic top-k picks,
# plus a duplicate sibling and an invalid node carrying the argmax.
#          slot: 1  2  3  4  5  6  7  8  9
PARENTS = [0, 0, 0, 1, 1, 4, 2, 0, 3]
RANKS = [0, 1, 4, 0, 2, 0, 1, 0, 0]
VALID = [1, 1, 1, 1, 1, 1, 1, 0, 1]  # slot 8 (argmax at the root) is invalid; slot 9 child of 3


def _target_table(peaky=2.0, seed=6):
    """p(next | prev, cur): a (V, V, V) table; a context is its last two tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(peaky * torch.randn(V, V, V, dtype=torch.float64, generator=g), -1)


def _adversarial_tree(prev, cur, table, variant):
    B = prev.shape[0]
    n = len(PARENTS)
    parents = torch.tensor(PARENTS).expand(B, n)
    ranks = torch.tensor(RANKS)
    if variant == 1:  # a second shape: duplicates of the argmax at the root and a chain
        parents = torch.tensor([0, 0, 1, 3, 0, 5, 0, 2, 8]).expand(B, n)
        ranks = torch.tensor([0, 0, 0, 1, 3, 0, 2, 1, 0])
    slot_tok = torch.empty(B, n + 1, dtype=torch.int64)
    slot_prev = torch.empty(B, n + 1, dtype=torch.int64)
    slot_tok[:, 0], slot_prev[:, 0] = cur, prev
    for k in range(n):
        par = parents[:, k]
        ptok, pprev = slot_tok[torch.arange(B), par], slot_prev[torch.arange(B), par]
        order = torch.argsort(table[pprev, ptok], dim=-1, descending=True, stable=True)
        slot_tok[:, k + 1] = order[:, ranks[k]]
        slot_prev[:, k + 1] = ptok
    valid = torch.tensor(VALID, dtype=torch.bool).expand(B, n) if variant == 0 else torch.ones(B, n, dtype=torch.bool)
    p = Proposal(slot_tok[:, 1:].contiguous(), parents.contiguous(), valid.contiguous())
    p.validate(B, V)
    tree = build_tree(cur, p)
    probs = table[slot_prev, slot_tok]  # (B, T, V): the target at every slot
    return tree, probs


def _simulate(verifier, table, n, seed):
    """Run the decode loop with the synthetic target until every run emitted EMIT tokens."""
    gen = torch.Generator().manual_seed(seed)
    hist = torch.zeros(n, 2 + EMIT + len(PARENTS) + 2, dtype=torch.int64)
    hist[:, 0], hist[:, 1] = 3, 1  # the prompt: prev=3, root=1
    length = torch.full((n,), 2)
    rows = torch.arange(n)
    for step in range(EMIT):
        prev, cur = hist[rows, length - 2], hist[rows, length - 1]
        tree, probs = _adversarial_tree(prev, cur, table, variant=step % 2)
        v = verifier(tree, probs, gen)
        pos = length[:, None] + torch.arange(v.tokens.shape[1])
        keep = torch.arange(v.tokens.shape[1])[None] < v.path_lens[:, None]
        hist[rows[:, None].expand_as(pos)[keep], pos[keep]] = v.tokens[keep]
        length = length + v.path_lens
    return hist[:, 2:2 + EMIT]


def _exact_law(table):
    p0, r0 = 3, 1
    a = table[p0, r0]  # (V,)
    ab = a[:, None] * table[r0]  # (V, V)
    abc = ab[:, :, None] * table  # table[a, b] is p(. | a, b)
    return abc.reshape(-1)


def _tv(samples, law):
    idx = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    emp = torch.bincount(idx, minlength=V ** EMIT).double() / samples.shape[0]
    return 0.5 * (emp - law).abs().sum().item()


def _tv_bound(k, n, delta=1e-6):
    """E[TV] <= sqrt(k / n) / 2, and TV is 1/n-Lipschitz per sample (McDiarmid)."""
    return 0.5 * math.sqrt(k / n) + math.sqrt(math.log(1 / delta) / (2 * n))


def _broken_top_candidate(tree, probs, gen):
    """Accept the target's favourite whenever the draft proposed it, else sample."""
    picked = sample(probs, gen)
    top = probs.argmax(-1)
    child_has_top = (tree.tokens[:, None, :] == top[:, :, None]) & (tree.parents[:, None, :] == torch.arange(
        tree.size)[None, :, None])
    return walk(tree, torch.where(child_has_top.any(-1), top, picked))


def _broken_threshold(tree, probs, gen, threshold=0.25):
    """Accept the first child whose target probability exceeds a threshold, else sample."""
    picked = sample(probs, gen)
    B, T = tree.tokens.shape
    p_child = probs.gather(2, tree.tokens[:, None, :].expand(B, T, T))  # p(token j | slot i)
    is_child = tree.parents[:, None, :] == torch.arange(T)[None, :, None]
    good = is_child & (p_child > threshold)
    first = good.int().argmax(-1)
    return walk(tree, torch.where(good.any(-1), tree.tokens.gather(1, first), picked))


N_RUNS = 20000


def test_sampling_is_lossless_on_adversarial_trees():
    table = _target_table()
    law = _exact_law(table)
    bound = _tv_bound(V ** EMIT, N_RUNS)
    tv = _tv(_simulate(verify_sampling, table, N_RUNS, seed=7), law)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"


@pytest.mark.parametrize("broken", [_broken_top_candidate, _broken_threshold])
def test_broken_verifiers_fail_the_same_check(broken):
    table = _target_table()
    law = _exact_law(table)
    bound = _tv_bound(V ** EMIT, N_RUNS)
    tv = _tv(_simulate(broken, table, N_RUNS, seed=7), law)
    assert tv > bound, f"a broken verifier passed: TV {tv:.4f} <= bound {bound:.4f}"


def test_one_hot_target_reproduces_the_target_exactly():
    table = _target_table()
    one_hot = torch.nn.functional.one_hot(table.argmax(-1), V).double()
    out = _simulate(verify_sampling, one_hot, 500, seed=8)
    p0, r0 = 3, 1
    a = one_hot[p0, r0].argmax().item()
    b = one_hot[r0, a].argmax().item()
    c = one_hot[a, b].argmax().item()
    assert (out == torch.tensor([a, b, c])).all()
    assert torch.equal(out, _simulate(lambda t, p, g: verify_greedy(t, p), one_hot, 500, seed=8))


def test_sampling_verifier_accepts_drafted_tokens():
    # guards against a vacuous pass: the adversarial trees must get accepted often
    table = _target_table()
    gen = torch.Generator().manual_seed(9)
    prev = torch.randint(0, V, (4000,), generator=gen)
    cur = torch.randint(0, V, (4000,), generator=gen)
    tree, probs = _adversarial_tree(prev, cur, table, 0)
    v = verify_sampling(tree, probs, gen)
    assert (v.path_lens > 1).double().mean() > 0.4
    assert (v.path_lens > 2).any()
    # and the acceptance rate at the root is sum of p(child) over distinct valid children
    children = tree.tokens[:, 1:][(tree.parents[:, 1:] == 0)].reshape(4000, -1)
    distinct = torch.zeros(4000, V, dtype=torch.bool).scatter_(1, children, True)
    expect = (probs[:, 0] * distinct).sum(-1).mean().item()
    got = (v.path_lens > 1).double().mean().item()
    assert abs(got - expect) < 4 * math.sqrt(0.25 / 4000)


def test_sampling_seeded_runs_reproduce():
    table = _target_table()
    a = _simulate(verify_sampling, table, 300, seed=10)
    b = _simulate(verify_sampling, table, 300, seed=10)
    c = _simulate(verify_sampling, table, 300, seed=11)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_nodes_never_reach_the_forward_with_bad_ids():
    # a draft may pad invalid nodes with -1; the tree fed to the target must hold valid ids
    prop = Proposal(tokens=torch.tensor([[5, -1, -1]]), parents=torch.tensor([[0, 1, 0]]),
                    valid=torch.tensor([[True, False, False]]))
    tree = build_tree(torch.tensor([3]), prop)
    assert tree.tokens.tolist() == [[3, 5, 0, 0]]
    assert tree.parents.tolist() == [[-1, 0, -1, -1]]


@pytest.mark.parametrize("temperature", [1e-40, 1e-12])
def test_tiny_temperature_tends_to_the_one_hot(temperature):
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.5], [1e4, -1e4, 0.0, 1e4 - 1]])
    probs = process_logits(logits, temperature)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [1, 0] and torch.allclose(probs.max(-1).values, torch.ones(2))


@pytest.mark.parametrize("temperature, top_p, dtype", [(1.0, 1.0, torch.float32), (0.7, 0.8, torch.float64),
                                                        (2.0, 0.5, torch.float32)])
def test_path_sampling_gives_the_one_pass_verdict(temperature, top_p, dtype):
    """verify_sampling_path samples only the walked path; its verdict must be the one-pass one."""
    from glide.speculative.verify import counter_uniforms, stream_keys, verify_logits, verify_sampling_path

    gen = torch.Generator().manual_seed(3)
    B, V = 64, 4  # a tiny vocabulary so that deep paths are accepted often
    deep = 0
    for n in (0, 1, 5, 16, 33):
        p = _random_proposal(B, n, V, gen)
        tree = build_tree(torch.randint(0, V, (B,), generator=gen), p)
        logits = (3 * torch.randn(B, n + 1, V, generator=gen)).to(dtype)
        u = counter_uniforms(stream_keys(n, range(B))[:, None], torch.arange(n + 1)[None] + tree.depth)
        want = verify_sampling(tree, process_logits(logits, temperature, top_p), uniforms=u)
        got = verify_sampling_path(tree, logits, temperature, top_p, u)
        assert torch.equal(got.path_lens, want.path_lens), n
        assert torch.equal(got.path_idx, want.path_idx) and torch.equal(got.tokens, want.tokens), n
        chosen = verify_logits(tree, logits, temperature, top_p, u)  # the engine's entry point
        assert torch.equal(chosen.path_lens, want.path_lens) and torch.equal(chosen.tokens, want.tokens), n
        deep += int((want.path_lens >= 3).sum())
    assert deep > 20  # not vacuous: many walks went two levels down or more
