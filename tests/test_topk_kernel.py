"""cape_topk (Triton: compiled on CUDA, TRITON_INTERPRET=1 on CPU) against the float64 reference."""

import pytest
import torch

import glide.kernels.topk as topk_mod
from glide.kernels import cape_topk
from glide.kernels.reference import cape_topk_ref
from glide.kernels.topk import MAX_K, _chunking
from tolerances import assert_close

# Inputs are drawn on the CPU (same numbers on every machine) and moved to DEVICE; the float64
# references are computed on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Outputs are computed in float32 whatever the input dtype (half inputs are exact in float32),
# so every case is held to the float32 tolerance.
F32 = torch.float32


def _to_device(x):
    """``x`` on DEVICE: tensors moved, tuples mapped, anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, tuple):
        return tuple(_to_device(t) for t in x)
    return x


def _strided_copy(t):
    """``t`` on DEVICE with the same strides (``.to`` would make a contiguous copy)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
    return out.copy_(t)


def _poisoned(num_rows, k):
    probs = torch.full((num_rows, k), float("nan"), dtype=torch.float32, device=DEVICE)
    ids = torch.full((num_rows, k), -1, dtype=torch.int64, device=DEVICE)
    return probs, ids


def _check(logits, k, temperature, **kwargs):
    """Run the kernel on DEVICE into NaN-poisoned outputs and check it against float64 softmax.

    ``logits`` is a CPU tensor (possibly a strided view); the kernel sees it moved to DEVICE
    with the same strides. Returns ``probs, ids`` on the CPU.
    """
    num_rows, vocab = logits.shape
    out = _poisoned(num_rows, k)
    probs, ids = cape_topk(_strided_copy(logits), k, temperature, out=out, backend="triton", **kwargs)
    assert probs.data_ptr() == out[0].data_ptr() and ids.data_ptr() == out[1].data_ptr()
    assert probs.dtype == torch.float32 and ids.dtype == torch.int64
    probs, ids = probs.cpu(), ids.cpu()

    ref_probs, _ = cape_topk_ref(logits.double(), k, temperature)
    assert_close(probs, ref_probs, dtype=F32, name="probs")
    # Ties (common in bf16) may pick other ids than torch.topk: check that each id carries
    # the probability reported for it instead of comparing ids directly.
    assert ((ids >= 0) & (ids < vocab)).all(), "ids out of range"
    full = torch.softmax(logits.double() / temperature, dim=-1)
    assert_close(full.gather(1, ids), ref_probs, dtype=F32, name="softmax at ids")
    assert (probs[:, :-1] >= probs[:, 1:]).all(), "probs not sorted descending"
    for row in ids:
        assert row.unique().numel() == k, f"repeated ids in a row: {row.tolist()}"
    return probs, ids


@pytest.mark.parametrize(
    "num_rows, vocab, k, temperature, dtype",
    [
        (1, 111, 1, 1.0, torch.float32),
        (3, 111, 4, 0.5, torch.float32),
        (3, 111, 7, 2.0, torch.bfloat16),
        (2, 111, MAX_K, 1.0, torch.float16),
        (3, 5000, 5, 1.0, torch.float16),
        (3, 49152, 5, 1.0, torch.bfloat16),
        (1, 49152, MAX_K, 2.0, torch.float32),
        (1, 151936, 4, 0.5, torch.float32),
        (1, 151936, 7, 1.0, torch.bfloat16),
    ],
)
def test_matches_reference(num_rows, vocab, k, temperature, dtype):
    gen = torch.Generator().manual_seed(vocab * 7 + k)
    logits = (4 * torch.randn(num_rows, vocab, generator=gen)).to(dtype)
    _check(logits, k, temperature)


def test_several_tiles_per_chunk_in_adverse_order():
    # Ascending logits make every tile displace the whole running top-k of its chunk.
    vocab = 151936
    _, tiles_per_chunk, num_chunks = _chunking(1, vocab, 8)
    assert tiles_per_chunk > 1 and num_chunks > 1, "case no longer covers the chunked path"
    logits = torch.linspace(-5.0, 5.0, vocab)[None, :]
    _, ids = _check(logits, 5, 1.0)
    assert ids[0].tolist() == list(range(vocab - 1, vocab - 6, -1))


