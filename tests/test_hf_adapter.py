"""A transformers Llama verifying a token tree through glide's tree_attention (Triton kernel:
compiled on CUDA, TRITON_INTERPRET=1 on CPU), checked against transformers' own eager attention
with an explicit mask. The model runs in float32 on DEVICE, so both sides share one device."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import glide.kernels.attention as attn_mod  # noqa: E402
import glide.kernels.compact as compact_mod  # noqa: E402
import glide.kernels.hf_adapter as adapter_mod  # noqa: E402
from glide.kernels.hf_adapter import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    cache_kwargs,
    compact_hf_cache,
    enable_tree_attention,
    verify_tree_hf,
)
from tolerances import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PREFIX = 5
# Two trees of 6 slots (slot 0 is the root); parents precede children.
PARENTS = [[-1, 0, 0, 1, 1, 2], [-1, 0, 1, 2, 0, 4]]


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=111,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(DEVICE)


def _ancestor_mask(parents):
    """(B, T, T) bool: slot j is slot i or an ancestor of i. Written out by walking parents."""
    batch, size = len(parents), len(parents[0])
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    for b, row in enumerate(parents):
        for i in range(size):
            j = i
            while j >= 0:
                mask[b, i, j] = True
                j = row[j]
    return mask.to(DEVICE)


def _eager(model, ids, cache, allowed, position_ids):
    """transformers' eager attention with an additive 4D mask built from ``allowed`` (B, T, S)."""
    model.set_attn_implementation("eager")
    additive = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))[:, None]
    out = model(input_ids=ids, attention_mask=additive, position_ids=position_ids, use_cache=True,
                **cache_kwargs(model, cache))
    return out.logits


@pytest.fixture(scope="module")
def prefix_state(model):
    gen = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, 111, (2, PREFIX), generator=gen).to(DEVICE)
    tree_ids = torch.randint(0, 111, (2, len(PARENTS[0])), generator=gen).to(DEVICE)
    model.set_attn_implementation("eager")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prefix_ids, use_cache=True, **cache_kwargs(model, cache))
    # transformers' forward swallows an unknown keyword: a cache passed under the wrong name
    # stays empty, and every test below would then see a tree without its prefix.
    assert cache.get_seq_length() == PREFIX
    return prefix_ids, tree_ids, cache


@torch.no_grad()
def test_tree_logits_match_eager_with_explicit_mask(model, prefix_state):
    _, tree_ids, cache = prefix_state
    tree_mask = _ancestor_mask(PARENTS)
    depth = tree_mask.sum(-1) - 1

    enable_tree_attention(model)
    ours = verify_tree_hf(model, tree_ids, tree_mask, copy.deepcopy(cache), backend="triton")

    allowed = torch.cat([torch.ones(2, 6, PREFIX, dtype=torch.bool, device=DEVICE), tree_mask], dim=-1)
    theirs = _eager(model, tree_ids, copy.deepcopy(cache), allowed, PREFIX + depth)
    assert ours.shape == (2, 6, 111)
    assert_close(ours, theirs, dtype=torch.float32, name="tree logits")

    # A tree flattened the wrong way (causal instead of ancestors) must not pass as equal.
    causal = torch.ones(6, 6, dtype=torch.bool, device=DEVICE).tril().expand(2, 6, 6)
    wrong = _eager(model, tree_ids, copy.deepcopy(cache), torch.cat([allowed[..., :PREFIX], causal], -1), PREFIX + depth)
    assert not torch.allclose(ours, wrong, atol=1e-3)


