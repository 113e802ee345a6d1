"""CUDA-graph replay of the target's forwards (glide.model.graphs).

On the CPU, ``CudaGraphs(model, capture=False)`` runs the same static buffers, bucket padding
and pooled caches without capturing, so the bookkeeping is tested everywhere; the capture
itself is tested on CUDA only.
"""

import pytest
import torch

from glide.model.graphs import BUCKETS, CudaGraphs, bucket_for, graphs_for
from glide.speculative.drafts import OracleDraft, RandomTreeDraft
from glide.speculative.engine import generate_ids
from glide_helpers import tiny_target
from test_model import random_tree

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 3]]


def _model(dtype=torch.float64, device="cpu", seed=0, max_pos=256):
    return tiny_target(seed=seed, vocab=41, dtype=dtype, eos=(), max_pos=max_pos, device=device)


def _random_tree(B, T, gen):
    """A random topologically ordered tree per row: mask (B, T, T) and depths (B, T)."""
    rows = [random_tree(gen, T) for _ in range(B)]
    return torch.stack([m for _, m, _ in rows]), torch.stack([d for _, _, d in rows])


def test_bucket_for_rounds_up_and_stops_at_the_largest():
    assert [bucket_for(t) for t in (1, 5, 7, 9, 17, 64)] == [1, 5, 8, 12, 24, 64]
    assert bucket_for(BUCKETS[-1] + 1) is None


@pytest.mark.parametrize("T", [1, 3, 7, 13])
def test_padded_tree_forward_matches_eager(T):
    """A tree in a larger bucket gives the eager forward's logits and writes the same K/V into
    the real slots; the committed prefix is untouched."""
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    gen = torch.Generator().manual_seed(T)
    B = 3
    lens = torch.tensor([5, 9, 2])
    eager_cache = model.new_cache(B, 64)
    pooled = graphs.new_cache(B, 64)
    assert pooled.max_seq >= 64 + BUCKETS[-1]
    for cache in (eager_cache, pooled):  # the same committed prefix in both
        ids = torch.randint(0, 41, (B, 9), generator=torch.Generator().manual_seed(0))
        model.forward(ids, torch.arange(9).expand(B, 9), torch.ones(9, 9, dtype=torch.bool).tril().expand(B, 9, 9),
                      cache)
        cache.commit(lens)
    for step in range(3):  # several calls: leftovers of a previous call must not leak
        tokens = torch.randint(0, 41, (B, T), generator=gen)
        mask, depth = _random_tree(B, T, gen)
        pos = eager_cache.lens[:, None] + depth
        want = model.forward(tokens, pos, mask, eager_cache)
        got = graphs.forward(tokens, pos.clone(), mask, pooled)
        assert got.shape == want.shape == (B, T, 41)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for b in range(B):
            n = int(lens[b]) + T
            torch.testing.assert_close(pooled.kv[:, :, b, :, :n], eager_cache.kv[:, :, b, :, :n],
                                       rtol=1e-12, atol=1e-12)
    assert graphs.eager_calls == 0 and graphs.replays == 3
    assert graphs.captures == 1  # one graph per (cache, batch, bucket, logits mode)


