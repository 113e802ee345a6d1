"""bench.launch_overhead runs on a tiny setting and writes positive per-call times; the
launchers' host integer helpers agree with Triton's."""

import json

import pytest
import triton

import glide.kernels.attention as attn_mod
from bench import launch_overhead
from glide.kernels import _host


def test_launch_overhead_writes_positive_rows(tmp_path, capsys):
    before = attn_mod.attention_fwd_kernel
    out = tmp_path / "lo.json"
    launch_overhead.main(["--out", str(out), "--T", "1,17", "--calls", "3", "--samples", "3",
                          "--warmup", "1"])
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["kernel"] for r in rows} == set(launch_overhead.KERNELS)
    assert {r["path"] for r in rows} == {"launcher", "op"}
    assert len(rows) == len(launch_overhead.KERNELS) * 2 * 2  # kernels x paths x T
    for r in rows:
        for key in ("us_median", "us_p20", "us_p80"):
            assert isinstance(r[key], float) and r[key] > 0, (r["kernel"], r["path"], key)
    assert data["meta"]["git_sha"] and data["meta"]["heads"]["num_q_heads"] == 9
    assert "tree_attention" in capsys.readouterr().out  # the table
    assert attn_mod.attention_fwd_kernel is before  # the real kernels are put back


@pytest.mark.parametrize("n", list(range(0, 70)) + [1000, 1024, 1025, 49152])
def test_host_helpers_match_triton(n):
    assert _host.next_power_of_2(n) == triton.next_power_of_2(n)
    for d in (1, 3, 64, 128):
        assert _host.cdiv(n, d) == triton.cdiv(n, d)
