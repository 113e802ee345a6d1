"""Tree and cross attention kernels against the float64 reference.

Runs the Triton kernels under ``TRITON_INTERPRET=1`` on the CPU (set by ``conftest.py``), or
compiled on a GPU. Interpreted shapes are kept small; the GPU-only cases are marked.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glide.kernels.attention as attn_mod
from glide.kernels import cross_attention, tree_attention
from glide.kernels.attention import attention_config
from glide.kernels.reference import cross_attention_ref, tree_attention_ref
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- trees


def mask_from_parents(parents):
    """(T,) parent slots (``-1`` for the root, else ``< i``) -> (T, T) ancestor-or-self mask."""
    T = len(parents)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            if not 0 <= p < i:
                raise ValueError(f"parent of node {i} must come before it, got {p}")
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def chain(T, gen=None):
    return [-1] + list(range(T - 1))


def star(T, gen=None):
    return [-1] + [0] * (T - 1)


def spine_with_leaves(T, gen=None):
    """CaPE-like: a spine of the top-1 path; each spine node also gets one side leaf."""
    parents, spine = [-1], 0
    while len(parents) < T:
        parents.append(spine)  # next spine node
        new_spine = len(parents) - 1
        if len(parents) < T:
            parents.append(spine)  # side leaf of the old spine node
        spine = new_spine
    return parents


def random_parents(T, gen):
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)]


TREES = {"chain": chain, "star": star, "spine": spine_with_leaves, "random": random_parents}


def batch_tree_mask(kind, B, T, gen):
    return torch.stack([mask_from_parents(TREES[kind](T, gen)) for _ in range(B)])


# ----------------------------------------------------------------------------- inputs


def make_inputs(B, T, Hq, Hkv, D, max_seq, dtype, gen, device=DEVICE):
    """q as a head-major view (non-contiguous) and K/V as views ``kv[1, 0]``, ``kv[1, 1]`` of a
    (layers, 2, B, Hkv, S, D) cache, as the runner passes them (non-contiguous in batch)."""
    q = torch.randn(B, Hq, T, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    kv = torch.randn(2, 2, B, Hkv, max_seq, D, generator=gen).to(device=device, dtype=dtype)
    return q, kv[1, 0], kv[1, 1]


def nan_out(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def f64(*ts):
    return [t.to(torch.float64) for t in ts]


def check_tree(B, T, Hq, Hkv, D, lens, tree, dtype, num_splits, seed=0, sm_scale=None):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    max_seq = int(lens.max()) + T + 3
    q, k, v = make_inputs(B, T, Hq, Hkv, D, max_seq, dtype, gen)
    mask = batch_tree_mask(tree, B, T, gen).to(DEVICE)
    out = nan_out(q)
    got = tree_attention(
        q, k, v, lens, mask, sm_scale, out=out, num_splits=num_splits, backend="triton"
    )
    assert got is out
    want = tree_attention_ref(*f64(q, k, v), lens, mask, sm_scale)
    assert_close(got, want, dtype=dtype, name="tree_attention")


# ----------------------------------------------------------------------------- tree_attention

TREE_CASES = [
    # B, T, Hq, Hkv, D, prefix lens, tree, dtype, num_splits
    (1, 1, 4, 4, 64, [0], "chain", torch.float32, None),  # decode, empty prefix
    (1, 1, 8, 1, 64, [1], "chain", torch.bfloat16, None),  # decode, MQA group 8
    (3, 7, 6, 2, 80, [0, 1, 150], "random", torch.float32, None),  # group 3, head_dim 80
    (3, 7, 6, 2, 80, [0, 1, 150], "random", torch.float32, 3),  # same, merged by LSE
    (2, 13, 3, 1, 64, [70, 129], "star", torch.float16, 2),
    (2, 10, 4, 4, 80, [5, 0], "spine", torch.bfloat16, 4),  # more splits than some sequences' tiles
    (1, 64, 8, 1, 64, [37], "spine", torch.bfloat16, None),  # T=64, 8 query-row tiles
    (1, 64, 2, 2, 64, [0], "random", torch.float32, 2),  # splits that fall inside the tree
    (1, 40, 2, 2, 64, [0], "chain", torch.float16, None),  # prefill: causal, no prefix
    (3, 5, 16, 2, 64, [200, 3, 64], "spine", torch.bfloat16, 5),  # group 8, many splits
    (3, 11, 24, 3, 80, [65, 0, 128], "random", torch.float16, None),  # group 8, head_dim 80
    (2, 3, 2, 1, 128, [129, 2], "chain", torch.float32, 2),  # head_dim 128
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,lens,tree,dtype,num_splits", TREE_CASES)
def test_tree_attention_matches_reference(B, T, Hq, Hkv, D, lens, tree, dtype, num_splits):
    check_tree(B, T, Hq, Hkv, D, lens, tree, dtype, num_splits)


def test_tree_attention_custom_scale_and_default_splits_agree():
    check_tree(2, 6, 4, 2, 64, [90, 11], "random", torch.float32, None, seed=3, sm_scale=0.3)
    check_tree(2, 6, 4, 2, 64, [90, 11], "random", torch.float32, 2, seed=3, sm_scale=0.3)


def test_tree_attention_heuristic_splits():
    """A long prefix at batch 1 makes the heuristic itself split the keys (not forced)."""
    B, T, Hq, Hkv, D, P = 1, 1, 4, 1, 16, 600
    assert attention_config(B, T, Hq, Hkv, D, P + T).num_splits > 1
    check_tree(B, T, Hq, Hkv, D, [P], "chain", torch.float32, None, seed=4)
    check_tree(B, T, Hq, Hkv, D, [P], "chain", torch.bfloat16, None, seed=4)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tree_attention_arbitrary_mask_and_rows_without_keys(num_splits):
    """Any bool mask works (not only trees); a row that sees nothing gives zeros."""
    gen = torch.Generator().manual_seed(9)
    B, T, Hq, Hkv, D = 2, 6, 4, 2, 32
    lens = torch.tensor([0, 70], device=DEVICE)
    q, k, v = make_inputs(B, T, Hq, Hkv, D, 80, torch.float32, gen)
    mask = torch.rand(B, T, T, generator=gen) < 0.4
    mask[0, 2] = False  # node 2 of sequence 0: no prefix, no tree key
    mask = mask.to(DEVICE)
    out = nan_out(q)
    tree_attention(q, k, v, lens, mask, out=out, num_splits=num_splits, backend="triton")
    assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask))
    assert torch.count_nonzero(out[0, 2]) == 0


def test_check_lens_false_skips_the_host_read_and_agrees():
    gen = torch.Generator().manual_seed(8)
    B, T, Hq, Hkv, D = 2, 4, 4, 2, 32
    lens = torch.tensor([150, 9], device=DEVICE)
    q, k, v = make_inputs(B, T, Hq, Hkv, D, 160, torch.float32, gen)
    mask = batch_tree_mask("random", B, T, gen).to(DEVICE)
    out = nan_out(q)
    tree_attention(q, k, v, lens, mask, out=out, check_lens=False, backend="triton")
    assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask))
    out = nan_out(q)
    cross_attention(q, k, v, lens, out=out, check_lens=False, backend="triton")
    assert_close(out, cross_attention_ref(*f64(q, k, v), lens))


def test_tree_attention_broadcast_mask_and_strided_out():
    """A tree mask expanded over the batch (stride 0) and an ``out`` view with odd strides."""
    gen = torch.Generator().manual_seed(6)
    B, T, Hq, Hkv, D = 3, 7, 4, 2, 32
    lens = torch.tensor([3, 0, 66], dtype=torch.int64, device=DEVICE)
    q, k, v = make_inputs(B, T, Hq, Hkv, D, 80, torch.float16, gen)
    mask = mask_from_parents(spine_with_leaves(T)).to(DEVICE).expand(B, T, T)
    out = torch.full((B, Hq, T, D), float("nan"), dtype=q.dtype, device=DEVICE).transpose(1, 2)
    tree_attention(q, k, v, lens, mask, out=out, num_splits=2, backend="triton")
    assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask))


def test_tree_attention_masked_nodes_ignore_hidden_keys():
    """Changing a key/value that a node must not see leaves that node's output unchanged."""
    gen = torch.Generator().manual_seed(7)
    B, T, Hq, Hkv, D, P = 1, 5, 2, 1, 64, 9
    q, k, v = make_inputs(B, T, Hq, Hkv, D, P + T, torch.float32, gen)
    lens = torch.tensor([P], device=DEVICE)
    mask = batch_tree_mask("star", B, T, gen).to(DEVICE)  # leaves 1..4 see only root and self
    before = tree_attention(q, k, v, lens, mask, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, P + 2] += 5.0  # node 2: seen only by node 2
    v2[:, :, P + 2] -= 5.0
    after = tree_attention(q, k2, v2, lens, mask, backend="triton")
    untouched = [0, 1, 3, 4]
    torch.testing.assert_close(after[:, untouched], before[:, untouched], rtol=0, atol=0)
    assert (after[:, 2] - before[:, 2]).abs().max() > 1e-3


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 9),
    Hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    D=st.sampled_from([16, 24]),
    prefix=st.lists(st.integers(0, 70), min_size=2, max_size=2),
    num_splits=st.sampled_from([None, 1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_tree_attention_fuzz(B, T, Hkv, group, D, prefix, num_splits, seed):
    check_tree(B, T, Hkv * group, Hkv, D, prefix[:B], "random", torch.float32, num_splits, seed)


def test_autotune_flag_is_ignored_off_cuda():
    q, k, v, lens, mask = _small()
    got = tree_attention(q, k, v, lens, mask, autotune=True)
    assert_close(got, tree_attention_ref(*f64(q, k, v), lens, mask))


def test_tree_attention_empty_tree():
    q, k, v = make_inputs(2, 0, 2, 1, 16, 4, torch.float32, torch.Generator().manual_seed(0))
    lens = torch.zeros(2, dtype=torch.int64, device=q.device)
    mask = torch.zeros(2, 0, 0, dtype=torch.bool, device=q.device)
    out = tree_attention(q, k, v, lens, mask)
    assert out.shape == (2, 0, 2, 16)


# ----------------------------------------------------------------------------- cross_attention

CROSS_CASES = [
    # B, Tq, Hq, Hkv, D, kv lens, dtype, num_splits
    (1, 1, 4, 4, 64, [1], torch.float32, None),
    (3, 5, 6, 2, 80, [0, 77, 150], torch.float32, None),  # a sequence with no keys: zeros
    (3, 5, 6, 2, 80, [0, 77, 150], torch.float32, 4),
    (2, 9, 8, 1, 64, [130, 64], torch.bfloat16, 3),
    (2, 4, 3, 3, 64, [33, 0], torch.float16, None),
]


@pytest.mark.parametrize("B,Tq,Hq,Hkv,D,lens,dtype,num_splits", CROSS_CASES)
def test_cross_attention_matches_reference(B, Tq, Hq, Hkv, D, lens, dtype, num_splits):
    gen = torch.Generator().manual_seed(1)
    kv_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    q, k, v = make_inputs(B, Tq, Hq, Hkv, D, max(lens) + 5, dtype, gen)
    out = nan_out(q)
    got = cross_attention(q, k, v, kv_lens, out=out, num_splits=num_splits, backend="triton")
    want = cross_attention_ref(*f64(q, k, v), kv_lens)
    assert_close(got, want, dtype=dtype, name="cross_attention")
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.count_nonzero(got[b]) == 0


def test_cross_attention_equals_tree_attention_with_empty_tree_rows():
    """Cross attention over [0, L) is tree attention with prefix L when each node sees itself
    only and its own key is pushed far out of reach (a check of the shared kernel's flags)."""
    gen = torch.Generator().manual_seed(5)
    B, T, Hq, Hkv, D, L = 2, 3, 4, 2, 64, 50
    q, k, v = make_inputs(B, T, Hq, Hkv, D, L + T, torch.float32, gen)
    lens = torch.full((B,), L, device=DEVICE)
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=DEVICE)
    cross = cross_attention(q, k, v, lens, backend="triton")
    tree = tree_attention(q, k, v, lens, mask, backend="triton")
    assert_close(cross, tree.to(torch.float64), dtype=torch.float32)


# ----------------------------------------------------------------------------- dispatch


def _small(dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_inputs(2, 3, 4, 2, 16, 12, dtype, gen, device="cpu")
    lens = torch.tensor([4, 7])
    mask = batch_tree_mask("random", 2, 3, gen)
    return q, k, v, lens, mask


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter path")
def test_dispatch_triton_on_cpu_runs_the_kernel(monkeypatch):
    q, k, v, lens, mask = _small()
    want = tree_attention_ref(*f64(q, k, v), lens, mask)

    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(attn_mod, "tree_attention_ref", no_ref)
    monkeypatch.setattr(attn_mod, "cross_attention_ref", no_ref)
    for backend in ("triton", "auto"):
        assert_close(tree_attention(q, k, v, lens, mask, backend=backend), want)
        cross_attention(q, k, v, lens, backend=backend)


def test_dispatch_reference_backend(monkeypatch):
    q, k, v, lens, mask = _small()

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel ran instead of the reference")

    monkeypatch.setattr(attn_mod, "_launch", no_kernel)
    got = tree_attention(q, k, v, lens, mask, backend="reference")
    torch.testing.assert_close(got, tree_attention_ref(q, k, v, lens, mask), rtol=0, atol=0)
    got = cross_attention(q, k, v, lens, backend="reference")
    torch.testing.assert_close(got, cross_attention_ref(q, k, v, lens), rtol=0, atol=0)
    # float64 is fine for the reference, even though the Triton path rejects it.
    q, k, v = f64(q, k, v)
    out = nan_out(q)
    tree_attention(q, k, v, lens, mask, out=out, backend="reference")
    torch.testing.assert_close(out, tree_attention_ref(q, k, v, lens, mask), rtol=0, atol=0)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("B,T,Hq,Hkv,D,keys", [
    (1, 1, 32, 8, 128, 4096), (1, 16, 32, 8, 128, 4096), (1, 64, 32, 32, 128, 8192),
    (8, 64, 32, 8, 128, 2048), (1, 1, 32, 8, 64, 100), (4, 300, 32, 8, 80, 300),
])
def test_attention_config_heuristic(B, T, Hq, Hkv, D, keys):
    cfg = attention_config(B, T, Hq, Hkv, D, keys)
    rows = T * (Hq // Hkv)
    assert cfg.block_m >= 16 and cfg.block_m >= min(rows, 64)
    assert cfg.block_d >= D and cfg.block_d & (cfg.block_d - 1) == 0
    base = B * Hkv  # the M tiles do not count: the key chunk must not depend on T
    n_tiles = math.ceil(keys / cfg.block_n)
    if base >= 132:
        assert cfg.num_splits == 1
    else:
        # Fills the 132 SMs unless the splits would get shorter than two key tiles.
        assert base * cfg.num_splits >= 132 or cfg.num_splits == max(1, n_tiles // 2)
        assert cfg.num_splits == 1 or n_tiles // cfg.num_splits >= 2
    assert attention_config(B, T, Hq, Hkv, D, keys, num_splits=3).num_splits == 3
    fields = {"block_m", "block_n", "block_d", "num_splits", "num_warps", "num_stages"}
    assert set(cfg.as_dict()) == fields


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_config_splits_do_not_drop_past_one_m_tile(dtype):
    """Llama-8B heads (32 q, 8 kv, head_dim 128), 32k keys: at q_len 17 the 68 query rows of
    a KV head need a second M tile, which must not halve the KV splits (the H100 cliff of
    commit ef05f09: 84 us at T=16, 228 us at T=17)."""
    at16 = attention_config(1, 16, 32, 8, 128, 32768, dtype=dtype)
    at17 = attention_config(1, 17, 32, 8, 128, 32768, dtype=dtype)
    assert at17.num_splits == at16.num_splits > 1
    assert attention_config(1, 64, 32, 8, 128, 32768, dtype=dtype).num_splits == at16.num_splits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tree_attention_with_128_row_tiles(dtype):
    """max_block_m=128: the 96 query rows of a T=24, group-4 tree (and 2 sequences with ragged
    prefixes, several splits) in one M tile give the reference's result."""
    cfg = attention_config(2, 24, 8, 2, 64, 300, dtype=dtype, max_block_m=128)
    assert cfg.block_m == 128 and cfg.num_warps == 8 and cfg.num_stages == 2
    assert attention_config(2, 24, 8, 2, 64, 300, dtype=dtype).block_m == 64
    gen = torch.Generator().manual_seed(21)
    lens = torch.tensor([250, 7], dtype=torch.int32, device=DEVICE)
    q, k, v = make_inputs(2, 24, 8, 2, 64, 300, dtype, gen)
    mask = batch_tree_mask("random", 2, 24, gen).to(DEVICE)
    for splits in (None, 3):
        out = nan_out(q)
        tree_attention(q, k, v, lens, mask, out=out, num_splits=splits, backend="triton", max_block_m=128)
        assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask), dtype=dtype, name="tree_attention")


def test_default_block_m_follows_the_measured_rule():
    """By default (``max_block_m=None``), 16-bit launches past 64 query rows per KV head take
    128-row tiles at a 128 head-dim block (80 pads to it), 64-row tiles at head_dim 64; up to
    64 rows nothing changes; float32 keeps its own cap."""
    for dtype in (torch.bfloat16, torch.float16):
        for T, group, D, want in [(17, 4, 128, 128), (64, 2, 128, 128), (16, 4, 128, 64),
                                  (24, 4, 80, 128), (24, 3, 64, 64), (64, 8, 128, 128),
                                  (8, 4, 128, 32)]:
            cfg = attention_config(1, T, 8 * group, 8, D, 32768, dtype=dtype)
            assert cfg.block_m == want, (dtype, T, group, D, cfg)
            # an explicit cap still wins
            assert attention_config(1, T, 8 * group, 8, D, 32768, dtype=dtype,
                                    max_block_m=64).block_m == min(want, 64)
    assert attention_config(1, 64, 32, 8, 128, 32768, dtype=torch.float32).block_m == 16


def test_128_row_tiles_only_where_the_device_holds_them(monkeypatch):
    """The 128-row tile needs 104 KiB of shared memory a block: a CUDA device with less (sm_86,
    sm_89: 99 KiB) keeps 64-row tiles by default; an explicit max_block_m is left alone.
    The device's properties are faked (no GPU here)."""
    from glide.kernels import attention as attn

    monkeypatch.setattr(attn, "_cuda_num_sms", lambda index: 132)
    dev = torch.device("cuda", 0)
    for fits, want in ((True, 128), (False, 64)):
        monkeypatch.setattr(attn, "_cuda_fits_big_tiles", lambda index, fits=fits: fits)
        assert attention_config(1, 17, 32, 8, 128, 32768, device=dev).block_m == want
        assert attention_config(1, 17, 32, 8, 128, 32768, device=dev, max_block_m=128).block_m == 128
    assert attn._device_facts(torch.device("cpu")) == (attn._DEFAULT_NUM_SMS, True)  # the CPU: the rule itself


def test_max_block_m_is_checked():
    q, k, v, lens, mask = _small()
    for bad in (48, 256, True, "64"):
        with pytest.raises(ValueError, match="max_block_m"):
            tree_attention(q, k, v, lens, mask, max_block_m=bad)
        with pytest.raises(ValueError, match="max_block_m"):
            cross_attention(q, k, v, lens, max_block_m=bad)
    # float32 keeps its own cap (its dots run on FMA units)
    assert attention_config(1, 32, 8, 2, 64, 100, dtype=torch.float32, max_block_m=128).block_m <= 32


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases():
    q, k, v, lens, mask = _small()
    T = q.shape[1]
    return [
        (dict(q=q[0]), ValueError, "q"),
        (dict(k_cache=k.half()), TypeError, "k_cache"),
        (dict(v_cache=v[:, :, :5]), ValueError, "v_cache"),
        (dict(k_cache=k[:1], v_cache=v[:1]), ValueError, "k_cache"),
        (dict(q=torch.randn(2, 3, 3, 16)), ValueError, "num_q_heads"),
        (dict(k_cache=k.to("meta"), v_cache=v.to("meta")), ValueError, "k_cache"),
        (dict(q=q.int(), k_cache=k.int(), v_cache=v.int()), TypeError, "q"),
        (dict(cache_seqlens=lens.float()), TypeError, "cache_seqlens"),
        (dict(cache_seqlens=lens[:1]), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([-1, 2])), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([0, 12 - T + 1])), ValueError, "cache_seqlens"),
        (dict(tree_mask=mask.int()), TypeError, "tree_mask"),
        (dict(tree_mask=mask[:, :2]), ValueError, "tree_mask"),
        (dict(out=torch.empty(2, 3, 4, 8)), ValueError, "out"),
        (dict(num_splits=0), ValueError, "num_splits"),
        (dict(num_splits=2.0), TypeError, "num_splits"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(q=q.double(), k_cache=k.double(), v_cache=v.double(), backend="triton"),
         TypeError, "q"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_tree_attention_rejects_bad_input(case):
    q, k, v, lens, mask = _small()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens, tree_mask=mask)
    change, exc, match = _bad_cases()[case]
    args.update(change)
    if torch.cuda.is_available() and change.get("backend") == "triton":
        pytest.skip("checks a CPU path")
    with pytest.raises(exc, match=match):
        tree_attention(**args)


@pytest.mark.parametrize("change,exc,match", [
    (dict(kv_lens=torch.tensor([3, 13])), ValueError, "kv_lens"),
    (dict(kv_lens=torch.tensor([True, False])), TypeError, "kv_lens"),
    (dict(kv_lens=torch.tensor([[3, 4]])), ValueError, "kv_lens"),
    (dict(v_cache=torch.randn(2, 2, 12, 16).half()), TypeError, "v_cache"),
])
def test_cross_attention_rejects_bad_input(change, exc, match):
    q, k, v, lens, _ = _small()
    args = dict(q=q, k_cache=k, v_cache=v, kv_lens=lens)
    args.update(change)
    with pytest.raises(exc, match=match):
        cross_attention(**args)


# ----------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,P", [
    (1, 64, 32, 8, 128, 4000), (4, 31, 32, 8, 128, 1500), (2, 300, 16, 4, 64, 0),
    (1, 1, 32, 8, 128, 8191),
])
def test_tree_attention_large_on_gpu(B, T, Hq, Hkv, D, P, dtype):
    gen = torch.Generator().manual_seed(11)
    lens = torch.randint(max(P - 100, 0), P + 1, (B,), generator=gen).to("cuda")
    lens[0] = P
    q, k, v = make_inputs(B, T, Hq, Hkv, D, P + T, dtype, gen, device="cuda")
    mask = batch_tree_mask("random", B, T, gen).to("cuda")
    out = nan_out(q)
    tree_attention(q, k, v, lens, mask, out=out)  # heuristic splits
    assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask), dtype=dtype)
    cross = cross_attention(q, k, v, lens)
    assert_close(cross, cross_attention_ref(*f64(q, k, v), lens), dtype=dtype)