def test_decode_through_graphs_commits_like_the_model():
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    a, b = model.new_cache(2, 32), graphs.new_cache(2, 32)
    for cache, runner in ((a, model), (b, graphs)):
        runner.prefill([[1, 2, 3], [4, 5]], cache)
    tok = torch.tensor([6, 7])
    for _ in range(4):
        want, got = model.decode(tok, a), graphs.decode(tok, b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(a.lens, b.lens)
        tok = want.argmax(-1)


def test_unpooled_cache_and_oversized_tree_run_eagerly():
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    cache = model.new_cache(1, 200)  # not the pooled cache: its address is not in any graph
    T = 3
    out = graphs.forward(torch.ones(1, T, dtype=torch.int64), torch.arange(T)[None],
                         torch.ones(T, T, dtype=torch.bool).tril()[None], cache)
    assert out.shape == (1, T, 41) and graphs.eager_calls == 1 and graphs.replays == 0
    big = BUCKETS[-1] + 1
    pooled = graphs.new_cache(1, 8)
    graphs.forward(torch.ones(1, big, dtype=torch.int64), torch.arange(big)[None],
                   torch.ones(big, big, dtype=torch.bool).tril()[None], pooled)
    assert graphs.eager_calls == 2 and graphs.replays == 0


def test_pooled_cache_is_reused_then_grown_and_its_graphs_dropped():
    model = _model(max_pos=1024)
    graphs = CudaGraphs(model, capture=False)
    first = graphs.new_cache(2, 16)
    graphs.release(first)
    assert graphs.new_cache(2, 10) is first  # a shorter request reuses it
    graphs.decode(torch.tensor([1, 2]), first)
    assert len(graphs._graphs) == 1
    graphs.release(first)
    grown = graphs.new_cache(2, first.max_seq + 1)
    assert grown is not first and grown.max_seq > first.max_seq
    assert len(graphs._graphs) == 0 and int(grown.lens.sum()) == 0
    assert graphs.new_cache(3, 16) is not grown  # one cache per batch size
    graphs.release(grown)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        graphs.new_cache(2, 1025)
    edge = graphs.new_cache(2, 1000)  # no room left for padding: the cache stops at the limit
    assert edge.max_seq == 1024


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_through_graphs_is_identical(temperature):
    """AR and a random-tree draft (tree sizes change every step, so buckets pad) give the same
    tokens through the graphs as eagerly, at T=0 and T=1."""
    model = _model()
    kw = dict(max_new_tokens=20, temperature=temperature, seed=3)
    ar = generate_ids(model, PROMPTS, **kw)
    refs = [o.output_ids for o in ar]
    for draft_fn in (lambda: None, lambda: RandomTreeDraft(10, seed=1, references=refs, p_correct=0.6),
                     lambda: OracleDraft(refs, 4, width=2)):
        want = generate_ids(model, PROMPTS, draft_fn(), **kw)
        graphs = CudaGraphs(model, capture=False)
        got = generate_ids(model, PROMPTS, draft_fn(), cuda_graphs=graphs, **kw)
        assert [o.output_ids for o in got] == [o.output_ids for o in want]
        assert [o.accepted for o in got] == [o.accepted for o in want]
        assert graphs.replays > 0 and graphs.eager_calls == 0


def test_cuda_graphs_argument_is_checked():
    model = _model()
    assert graphs_for(model) is None and graphs_for(model, False) is None
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on CUDA"):
        graphs_for(model, True)
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        graphs_for(model, "yes")
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        generate_ids(model, PROMPTS, max_new_tokens=4, cuda_graphs=True)
    with pytest.raises(ValueError, match="capture=True needs a CUDA model"):
        CudaGraphs(model)
    with pytest.raises(ValueError, match="another model"):
        generate_ids(model, PROMPTS, max_new_tokens=4, cuda_graphs=CudaGraphs(_model(), capture=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graphs_match_eager_on_cuda():
    model = _model(dtype=torch.float32, device="cuda")
    graphs = graphs_for(model)
    assert graphs is not None and graphs.capture
    for draft in (None, OracleDraft([o.output_ids for o in generate_ids(model, PROMPTS, max_new_tokens=16,
                                                                        cuda_graphs=False)], 4, width=2)):
        want = generate_ids(model, PROMPTS, draft, max_new_tokens=16, cuda_graphs=False)
        got = generate_ids(model, PROMPTS, draft, max_new_tokens=16)
        assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert graphs.captures >= 2 and graphs.replays > 0
    # a random GliDe draft captures its chain; float32, so the tokens must match exactly
    from glide.draft import GlideDraft, GlideDraftModel, new_draft_config

    torch.manual_seed(5)
    net = GlideDraftModel(new_draft_config(model, num_layers=1), dtype=torch.float32, device="cuda",
                          init_std=0.3).attach(model)
    want = generate_ids(model, PROMPTS, GlideDraft(net, 3), max_new_tokens=16, cuda_graphs=False)
    draft = GlideDraft(net, 3)
    got = generate_ids(model, PROMPTS, draft, max_new_tokens=16)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert draft._graphs[False].graph is not None


def test_api_refuses_cuda_graphs_off_cuda_naming_the_argument():
    from glide import api

    with pytest.raises(api.ArgumentError) as err:
        api.generate(["hi"], method="ar", device="cpu", cuda_graphs=True)
    assert err.value.argument == "cuda_graphs"
    with pytest.raises(api.ArgumentError) as err:
        api.generate(["hi"], method="ar", device="cpu", cuda_graphs="on")
    assert err.value.argument == "cuda_graphs"


def test_cli_flag_turns_graphs_off():
    from glide.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--no-cuda-graphs"])
    assert args.cuda_graphs is False
    assert build_parser().parse_args(["generate", "--prompt", "x"]).cuda_graphs is None


@pytest.fixture(scope="module")
def glide_pair(tmp_path_factory):
    from glide_helpers import trained_pair

    return trained_pair(str(tmp_path_factory.mktemp("trained")))


@pytest.mark.parametrize("kind", ["glide", "cape"])
def test_glide_drafts_through_graphs_are_identical(glide_pair, kind):
    """The GliDe chain (and CaPE, which reads its logits) drafted through the static graph path
    gives the same proposals, so the same tokens and acceptance, as the eager draft; the chain
    is captured once per generation and keep_logits gets its own graph."""
    from glide.draft.cape import CapeDraft
    from glide.draft.runtime import GlideDraft

    target, net, _ = glide_pair
    prompts = [[1, 3, 0, 4, 3], [4, 0], [0, 1, 3, 4, 3, 1, 0, 0, 3, 6, 5]]
    make = (lambda: GlideDraft(net, gamma=3)) if kind == "glide" else (lambda: CapeDraft(net, gamma=3))
    want = generate_ids(target, prompts, make(), max_new_tokens=30)
    draft = make()
    graphs = CudaGraphs(target, capture=False)
    got = generate_ids(target, prompts, draft, max_new_tokens=30, cuda_graphs=graphs)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.accepted for o in got] == [o.accepted for o in want]
    assert max(max(o.accepted) for o in got) > 1  # the trained draft does get accepted
    assert list(draft._graphs) == [kind == "cape"] and draft._graph_mode is False


def test_glide_draft_refuses_capture_off_cuda(glide_pair):
    from glide.draft.runtime import GlideDraft

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA draft"):
        GlideDraft(glide_pair[1]).use_cuda_graphs(True)


def test_pooled_cache_is_leased_while_a_generation_runs():
    """A second generation of the same batch size started while one runs (from a callback) gets
    a plain cache and eager forwards, never the pooled cache the first one is using."""
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    first = graphs.new_cache(2, 16)
    second = graphs.new_cache(2, 16)
    other = graphs.new_cache(3, 16)
    assert second is not first and other is not first
    graphs.release(other)
    graphs.forward(torch.ones(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64),
                   torch.ones(2, 1, 1, dtype=torch.bool), second)
    assert graphs.eager_calls == 1 and graphs.replays == 0  # the plain cache is never captured
    graphs.release(first)
    assert graphs.new_cache(2, 16) is first
    # generate_ids leases and releases, also when a callback starts a nested generation
    inner = []

    def on_tokens(b, ids):
        if not inner:
            inner.append(generate_ids(model, PROMPTS[:2], max_new_tokens=3, cuda_graphs=graphs))

    graphs.release(first)
    want = generate_ids(model, PROMPTS[:2], max_new_tokens=6)
    got = generate_ids(model, PROMPTS[:2], max_new_tokens=6, cuda_graphs=graphs, on_tokens=on_tokens)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.output_ids for o in inner[0]] == [o.output_ids[:3] for o in want]
    assert graphs._leased == set()


def test_a_bound_running_ahead_is_measured_before_falling_back():
    """compact() moves the host bound ahead by the tree width; the forward measures the real
    lengths (one sync) instead of running eagerly."""
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    cache = graphs.new_cache(1, 16)
    model.prefill([[1, 2, 3]], cache)
    cache._set_bound(cache.max_seq - 2, same=False)  # as after many compactions
    T = 4
    graphs.forward(torch.ones(1, T, dtype=torch.int64), cache.lens[:, None] + torch.arange(T),
                   torch.ones(T, T, dtype=torch.bool).tril()[None], cache)
    assert graphs.replays == 1 and graphs.eager_calls == 0
    assert cache.max_len_bound() == 3


def test_changed_model_setup_runs_eagerly():
    model = _model()
    graphs = CudaGraphs(model, capture=False)
    cache = graphs.new_cache(1, 16)
    model.prefill([[1, 2, 3]], cache)
    tok = torch.tensor([4])
    graphs.decode(tok, cache)
    model.fused_kernels = False  # the graphs were made with the class default
    graphs.decode(tok, cache)
    assert graphs.replays == 1 and graphs.eager_calls == 1


def test_graphs_need_the_triton_attention():
    """A CUDA model on the reference attention (float64 needs it) decodes eagerly by default,
    and cuda_graphs=True says why it cannot. No CUDA call is made: the checks are host-only."""
    from types import SimpleNamespace

    fake = SimpleNamespace(device=torch.device("cuda"), attn_backend="reference")
    assert graphs_for(fake) is None
    with pytest.raises(ValueError, match="needs the Triton attention"):
        graphs_for(fake, True)


def test_verify_cost_can_be_timed_through_graphs(tmp_path):
    """The dynamic tree sizes its trees by the verify cost the engine pays: with graphs on, the
    curve is timed through a CudaGraphs of its own and cached under its own key."""
    from glide.draft.dynamic import VerifyCost

    model = _model()
    assert VerifyCost.key(model, 1, 64) != VerifyCost.key(model, 1, 64, graphs=True)
    cost = VerifyCost.measure(model, 1, 32, sizes=(1, 3), reps=1, graphs=True)
    assert cost.sizes == [1, 3] and all(t > 0 for t in cost.seconds) and cost.meta["graphs"] is True
    path = tmp_path / "vc.json"
    VerifyCost.cached(model, 1, 32, path=path, graphs=True)
    import json

    assert list(json.loads(path.read_text())) == [VerifyCost.key(model, 1, 32, graphs=True)]


@pytest.mark.parametrize("kind", ["glide", "cape", "dynamic"])
def test_draft_chain_is_captured_in_begin(glide_pair, monkeypatch, kind):
    """With capture on, GliDe and CaPE capture their chain in begin() (set-up, outside the timed
    steps), once a generation; the dynamic tree captures there the forwards of its grown
    levels, one per run width. Capture is faked on the CPU: a CapturedCall that runs its
    function eagerly and counts its constructions."""
    import glide.model.graphs as graphs_mod
    from glide.draft.cape import CapeDraft
    from glide.draft.dynamic import DynamicTreeDraft
    from glide.draft.runtime import GlideDraft

    made = []

    class FakeCapture:
        def __init__(self, fn, capture, device, pool=None):
            self.fn, self.graph = fn, None
            made.append(capture)

        def run(self):
            return self.fn()

    target, net, _ = glide_pair
    prompts = [[1, 3, 0, 4, 3], [4, 0]]
    make = {"glide": lambda: GlideDraft(net, gamma=3), "cape": lambda: CapeDraft(net, gamma=3),
            "dynamic": lambda: DynamicTreeDraft(net, fixed_size=6)}[kind]
    want = generate_ids(target, prompts, make(), max_new_tokens=12)
    monkeypatch.setattr(graphs_mod, "CapturedCall", FakeCapture)
    graphs = CudaGraphs(target, capture=False)
    monkeypatch.setattr(graphs, "capture", True)  # what the engine tells the draft
    draft = make()
    began = []
    real_begin = type(draft).begin

    def begin(self, ctx):
        real_begin(self, ctx)
        began.append(dict(self._graphs))

    monkeypatch.setattr(type(draft), "begin", begin)
    # past the CUDA-only checks of use_cuda_graphs: the mode the engine hands over
    monkeypatch.setattr(type(draft), "use_cuda_graphs", lambda self, capture: setattr(self, "_graph_mode", capture))
    got = generate_ids(target, prompts, draft, max_new_tokens=12, cuda_graphs=graphs)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    # the dynamic tree (depth 6, beam 4): one graph per run width of its grown levels
    expect = {"glide": [False], "cape": [True], "dynamic": [("level", 4 * d) for d in range(1, 6)]}[kind]
    assert list(began[0]) == expect and list(draft._graphs) == expect
