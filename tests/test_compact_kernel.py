"""compact_kv (Triton: compiled on CUDA, TRITON_INTERPRET=1 on CPU) against the reference and
by hand. compact_kv only moves values, so every check is exact."""

import pytest
import torch

import glide.kernels.compact as compact_mod
from glide.kernels import compact_kv
from glide.kernels.reference import compact_kv_ref

# Inputs are drawn on the CPU (same numbers on every machine) and moved to DEVICE.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _t(values, dtype=None):
    """A tensor on DEVICE."""
    return torch.tensor(values, dtype=dtype, device=DEVICE)


def _random_kv(num_caches, batch, heads, max_seq, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_caches, batch, heads, max_seq, head_dim, generator=gen).to(DEVICE, dtype)


def _check(kv, cache_seqlens, path_idx, path_lens, **kwargs):
    """Run the kernel in place and check it against the reference and the defining rule."""
    before = kv.clone()
    expected = compact_kv_ref(kv.clone(), cache_seqlens, path_idx, path_lens)
    out = compact_kv(kv, cache_seqlens, path_idx, path_lens, backend="triton", **kwargs)
    assert out is kv
    assert torch.equal(kv, expected), "differs from compact_kv_ref"

    # The rule itself, slot by slot, and nothing else touched.
    touched = torch.zeros(kv.shape[1], kv.shape[3], dtype=torch.bool, device=kv.device)
    for b in range(kv.shape[1]):
        base = int(cache_seqlens[b])
        for a in range(int(path_lens[b])):
            src = base + int(path_idx[b, a])
            assert torch.equal(kv[:, b, :, base + a], before[:, b, :, src]), f"slot b={b} a={a}"
            touched[b, base + a] = True
    untouched = ~touched[None, :, None, :, None].expand_as(kv)
    assert torch.equal(kv[untouched], before[untouched]), "a slot outside the path changed"
    return kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_scattered_overlapping_paths(dtype):
    # Sequence 0 shifts a chain down by one (every destination is another row's source),
    # sequence 1 picks scattered slots, sequence 2 accepts nothing.
    kv = _random_kv(4, 3, 2, 24, 80, dtype)
    cache_seqlens = _t([5, 0, 9])
    path_idx = _t([[0, 2, 3, 4, 5], [0, 3, 9, 11, 0], [0, 1, 2, 3, 4]])
    path_lens = _t([5, 4, 0])
    _check(kv, cache_seqlens, path_idx, path_lens)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_root_only_batch_one(head_dim):
    kv = _random_kv(2, 1, 3, 10, head_dim, torch.float32, seed=1)
    _check(kv, _t([7]), _t([[0, 2, 1]]), _t([1]))


def test_full_chain_is_a_no_op():
    kv = _random_kv(6, 3, 2, 16, 64, torch.float32, seed=2)
    before = kv.clone()
    path_idx = torch.arange(6, device=DEVICE).expand(3, 6)
    _check(kv, _t([0, 4, 10]), path_idx, _t([6, 6, 6]))
    assert torch.equal(kv, before)


@pytest.mark.parametrize("head_dim", [80, 160])  # 160: two column blocks, the second partial
def test_any_path_order_and_int32_indices(head_dim):
    # Not a tree path (sources before their destinations); still well defined and handled.
    kv = _random_kv(3, 2, 2, 12, head_dim, torch.float32, seed=3)
    cache_seqlens = _t([2, 3], torch.int32)
    path_idx = _t([[3, 1, 0, 2], [6, 0, 4, 5]], torch.int32)
    path_lens = _t([4, 3], torch.int32)
    _check(kv, cache_seqlens, path_idx, path_lens)


def test_strided_cache_views():
    # A head_dim slice of a wider buffer, seen through permuted (layer, 2, ...) storage:
    # the layout the runner's cache.kv.view(L * 2, B, H, S, D) can have.
    gen = torch.Generator().manual_seed(4)
    storage = torch.randn(3, 20, 2, 4, 96, generator=gen).to(DEVICE)  # (B, S, caches, H, D_wide)
    kv = storage.permute(2, 0, 3, 1, 4)[..., 8:88]  # (caches, B, H, S, 80)
    assert not kv.is_contiguous()
    storage_before = storage.clone()
    cache_seqlens = _t([3, 0, 11])
    path_idx = _t([[0, 1, 4], [0, 5, 6], [0, 2, 8]])
    path_lens = _t([3, 2, 3])
    _check(kv, cache_seqlens, path_idx, path_lens)
    # Columns of the buffer outside the view are not ours to write.
    assert torch.equal(storage[..., :8], storage_before[..., :8])
    assert torch.equal(storage[..., 88:], storage_before[..., 88:])