@torch.no_grad()
def test_accepted_path_then_decode_matches_plain_decoding(model, prefix_state):
    prefix_ids, tree_ids, cache = prefix_state
    cache = copy.deepcopy(cache)
    tree_mask = _ancestor_mask(PARENTS)
    enable_tree_attention(model)
    verify_tree_hf(model, tree_ids, tree_mask, cache, backend="triton")

    # Accept root -> slot 1 -> slot 3 in sequence 0 and root -> slot 4 -> slot 5 in sequence 1.
    path_idx = torch.tensor([[0, 1, 3], [0, 4, 5]], device=DEVICE)
    compact_hf_cache(cache, PREFIX, path_idx, torch.tensor([3, 3], device=DEVICE), backend="triton")
    assert cache.get_seq_length() == PREFIX + 3

    # One more token through the adapter's default causal path.
    next_ids = torch.tensor([[7], [42]], device=DEVICE)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ours = model(input_ids=next_ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]

    accepted = torch.gather(tree_ids, 1, path_idx)
    full = torch.cat([prefix_ids, accepted, next_ids], dim=1)
    model.set_attn_implementation("eager")
    theirs = model(input_ids=full).logits[:, -1]
    assert_close(ours, theirs, dtype=torch.float32, name="logits after compaction")


def test_bad_inputs(model, prefix_state):
    _, tree_ids, cache = prefix_state
    tree_mask = _ancestor_mask(PARENTS)
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match=ATTN_IMPLEMENTATION):
        verify_tree_hf(model, tree_ids, tree_mask, copy.deepcopy(cache))
    enable_tree_attention(model)
    with pytest.raises(ValueError, match="tree_mask"):
        verify_tree_hf(model, tree_ids, tree_mask[:, :5, :5], copy.deepcopy(cache))
    with pytest.raises(TypeError, match="tree_mask"):
        verify_tree_hf(model, tree_ids, tree_mask.float(), copy.deepcopy(cache))
    with pytest.raises(ValueError, match="tree_ids"):
        verify_tree_hf(model, tree_ids[0], tree_mask, copy.deepcopy(cache))
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=tree_ids, attention_mask=torch.tensor([[1] * 6, [0] + [1] * 5], device=DEVICE))
    with pytest.raises(ValueError, match="path_lens"):
        path_idx = torch.tensor([[0, 1], [0, 2]], device=DEVICE)
        compact_hf_cache(copy.deepcopy(cache), 2, path_idx, torch.tensor([2, 1], device=DEVICE))


@torch.no_grad()
def test_cache_the_model_ignores_is_refused(model, prefix_state, monkeypatch):
    # Under a keyword this transformers does not read, the cache is dropped without an error;
    # verify_tree_hf must notice instead of returning logits computed without the prefix.
    _, tree_ids, cache = prefix_state
    enable_tree_attention(model)
    monkeypatch.setattr(adapter_mod, "cache_kwargs", lambda model, cache: {"kv_cache": cache})
    with pytest.raises(RuntimeError, match="kv_cache=.*expected 5 \\+ 6"):
        verify_tree_hf(model, tree_ids, _ancestor_mask(PARENTS), copy.deepcopy(cache), backend="reference")


@torch.no_grad()
def test_auto_backend_runs_the_kernels(model, prefix_state, monkeypatch):
    # The adapter's default backend on DEVICE ("cuda", or "cpu" under TRITON_INTERPRET=1) must
    # launch the kernels: with the references made to raise, a silent fallback fails here.
    _, tree_ids, cache = prefix_state
    tree_mask = _ancestor_mask(PARENTS)
    enable_tree_attention(model)
    want = verify_tree_hf(model, tree_ids, tree_mask, copy.deepcopy(cache), backend="reference")

    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(attn_mod, "tree_attention_ref", no_ref)
    monkeypatch.setattr(compact_mod, "compact_kv_ref", no_ref)
    cache = copy.deepcopy(cache)
    got = verify_tree_hf(model, tree_ids, tree_mask, cache)
    assert_close(got, want, dtype=torch.float32, name="tree logits (auto backend)")
    path_idx = torch.tensor([[0, 2, 5], [0, 1, 2]], device=DEVICE)
    compact_hf_cache(cache, PREFIX, path_idx, torch.tensor([3, 3], device=DEVICE))
    model(input_ids=tree_ids[:, :1], use_cache=True, **cache_kwargs(model, cache))  # default causal path
