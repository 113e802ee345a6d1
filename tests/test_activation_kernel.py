"""silu_mul (Triton: compiled on CUDA, TRITON_INTERPRET=1 on CPU) against the float64 reference,
the reference against the model's SwiGLU, and the launcher's checks."""

import pytest
import torch
import torch.nn.functional as F

import glide.kernels.activation as act_mod
from glide.kernels import silu_mul
from glide.kernels.reference import silu_mul_ref
from tolerances import ROUNDING_DTYPES, assert_close, assert_rounds_like

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_gate_up(rows, inter, dtype, seed=0):
    """A column slice of a wider buffer (not contiguous), values up to about +-12 so that both
    tails of silu are reached."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, 2 * inter + 3, generator=gen) * 3
    return wide[:, 1:1 + 2 * inter].to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, inter", [(1, 56), (5, 1536), (3, 1100), (2, 7)])
def test_matches_float64_reference(dtype, rows, inter):
    gu = make_gate_up(rows, inter, dtype, seed=rows + inter)
    before = gu.clone()
    want = silu_mul_ref(gu.double())
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_mul(gu, out=out, backend="triton")
    assert got is out
    assert torch.equal(gu, before)
    assert_close(got, want, dtype, name="silu(gate) * up")


def test_allocates_a_contiguous_output_and_takes_strided_out():
    gu = make_gate_up(4, 40, torch.float32, seed=3)
    want = silu_mul_ref(gu.double())
    got = silu_mul(gu, backend="triton")
    assert got.is_contiguous()
    assert_close(got, want, name="allocated")
    out = torch.full((40, 4), float("nan"), device=DEVICE).t()
    assert silu_mul(gu, out=out, backend="triton") is out
    assert_close(out, want, name="strided out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_models_swiglu(dtype):
    gu = make_gate_up(3, 24, dtype).cpu()
    gate, up = gu[:, :24], gu[:, 24:]
    assert torch.equal(silu_mul_ref(gu), F.silu(gate) * up)
    assert_close(silu_mul_ref(gu), gate.double() * torch.sigmoid(gate.double()) * up.double(), dtype)


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES)
def test_rounds_where_the_model_rounds(dtype):
    """Against F.silu(gate) * up in the same half dtype: silu rounded before the product."""
    gu = make_gate_up(64, 1536, dtype, seed=5)
    assert_rounds_like(silu_mul(gu, backend="triton"), silu_mul_ref(gu), name="silu(gate) * up")


def test_auto_backend_runs_the_kernel(monkeypatch):
    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    gu = make_gate_up(2, 16, torch.float32)
    want = silu_mul_ref(gu)
    monkeypatch.setattr(act_mod, "silu_mul_ref", no_ref)
    assert_close(silu_mul(gu), want)


def test_reference_backend_writes_out():
    gu = make_gate_up(2, 16, torch.float32)
    out = torch.full((2, 16), float("nan"), device=DEVICE)
    assert silu_mul(gu, out=out, backend="reference") is out
    assert torch.equal(out, silu_mul_ref(gu))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(gate_up=[0.0]), TypeError, "gate_up"),
        (dict(gate_up=torch.zeros(2, 3, 4)), ValueError, "gate_up"),
        (dict(gate_up=torch.zeros(2, 7)), ValueError, "gate_up"),
        (dict(gate_up=torch.zeros(2, 0)), ValueError, "gate_up"),
        (dict(gate_up=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "gate_up"),
        (dict(gate_up=torch.zeros(2, 8), out=[0.0]), TypeError, "out"),
        (dict(gate_up=torch.zeros(2, 8), out=torch.zeros(2, 8)), ValueError, "out"),
        (dict(gate_up=torch.zeros(2, 8), out=torch.zeros(2, 4, dtype=torch.bfloat16)), TypeError, "out"),
        (dict(gate_up=torch.zeros(2, 8), out=torch.zeros(2, 4, device="meta")), ValueError, "out"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
              for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        silu_mul(**kwargs)