def test_many_rows_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 2 * 300, generator=gen)
    logits = wide[:, ::2]  # stride 2 along the vocab
    _check(logits, 6, 1.0)


def test_masked_vocab_with_fewer_finite_entries_than_k():
    logits = torch.full((2, 300), float("-inf"))
    logits[0, [17, 250, 3]] = torch.tensor([1.0, 2.5, -0.5])
    logits[1, 150:] = torch.randn(150, generator=torch.Generator().manual_seed(1))
    probs, ids = _check(logits, 5, 1.0)
    assert ids[0, :3].tolist() == [250, 17, 3]
    assert (probs[0, 3:] == 0).all()
    assert (ids[1] >= 150).all()


def test_huge_dynamic_range():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3000, generator=gen) * 1e4  # exp overflows without the max shift
    logits[1, :] = -3e4
    logits[1, [10, 2000, 2999]] = torch.tensor([80.0, 79.0, 60.0])
    probs, ids = _check(logits, 4, 1.0)
    assert ids[1, :3].tolist() == [10, 2000, 2999]


def test_equal_logits_prefer_smaller_id():
    logits = torch.zeros(1, 2100)
    logits[0, [5, 1500, 2099]] = 3.0
    probs, ids = _check(logits, 3, 1.0)
    assert ids[0].tolist() == [5, 1500, 2099]


def test_allocates_outputs_and_reference_backend_agrees():
    logits = torch.randn(3, 777, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    probs, ids = cape_topk(logits, 3, temperature=0.7)
    ref_probs, ref_ids = cape_topk(logits, 3, temperature=0.7, backend="reference")
    assert probs.shape == (3, 3) and ids.shape == (3, 3)
    assert probs.device == logits.device and ids.device == logits.device
    assert_close(probs, ref_probs, dtype=F32, name="probs")
    assert torch.equal(ids, ref_ids)


def test_auto_backend_runs_the_kernel(monkeypatch):
    # On DEVICE ("cuda", or "cpu" under TRITON_INTERPRET=1) the default backend must launch the
    # kernel: with the reference made to raise, a silent fallback fails here.
    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    logits = torch.randn(2, 333, generator=torch.Generator().manual_seed(5))
    want, _ = cape_topk_ref(logits.double(), 4, 0.8)
    monkeypatch.setattr(topk_mod, "cape_topk_ref", no_ref)
    for backend in ("auto", "triton"):
        probs, ids = cape_topk(logits.to(DEVICE), 4, temperature=0.8, backend=backend)
        assert_close(probs, want, dtype=F32, name=f"probs ({backend})")
        assert ids.device.type == DEVICE


def test_zero_rows():
    probs, ids = cape_topk(torch.zeros(0, 50, device=DEVICE), 2)
    assert probs.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=[[1.0, 2.0]]), TypeError, "logits"),
        (dict(logits=torch.zeros(10)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 3, 10)), ValueError, "logits"),
        (dict(logits=torch.zeros(2, 10, dtype=torch.int64)), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 0)), ValueError, "logits"),
        (dict(k=0), ValueError, "k must"),
        (dict(k=MAX_K + 1), ValueError, "k must"),
        (dict(logits=torch.zeros(2, 3), k=4), ValueError, "k must"),
        (dict(k=2.0), TypeError, "k must"),
        (dict(k=True), TypeError, "k must"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(out=torch.zeros(2, 2)), TypeError, "out"),
        (dict(out=(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.int64))), ValueError, r"out\[0\]"),
        (dict(out=(torch.zeros(2, 2), torch.zeros(2, 2))), TypeError, r"out\[1\]"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    args = dict(logits=torch.zeros(2, 10), k=2, temperature=1.0)
    args.update(kwargs)
    args = {name: _to_device(value) for name, value in args.items()}
    with pytest.raises(error, match=match):
        cape_topk(**args)
