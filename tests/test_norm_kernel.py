"""add_rms_norm (Triton: compiled on CUDA, TRITON_INTERPRET=1 on CPU) against the float64
reference, the reference against the model's RMSNorm, and the launcher's checks."""

import pytest
import torch

import glide.kernels.norm as norm_mod
from glide.kernels import add_rms_norm
from glide.kernels.reference import add_rms_norm_ref
from tolerances import ROUNDING_DTYPES, assert_close, assert_rounds_like

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


def make_case(rows, hidden, dtype, with_delta, seed=0):
    """x a column slice of a wider buffer, delta a transposed view: neither contiguous. Weights
    around 1, as trained norms are; rows with different scales so that the norm matters."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=gen) * 4 + 0.1
    x = (torch.randn(rows, hidden + 5, generator=gen) * scale)[:, 2:2 + hidden].to(DEVICE, dtype)
    delta = None
    if with_delta:
        delta = torch.randn(hidden, rows, generator=gen).t().to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    return x, delta, weight


def poisoned(rows, hidden, dtype):
    return torch.full((rows, hidden), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, hidden", [(1, 48), (5, 576), (3, 100), (2, 2048)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_matches_float64_reference(dtype, rows, hidden, with_delta):
    x, delta, weight = make_case(rows, hidden, dtype, with_delta, seed=rows + hidden)
    x_before = x.clone()
    h64, y64 = add_rms_norm_ref(x.double(), None if delta is None else delta.double(), weight.double(), EPS)
    out = (poisoned(rows, hidden, dtype), poisoned(rows, hidden, dtype))
    h, y = add_rms_norm(x, delta, weight, EPS, out=out, backend="triton")
    assert y is out[1]
    assert torch.equal(x, x_before)
    if with_delta:
        assert h is out[0]
        assert_close(h, h64, dtype, name="h = x + delta")
    else:
        assert h is x
    assert_close(y, y64, dtype, name="y = rms_norm(h)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allocates_outputs(dtype):
    x, delta, weight = make_case(4, 64, dtype, True, seed=7)
    h_ref, y_ref = add_rms_norm_ref(x.double(), delta.double(), weight.double(), EPS)
    h, y = add_rms_norm(x, delta, weight, EPS, backend="triton")
    assert h.is_contiguous() and y.is_contiguous()
    assert_close(h, h_ref, dtype, name="h")
    assert_close(y, y_ref, dtype, name="y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_the_models_rmsnorm(dtype):
    """add_rms_norm_ref is the model's residual add followed by its RMSNorm, and for half
    dtypes that is transformers' LlamaRMSNorm (float32 normalisation, rounded, then the weight
    in the dtype), bit for bit."""
    from glide.model.llama import RMSNorm

    x, delta, weight = make_case(3, 40, dtype, True, seed=11)
    x, delta, weight = x.cpu(), delta.cpu(), weight.cpu()
    norm = RMSNorm(40, EPS, dtype=dtype)
    norm.weight.data.copy_(weight)
    h, y = add_rms_norm_ref(x, delta, weight, EPS)
    assert torch.equal(h, x + delta)
    assert torch.equal(y, norm(x + delta))
    hf = (x + delta).float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    want = weight * hf.to(dtype) if dtype != torch.float32 else weight * hf
    assert_close(y, want, dtype, name="transformers' formula")


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES)
def test_rounds_where_the_model_rounds(dtype):
    """Against the reference in the same half dtype (the model's own RMSNorm): h rounded once,
    the normalised row rounded before the weight multiplies it."""
    x, delta, weight = make_case(64, 576, dtype, True, seed=13)
    h, y = add_rms_norm(x, delta, weight, EPS, backend="triton")
    h_ref, y_ref = add_rms_norm_ref(x, delta, weight, EPS)
    assert torch.equal(h, h_ref)
    assert_rounds_like(y, y_ref, name="y")


def test_auto_backend_runs_the_kernel(monkeypatch):
    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    x, delta, weight = make_case(2, 32, torch.float32, True)
    want = add_rms_norm_ref(x, delta, weight, EPS)
    monkeypatch.setattr(norm_mod, "add_rms_norm_ref", no_ref)
    got = add_rms_norm(x, delta, weight, EPS)
    assert_close(got[0], want[0], name="h")
    assert_close(got[1], want[1], name="y")


@pytest.mark.parametrize("with_delta", [True, False])
def test_reference_backend_writes_out(with_delta):
    x, delta, weight = make_case(2, 32, torch.float32, with_delta)
    want = add_rms_norm_ref(x, delta, weight, EPS)
    out = (poisoned(2, 32, torch.float32), poisoned(2, 32, torch.float32))
    h, y = add_rms_norm(x, delta, weight, EPS, out=out, backend="reference")
    assert y is out[1] and torch.equal(y, want[1])
    assert torch.equal(h, want[0]) and (h is out[0]) == with_delta


def _good_args():
    return dict(x=torch.zeros(3, 8, device=DEVICE), delta=torch.zeros(3, 8, device=DEVICE),
                weight=torch.ones(8, device=DEVICE), eps=EPS)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(x=[0.0]), TypeError, "x"),
        (dict(x=torch.zeros(3, 2, 4)), ValueError, "x"),
        (dict(x=torch.zeros(3, 8, dtype=torch.float64)), TypeError, "x"),
        (dict(x=torch.zeros(3, 0), delta=None, weight=torch.ones(0)), ValueError, "hidden"),
        (dict(delta=torch.zeros(3, 7)), ValueError, "delta"),
        (dict(delta=torch.zeros(3, 8, dtype=torch.bfloat16)), TypeError, "delta"),
        (dict(delta=torch.zeros(3, 8, device="meta")), ValueError, "delta"),
        (dict(weight=torch.ones(3, 8)), ValueError, "weight"),
        (dict(weight=torch.ones(8, dtype=torch.float16)), TypeError, "weight"),
        (dict(eps="1e-5"), TypeError, "eps"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(out=torch.zeros(3, 8)), TypeError, "out"),
        (dict(out=(torch.zeros(3, 8), torch.zeros(3, 9))), ValueError, r"out\[1\]"),
        (dict(out=(torch.zeros(3, 8, dtype=torch.float16), torch.zeros(3, 8))), TypeError, r"out\[0\]"),
        (dict(out=(None, torch.zeros(3, 8))), TypeError, r"out\[0\]"),
    ],
)
def test_rejects_bad_arguments(change, error, match):
    kwargs = _good_args()
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
                   for k, v in change.items()})
    if isinstance(kwargs.get("out"), tuple):
        kwargs["out"] = tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in kwargs["out"])
    with pytest.raises(error, match=match):
        add_rms_norm(**kwargs)
