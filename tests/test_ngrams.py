"""The corpus n-gram table: its counts against a brute-force count, its two walks against each
other and a plain Python rollout, its file, and its place in the dynamic tree (lossless, and
used where the history has no match)."""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from glide.draft.dynamic import DynamicTreeDraft
from glide.speculative.engine import generate_ids
from glide.speculative.ngrams import NgramTable, context_hash

from glide_helpers import history_context, trained_pair


def _random_sequences(seed, n=150, vocab=7, max_len=40):
    g = np.random.default_rng(seed)
    return [g.integers(0, vocab, size=int(g.integers(0, max_len))).tolist() for _ in range(n)]


def _brute(sequences, max_n, min_count):
    """{context tuple: next token} by plain counting: the most frequent next token (the smallest
    among equals), kept when seen ``min_count`` times."""
    counts = defaultdict(Counter)
    for s in sequences:
        for n in range(1, max_n + 1):
            for i in range(len(s) - n):
                counts[tuple(s[i:i + n])][s[i + n]] += 1
    table = {}
    for ctx, c in counts.items():
        best = min(c, key=lambda t: (-c[t], t))
        if c[best] >= min_count:
            table[ctx] = best
    return table


def _brute_next(table, history, max_n):
    for n in range(min(max_n, len(history)), 0, -1):
        ctx = tuple(history[len(history) - n:])
        if ctx in table:
            return table[ctx]
    return -1


@pytest.mark.parametrize("max_n,min_count", [(1, 1), (3, 2), (4, 3)])
def test_table_equals_a_brute_force_count(max_n, min_count):
    seqs = _random_sequences(0)
    tab = NgramTable.build(seqs, 7, max_n=max_n, min_count=min_count)
    want = _brute(seqs, max_n, min_count)
    assert len(tab) == len(want)
    # every context the corpus holds (and some it does not), as a window of max_n tokens
    g = np.random.default_rng(1)
    contexts = list(_brute(seqs, max_n, 1)) + [tuple(g.integers(0, 7, size=max_n).tolist()) for _ in range(50)]
    for ctx in contexts:
        chain, valid = tab.continuation(torch.tensor([list(ctx)]), torch.tensor([len(ctx)]), torch.tensor([True]), 1)
        got = int(chain[0, 0]) if valid[0, 0] else -1
        assert got == _brute_next(want, list(ctx), max_n), ctx


def test_context_hash_is_the_same_in_numpy_and_torch():
    g = np.random.default_rng(2)
    w = g.integers(0, 49152, size=(100, 4))
    assert np.array_equal(context_hash(w), context_hash(torch.from_numpy(w)).numpy())
    assert len(set(context_hash(w).tolist())) == 100


def _rollout(table, history, max_n, k):
    h, out = list(history), []
    for _ in range(k):
        t = _brute_next(table, h, max_n)
        if t < 0:
            break
        out.append(t)
        h.append(t)
    return out


def test_continuation_agrees_with_a_python_rollout():
    seqs = _random_sequences(3, n=300, vocab=5)
    tab = NgramTable.build(seqs, 5, max_n=3, min_count=2)
    want_table = _brute(seqs, 3, 2)
    g = np.random.default_rng(4)
    B, cap, k = 6, 20, 9
    tokens = torch.from_numpy(g.integers(0, 5, size=(B, cap)))
    lengths = torch.tensor([0, 1, 2, 3, 20, 11])
    active = torch.tensor([True, True, True, False, True, True])
    chain, valid = tab.continuation(tokens, lengths, active, k)
    for b in range(B):
        want = _rollout(want_table, tokens[b, :int(lengths[b])].tolist(), 3, k) if active[b] else []
        n = int(valid[b].sum())
        assert valid[b, :n].all() and not valid[b, n:].any()  # a prefix
        assert chain[b, :n].tolist() == want and not chain[b, n:].any()
    assert valid[4].any() and not valid[3].any()  # a live row got a chain; the finished one none


def test_the_walk_finds_wrapped_hashes_on_a_real_vocabulary():
    """Hashes of 4 tokens of a 49152-token vocabulary pass 2**63: the lookup's hashes must wrap
    as the build's did, or the chain breaks at once."""
    g = np.random.default_rng(6)
    base = g.integers(0, 49152, size=30).tolist()
    seqs = [base] * 2 + [g.integers(0, 49152, size=30).tolist() for _ in range(20)]
    tab = NgramTable.build(seqs, 49152, max_n=4, min_count=2)
    assert (tab.keys[3] < 0).any() and (tab.keys[3] > 0).any()  # both signs among the stored hashes
    tokens = torch.tensor([base[:10] + [0] * 4, base[3:14] + [0] * 3])
    lengths = torch.tensor([10, 11])
    active = torch.ones(2, dtype=torch.bool)
    chain, valid = tab.continuation(tokens, lengths, active, 12)
    assert valid.all() and chain[0].tolist() == base[10:22] and chain[1].tolist() == base[14:26]


def test_save_load_round_trip_and_bad_files(tmp_path):
    tab = NgramTable.build(_random_sequences(5), 7, max_n=3, min_count=2)
    path = tab.save(tmp_path / "ngrams.npz")
    back = NgramTable.load(path)
    assert back.vocab_size == 7 and back.max_n == 3
    assert all(np.array_equal(a, b) for a, b in zip(tab.keys, back.keys))
    assert all(np.array_equal(a, b) for a, b in zip(tab.next_tokens, back.next_tokens))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        NgramTable.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ValueError, match="not a glide n-gram table"):
        NgramTable.load(other)
    cut = tmp_path / "cut.npz"  # a real table, truncated: a damaged zip
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        NgramTable.load(cut)


