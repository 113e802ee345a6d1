"""The runner with fused decoder kernels (add_rms_norm, rope_store, silu_mul) equals the runner
with torch's ops: same logits and same cache, for prefill, decode and tree verification over
ragged lengths. Runs the Triton path under TRITON_INTERPRET=1 on the CPU (float32), or
compiled on a GPU."""

import pytest
import torch

from glide.model import LlamaModel, ModelConfig
from glide.kernels import use_triton
from glide.model.llama import DecoderLayer
from test_model import random_tree
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 97


@pytest.fixture(scope="module")
def model():
    """Tiny float32 model with GQA (6 query heads over 2 KV heads), head_dim 8, norms away
    from one so that a misplaced weight shows."""
    torch.manual_seed(5)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_layers=2, num_heads=6,
        num_kv_heads=2, head_dim=8, rope_theta=100.0, max_position_embeddings=64,
    )
    m = LlamaModel(config, dtype=torch.float32, device=DEVICE, init_std=0.15)
    for name, p in m.named_parameters():
        if "norm" in name:
            p.normal_(1.0, 0.3)
    m.attn_backend = "triton"
    return m


def _not_called(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran")
    return fail


def both_ways(model, monkeypatch, fn, setup=lambda: None):
    """``fn(setup())`` with fused kernels on (the unfused layer made to raise) and off (the
    fused one made to raise): ``(fused, unfused)``. ``setup`` runs unpatched."""
    out = {}
    for fused in (True, False):
        state = setup()
        with monkeypatch.context() as m:
            m.setattr(model, "fused_kernels", fused)
            if fused:
                m.setattr(DecoderLayer, "forward", _not_called("DecoderLayer.forward"))
            else:
                m.setattr(DecoderLayer, "forward_fused", _not_called("DecoderLayer.forward_fused"))
            out[fused] = fn(state)
    return out[True], out[False]


def prompts_for(gen, lengths):
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def prefilled(model, prompts, max_seq=32):
    """A cache holding ``prompts`` (prefilled with the fused kernels off), its free slots NaN so
    that a read of an unwritten slot shows."""
    cache = model.new_cache(len(prompts), max_seq)
    cache.kv.fill_(float("nan"))
    was = model.fused_kernels
    model.fused_kernels = False
    try:
        model.prefill(prompts, cache)
    finally:
        model.fused_kernels = was
    return cache


def assert_same_cache(fused, unfused):
    """Every slot a forward wrote agrees to float32 round-off; every other slot is bitwise the
    same (NaN where nothing was ever written)."""
    assert torch.equal(fused.lens, unfused.lens)
    a, b = fused.kv, unfused.kv
    assert torch.equal(a.isnan(), b.isnan()), "the two paths wrote different slots"
    assert_close(a.nan_to_num(), b.nan_to_num(), name="cache")


def test_prefill_ragged(model, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    prompts = prompts_for(gen, (5, 2, 7))

    def run(_):
        cache = model.new_cache(3, 24)
        cache.kv.fill_(float("nan"))
        return model.prefill(prompts, cache), cache

    (lf, cf), (lu, cu) = both_ways(model, monkeypatch, run)
    assert_close(lf, lu, name="prefill logits")
    assert_same_cache(cf, cu)


@pytest.mark.parametrize("lengths", [(6,), (4, 9, 1)])  # one sequence: the slice-copy write
def test_decode_step(model, monkeypatch, lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    prompts = prompts_for(gen, lengths)
    tokens = torch.randint(3, VOCAB, (len(prompts),), generator=gen).to(DEVICE)

    def run(cache):
        return model.decode(tokens, cache), cache

    (lf, cf), (lu, cu) = both_ways(model, monkeypatch, run, lambda: prefilled(model, prompts))
    assert_close(lf, lu, name="decode logits")
    assert_same_cache(cf, cu)


@pytest.mark.parametrize("rows", ["all", "logits_index", "logits_rows"])
def test_tree_forward_ragged(model, monkeypatch, rows):
    gen = torch.Generator().manual_seed(3)
    prompts = prompts_for(gen, (3, 8))
    T = 6
    trees = [random_tree(gen, T) for _ in prompts]
    mask = torch.stack([m for _, m, _ in trees]).to(DEVICE)
    depth = torch.stack([d for _, _, d in trees]).to(DEVICE)
    tokens = torch.randint(3, VOCAB, (2, T), generator=gen).to(DEVICE)
    kwargs = {}
    if rows == "logits_index":
        kwargs["logits_index"] = torch.tensor([5, 2], device=DEVICE)
    elif rows == "logits_rows":
        kwargs["logits_rows"] = (torch.rand(2, T, generator=gen) < 0.5).to(DEVICE)

    def run(cache):
        return model(tokens, cache.lens[:, None] + depth, mask, cache, **kwargs), cache

    (lf, cf), (lu, cu) = both_ways(model, monkeypatch, run, lambda: prefilled(model, prompts))
    assert lf.shape == lu.shape
    assert_close(lf, lu, name="tree logits")
    assert_same_cache(cf, cu)


def test_run_unchecked_writes_at_the_device_lengths(model, monkeypatch):
    """The graph path: no host-known length (same_len=None), ragged lens read on the device."""
    gen = torch.Generator().manual_seed(9)
    prompts = prompts_for(gen, (2, 5))
    tokens = torch.randint(3, VOCAB, (2, 3), generator=gen).to(DEVICE)
    mask = torch.ones(3, 3, dtype=torch.bool, device=DEVICE).tril().expand(2, 3, 3)

    def run(cache):
        pos = cache.lens[:, None] + torch.arange(3, device=DEVICE)
        return model.run_unchecked(tokens, pos, mask, cache, None), cache

    (lf, cf), (lu, cu) = both_ways(model, monkeypatch, run, lambda: prefilled(model, prompts))
    assert_close(lf, lu, name="logits")
    assert_same_cache(cf, cu)


def test_reference_backend_ignores_the_switch(model, monkeypatch):
    """Off the Triton path the switch changes nothing: the layer runs torch's ops."""
    gen = torch.Generator().manual_seed(4)
    prompts = prompts_for(gen, (3,))
    monkeypatch.setattr(model, "attn_backend", "reference")
    monkeypatch.setattr(model, "fused_kernels", True)
    monkeypatch.setattr(DecoderLayer, "forward_fused", _not_called("DecoderLayer.forward_fused"))
    cache = model.new_cache(1, 8)
    cache.compact_backend = "reference"
    model.prefill(prompts, cache)


def test_default_fuses_on_cuda_only(model, monkeypatch):
    """fused_kernels=None (the default) keeps the interpreter's CPU tensors on torch's ops, and
    True runs the fused kernels there too."""
    monkeypatch.setattr(model, "fused_kernels", None)
    assert LlamaModel.fused_kernels is None
    assert not model._fused(torch.device("cpu"))
    monkeypatch.setattr(model, "fused_kernels", True)
    assert model._fused(torch.device("cpu")) == use_triton(torch.device("cpu"), model.attn_backend)
    monkeypatch.setattr(model, "fused_kernels", False)
    assert not model._fused(torch.device("cpu"))
