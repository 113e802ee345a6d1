"""One tolerance table for every kernel test, keyed by input dtype.

Kernels accumulate in float32, so float32 and float64 inputs are held to float32 round-off;
half types are held to about two units of their last place on O(1) outputs.
"""

import torch

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
        idx = bad.nonzero()[:8].tolist()
        rows = [f"  {tuple(i)}: got {a[tuple(i)].item():.6g}, want {e[tuple(i)].item():.6g}" for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
            f"(max abs err {err.nan_to_num(float('inf')).max().item():.3g}, tol {tol}):\n"
            + "\n".join(rows)
        )