def test_a_draft_folder_table_is_checked_and_named(tmp_path):
    from glide.draft.dynamic import load_ngrams

    folder = tmp_path / "draft"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert load_ngrams(folder, 7) is None  # no table: none
    tab = NgramTable.build(_random_sequences(7), 7, max_n=2, min_count=1)
    tab.save(folder / "ngrams.npz")
    assert len(load_ngrams(folder, 7)) == len(tab)
    assert len(load_ngrams(folder / "config.json", 7)) == len(tab)  # a file names its folder
    with pytest.raises(ValueError, match=r"^draft: .*ngrams.npz.*vocabulary \(7\)"):
        load_ngrams(folder, 8)
    data = (folder / "ngrams.npz").read_bytes()
    (folder / "ngrams.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^draft: .*ngrams.npz"):
        load_ngrams(folder, 7)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_n"):
        NgramTable.build([[1, 2]], 5, max_n=0)
    with pytest.raises(ValueError, match="min_count"):
        NgramTable.build([[1, 2]], 5, min_count=0)
    with pytest.raises(ValueError, match="sequences"):
        NgramTable.build([[1, 9]], 5)
    with pytest.raises(ValueError, match="sorted"):
        NgramTable([np.array([3, 1])], [np.array([0, 0])], 5)
    with pytest.raises(ValueError, match="outside"):
        NgramTable([np.array([1, 3])], [np.array([0, 5])], 5)


# ---------------------------------------------------------------- in the dynamic tree
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_pair(str(tmp_path_factory.mktemp("trained")))


def test_the_table_fills_in_where_the_history_has_no_match(trained):
    t, d, _ = trained
    V = t.config.vocab_size
    # the corpus says 5 -> 6 -> 2 -> 3 (each seen 3 times); row 0's history repeats its last
    # token (history lookup wins), row 1's does not (the table's chain comes in)
    tab = NgramTable.build([[5, 6, 2, 3]] * 3, V, max_n=2, min_count=3)
    g = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, lookup=3, ngrams=tab)
    ctx = history_context(t, [[1, 5, 4, 1, 5], [0, 1, 4, 5]])
    tok = torch.tensor([[3, 7], [2, 4]])
    v = torch.tensor([[0.5, 0.3], [0.6, 0.2]])
    parent = torch.full((2, 2), -1)
    depth = torch.ones(2, 2, dtype=torch.int64)
    tok, v, parent, depth, (chain, ok, n, touched) = g._merge_lookup(ctx, tok, v, parent, depth)
    assert chain[0].tolist() == [4, 1, 5] and n[0] == 2  # history: [1, 5] was followed by 4, 1, 5
    assert chain[1].tolist() == [6, 2, 3] and ok[1].all() and n[1] == 0  # the corpus's chain
    assert tok[1, 2:].tolist() == [6, 2, 3] and (v[1, 2:] > 0).all()
    plain = DynamicTreeDraft(d, depth=4, top_k=3, beam=2, lookup=3)
    _, _, _, _, (chain0, ok0, _, _) = plain._merge_lookup(ctx, tok[:, :2], v[:, :2], parent[:, :2], depth[:, :2])
    assert not ok0[1].any()  # without the table row 1 gets nothing


def test_the_table_must_fit_the_target(trained):
    t, d, _ = trained
    with pytest.raises(ValueError, match="vocabulary"):
        DynamicTreeDraft(d, ngrams=NgramTable.build([[1, 2, 3]], t.config.vocab_size + 1, min_count=1))
    with pytest.raises(TypeError, match="ngrams"):
        DynamicTreeDraft(d, ngrams={"a": 1})


@pytest.mark.parametrize("kw", [dict(depth=4, top_k=3, beam=2, fixed_size=12, lookup=3),
                                dict(depth=3, top_k=2, beam=2, lookup=8, fallback=False)])
def test_dynamic_tree_with_a_corpus_table_equals_ar(trained, kw):
    t, d, _ = trained
    # short prompts: the first steps' histories hold no earlier copy of their last token (in a
    # vocabulary of 7 they soon do), so the table's chains come in
    prompts = [[6], [3], [5], [2, 6], [1, 3, 0, 4, 3], [0, 1, 3, 4, 3, 1, 0, 0, 3, 6, 5]]
    ar = generate_ids(t, prompts, None, max_new_tokens=40)
    # a corpus of the target's own replies to other prompts
    corpus = [o.output_ids for o in generate_ids(t, [[3, 1], [6, 6, 0], [5, 4, 4]], None, max_new_tokens=40)]
    tab = NgramTable.build(corpus, t.config.vocab_size, max_n=3, min_count=1)
    dyn = DynamicTreeDraft(d, ngrams=tab, **kw)
    out = generate_ids(t, prompts, dyn, max_new_tokens=40)
    assert [o.output_ids for o in out] == [o.output_ids for o in ar]
    seen, matched = dyn._lookup_counts
    assert seen[0].sum() > 0  # the table's chains (suffix length 0) were proposed and judged