def test_index_tensors_with_strides():
    kv = _random_kv(2, 2, 2, 16, 64, torch.float32, seed=5)
    wide_idx = _t([[0, 9, 3, 9, 4, 9], [0, 9, 1, 9, 2, 9]])
    path_idx = wide_idx[:, ::2]
    lens_buf = _t([4, 0, 6, 0])
    _check(kv, lens_buf[::2], path_idx, _t([3, 2]))


def _reference_case():
    kv = _random_kv(2, 3, 2, 12, 80, torch.float32, seed=6)
    return kv, (_t([1, 0, 4]), _t([[0, 3, 4], [0, 1, 6], [0, 2, 0]]), _t([3, 3, 2]))


def test_reference_backend_matches():
    kv, args = _reference_case()
    expected = compact_kv(kv.clone(), *args, backend="reference")
    assert not torch.equal(kv, expected), "case no longer moves anything"
    assert torch.equal(compact_kv(kv, *args), expected)


def test_auto_backend_runs_the_kernel(monkeypatch):
    # On DEVICE ("cuda", or "cpu" under TRITON_INTERPRET=1) the default backend must launch the
    # kernel: with the reference made to raise, a silent fallback fails here.
    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    kv, args = _reference_case()
    expected = compact_kv_ref(kv.clone(), *args)
    monkeypatch.setattr(compact_mod, "compact_kv_ref", no_ref)
    for backend in ("auto", "triton"):
        got = compact_kv(kv.clone(), *args, backend=backend)
        assert torch.equal(got, expected), f"backend={backend} differs from compact_kv_ref"


def _good_args():
    return dict(
        kv=torch.zeros(2, 2, 1, 8, 4, device=DEVICE),
        cache_seqlens=_t([2, 3]),
        path_idx=_t([[0, 1, 2], [0, 2, 4]]),
        path_lens=_t([3, 2]),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(kv=[0.0]), TypeError, "kv"),
        (dict(kv=torch.zeros(2, 2, 8, 4)), ValueError, "kv"),
        (dict(kv=torch.zeros(2, 2, 1, 8, 4, dtype=torch.int32)), TypeError, "kv"),
        (dict(cache_seqlens=torch.tensor([2, 3, 4])), ValueError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([2.0, 3.0])), TypeError, "cache_seqlens"),
        (dict(cache_seqlens=torch.tensor([-1, 3])), ValueError, "cache_seqlens"),
        (dict(path_idx=torch.tensor([0, 1, 2])), ValueError, "path_idx"),
        (dict(path_idx=torch.zeros(3, 3, dtype=torch.long)), ValueError, "path_idx"),
        (dict(path_idx=[[0]]), TypeError, "path_idx"),
        (dict(path_idx=torch.zeros(2, 3, dtype=torch.bool)), TypeError, "path_idx"),
        (dict(path_lens=torch.tensor([1])), ValueError, "path_lens"),
        (dict(path_lens=torch.tensor([4, 1])), ValueError, "path_lens"),
        (dict(path_lens=torch.tensor([-1, 1])), ValueError, "path_lens"),
        (dict(cache_seqlens=torch.tensor([6, 3])), ValueError, "cache_seqlens \\+ path_lens"),
        (dict(path_idx=torch.tensor([[0, 1, 6], [0, 2, 4]])), ValueError, "path_idx"),
        (dict(path_idx=torch.tensor([[0, -1, 2], [0, 2, 4]])), ValueError, "path_idx"),
        (dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_inputs(change, error, match):
    args = _good_args()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=match):
        compact_kv(**args)


def test_dead_path_entries_need_not_be_valid():
    args = _good_args()
    args["path_idx"][1, 2] = 999  # past path_lens[1] = 2: ignored
    _check(args["kv"].normal_(), args["cache_seqlens"], args["path_idx"], args["path_lens"])
