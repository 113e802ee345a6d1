"""One tolerance table for every kernel test, keyed by input dtype.

Kernels accumulate in float32, so float32 and float64 inputs are held to float32 round-off;
half types are held to about two units of their last place on O(1) outputs.
"""

import pytest
import torch

from glide.kernels import interpreter_enabled

TOL = {
    torch.float64: dict(atol=1e-5, rtol=1e-5),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def assert_close(actual, expected, dtype=None, name="output"):
    """``torch.testing.assert_close`` with the table's tolerance, reporting where it fails.

    On failure, names the worst indices, their values and the count of mismatches.
    """
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    bad = ~(err <= tol["atol"] + tol["rtol"] * e.abs())  # NaN counts as bad
    if bad.any():
        _fail(name, a, e, bad, f"(max abs err {err.nan_to_num(float('inf')).max().item():.3g}, tol {tol})")


def _fail(name, a, e, bad, why):
    """Raise naming how many elements of ``bad`` differ, ``why``, and the first few of them."""
    idx = bad.nonzero()[:8].tolist()
    rows = [f"  {tuple(i)}: got {a[tuple(i)].item():.6g}, want {e[tuple(i)].item():.6g}" for i in idx]
    raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ {why}:\n"
                         + "\n".join(rows))


def assert_rounds_like(actual, expected, name="output", max_mismatch=1e-3):
    """``actual`` equals ``expected`` (same dtype) bit for bit but for a fraction ``max_mismatch``
    of elements, and those differ by at most one unit in the last place.

    For a kernel that must round where a torch reference rounds (same dtype, both computed in
    float32 between roundings): a float32 intermediate that lands within round-off of a
    rounding boundary may still round the other way, so a few elements may differ by one ulp.
    """
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise AssertionError(f"{name}: {actual.dtype} {tuple(actual.shape)} vs "
                             f"{expected.dtype} {tuple(expected.shape)}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    differ = a != e
    frac = differ.float().mean().item()
    ulp = (torch.nextafter(e, torch.full_like(e, float("inf"))) - e).abs().double()
    err = (a.double() - e.double()).abs()
    worst = (err / ulp)[differ].max().item() if differ.any() else 0.0
    if frac > max_mismatch or worst > 1.0:
        _fail(name, a, e, differ, f"from the reference's rounding ({frac:.2%}, allowed {max_mismatch:.2%}), "
                                  f"worst by {worst:.3g} ulp (allowed 1)")


# Triton's interpreter casts float32 to bfloat16 by truncation (round toward zero; Triton 3.9,
# interpreter.py's cast_impl), where GPUs and torch round to nearest even: bit-level agreement
# in bfloat16 can only be checked compiled.
ROUNDING_DTYPES = [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        interpreter_enabled(), reason="the interpreter truncates float32 -> bfloat16 casts")),
]