@needs_cuda
@pytest.mark.gpu
def test_tree_attention_autotuned_on_gpu():
    gen = torch.Generator().manual_seed(12)
    B, T, Hq, Hkv, D, P = 2, 16, 32, 8, 128, 1000
    lens = torch.tensor([P, 37], device="cuda")
    q, k, v = make_inputs(B, T, Hq, Hkv, D, P + T, torch.float16, gen, device="cuda")
    mask = batch_tree_mask("spine", B, T, gen).to("cuda")
    out = nan_out(q)
    tree_attention(q, k, v, lens, mask, out=out, autotune=True)
    assert_close(out, tree_attention_ref(*f64(q, k, v), lens, mask), dtype=torch.float16)
    assert set(attn_mod.autotuned_config()) == {"BLOCK_N", "num_warps", "num_stages"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_the_additive_visibility_mask_gives_the_bool_masks_result(dtype):
    """The runner's CPU path passes the tree's visibility as an additive mask: the same output,
    bit for bit, as the bool mask; a row that sees nothing keeps the bool mask (zeros)."""
    from glide.kernels.reference import _compute_dtype, masked_attention, tree_visibility, visibility_bias

    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D = 2, 7, 6, 2, 16
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, 40, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, 40, D, generator=g).to(dtype)
    tm = (torch.rand(B, T, T, generator=g) > 0.5) | torch.eye(T, dtype=torch.bool)
    allowed = tree_visibility(torch.tensor([9, 0]), tm)  # row 1 has no prefix: the tree alone
    bias = visibility_bias(allowed, _compute_dtype(dtype))
    assert bias.dtype == _compute_dtype(dtype) and torch.equal(bias == 0, allowed)
    assert torch.equal(masked_attention(q, k, v, bias, 0.25), masked_attention(q, k, v, allowed, 0.25))
    blind = allowed.clone()
    blind[1, 3] = False  # a node that sees nothing
    assert visibility_bias(blind, _compute_dtype(dtype)) is None
    with pytest.raises(ValueError, match="allowed"):
        masked_attention(q, k, v, bias.half(), 0.25)
