"""rope_store (Triton: compiled on CUDA, TRITON_INTERPRET=1 on CPU) against the float64 reference,
the reference against transformers' rotate-half RoPE, and the launcher's checks."""

import pytest
import torch

import glide.kernels.rope as rope_mod
from glide.kernels import rope_store
from glide.kernels.reference import rope_store_ref
from tolerances import ROUNDING_DTYPES, assert_close, assert_rounds_like

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def signed_tables(B, T, D, gen, max_pos=64, theta=100.0):
    """cos and signed sin at random positions, (B, T, D) float64, as the runner gathers them."""
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.randint(0, max_pos, (B, T), generator=gen).to(torch.float64)
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    sin = emb.sin()
    sin[..., : D // 2] *= -1
    return emb.cos(), sin


def make_case(B, T, Hq, Hkv, D, S, lens, dtype, seed=0):
    """Strided views as the runner has them: qkv a head-dim slice of a wider buffer, cos/sin
    gathered (B, T, 1, D) tables seen as (B, T, D) with a batch-major stride, and the cache
    layer a permuted view. The slots to be written hold NaN; the rest hold random values."""
    gen = torch.Generator().manual_seed(seed)
    H = Hq + 2 * Hkv
    qkv = torch.randn(B, T, H, D + 6, generator=gen)[..., 3:3 + D].to(DEVICE, dtype)
    cos, sin = signed_tables(B, T, D, gen)
    cos = cos[:, :, None].to(DEVICE, dtype)[:, :, 0]
    sin = sin.transpose(0, 1).contiguous().transpose(0, 1).to(DEVICE, dtype)
    storage = torch.randn(B, S, 2, Hkv, D, generator=gen).to(DEVICE, dtype)
    kv_layer = storage.permute(2, 0, 3, 1, 4)  # (2, B, Hkv, S, D), not contiguous
    lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    for b in range(B):
        kv_layer[:, b, :, int(lens[b]):int(lens[b]) + T] = float("nan")
    return qkv, cos, sin, kv_layer, lens


def written_slots(kv_layer, lens, T):
    mask = torch.zeros(kv_layer.shape, dtype=torch.bool, device=kv_layer.device)
    for b in range(kv_layer.shape[1]):
        mask[:, b, :, int(lens[b]):int(lens[b]) + T] = True
    return mask


def check(qkv, cos, sin, kv_layer, lens, **kwargs):
    """Run the kernel in place; compare with the float64 reference and check nothing else moved."""
    dtype = qkv.dtype
    B, T, H, D = qkv.shape
    Hkv = kv_layer.shape[2]
    Hq = H - 2 * Hkv
    qkv_before, kv_before = qkv.clone(), kv_layer.clone()
    want_qkv = qkv.double()
    want_kv = kv_layer.double()
    rope_store_ref(want_qkv, cos.double(), sin.double(), want_kv, lens)

    out = rope_store(qkv, cos, sin, kv_layer, lens, backend="triton", **kwargs)
    assert out is qkv
    assert_close(qkv[:, :, :Hq], want_qkv[:, :, :Hq], dtype, name="rotated q")
    assert torch.equal(qkv[:, :, Hq:], qkv_before[:, :, Hq:]), "qkv's K/V heads changed"
    slots = written_slots(kv_layer, lens, T)
    assert not kv_layer[slots].isnan().any(), "a new K/V slot was left unwritten"
    assert_close(kv_layer[0][slots[0]], want_kv[0][slots[0]], dtype, name="rotated K in the cache")
    assert torch.equal(kv_layer[1][slots[1]], want_kv[1][slots[1]].to(dtype)), "V is a copy"
    assert torch.equal(kv_layer[~slots], kv_before[~slots]), "a slot outside lens + [0, T) changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B, T, Hq, Hkv, D, S, lens",
    [
        (1, 1, 3, 1, 8, 5, [4]),                  # decode, one sequence, cache full after
        (3, 1, 6, 2, 64, 12, [0, 7, 3]),          # decode, ragged, a prefix of 0
        (2, 5, 9, 3, 80, 16, [11, 2]),            # tree, head_dim 80 (half 40: masked lanes)
        (2, 3, 12, 4, 64, 9, [6, 0]),             # 20 heads: two head blocks, the second mixed
    ],
)
def test_matches_float64_reference(dtype, B, T, Hq, Hkv, D, S, lens):
    check(*make_case(B, T, Hq, Hkv, D, S, lens, dtype, seed=B * T + D))


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES)
def test_rounds_where_the_model_rounds(dtype):
    """Against the reference in the same half dtype (the model's addcmul(x * cos, roll(x), sin)):
    x * cos rounded before the second product is added."""
    qkv, cos, sin, kv_layer, lens = make_case(4, 8, 9, 3, 64, 24, [0, 3, 9, 16], dtype, seed=21)
    want_qkv, want_kv = qkv.clone(), kv_layer.clone()
    rope_store_ref(want_qkv, cos, sin, want_kv, lens)
    rope_store(qkv, cos, sin, kv_layer, lens, backend="triton")
    assert_rounds_like(qkv, want_qkv, name="qkv")
    slots = written_slots(kv_layer, lens, 8)
    assert_rounds_like(kv_layer[slots], want_kv[slots], name="written K/V")


def test_int32_lens_and_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    B, T, Hq, Hkv, D, S = 2, 2, 4, 2, 16, 8
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, generator=gen).to(DEVICE)
    cos, sin = (t.float().to(DEVICE) for t in signed_tables(B, T, D, gen))
    kv_layer = torch.randn(2, B, Hkv, S, D, generator=gen).to(DEVICE)
    check(qkv, cos, sin, kv_layer, torch.tensor([5, 1], dtype=torch.int32, device=DEVICE))


def test_reference_is_transformers_rope_and_the_runners_write():
    """In float64: q and k as transformers rotates them (cos, unsigned sin, rotate_half), and
    K/V where the runner's kv_writer puts them."""
    from glide.model.llama import kv_writer

    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 8, 10
    qkv, cos, sin, kv_layer, lens = make_case(B, T, Hq, Hkv, D, S, [2, 7], torch.float64)
    qkv, cos, sin, kv_layer = (t.cpu() for t in (qkv, cos, sin, kv_layer))
    lens = lens.cpu()
    x = qkv.clone()
    unsigned_sin = torch.cat((-sin[..., : D // 2], sin[..., D // 2:]), dim=-1)[:, :, None]

    def rotate_half(t):
        return torch.cat((-t[..., D // 2:], t[..., : D // 2]), dim=-1)

    rot = x * cos[:, :, None] + rotate_half(x) * unsigned_sin
    want_kv = kv_layer.clone()
    kv = torch.cat((rot[:, :, Hq:Hq + Hkv], x[:, :, Hq + Hkv:]), dim=2).view(B, T, 2, Hkv, D)
    kv_writer(lens, None, B, T)(want_kv, kv)

    rope_store_ref(qkv, cos, sin, kv_layer, lens)
    assert_close(qkv[:, :, :Hq], rot[:, :, :Hq], name="q")
    assert torch.equal(qkv[:, :, Hq:], x[:, :, Hq:])
    assert_close(kv_layer.nan_to_num(), want_kv.nan_to_num(), name="cache")
    assert torch.equal(kv_layer.isnan(), want_kv.isnan())


def test_auto_backend_runs_the_kernel(monkeypatch):
    def no_ref(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    args = make_case(2, 2, 3, 1, 8, 6, [1, 4], torch.float32)
    want = [t.clone() for t in args]
    rope_store_ref(*want)
    monkeypatch.setattr(rope_mod, "rope_store_ref", no_ref)
    rope_store(*args)
    assert_close(args[0], want[0], name="qkv")
    assert_close(args[3].nan_to_num(), want[3].nan_to_num(), name="kv_layer")


def test_reference_backend():
    args = make_case(1, 2, 3, 1, 8, 6, [3], torch.float32)
    want = [t.clone() for t in args]
    rope_store_ref(*want)
    rope_store(*args, backend="reference")
    assert torch.equal(args[0], want[0])


def _good_args():
    B, T, Hq, Hkv, D, S = 2, 2, 3, 1, 8, 6
    return dict(
        qkv=torch.zeros(B, T, Hq + 2 * Hkv, D, device=DEVICE),
        cos=torch.zeros(B, T, D, device=DEVICE),
        sin=torch.zeros(B, T, D, device=DEVICE),
        kv_layer=torch.zeros(2, B, Hkv, S, D, device=DEVICE),
        lens=torch.tensor([0, 4], device=DEVICE),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(qkv=[0.0]), TypeError, "qkv"),
        (dict(qkv=torch.zeros(2, 2, 40)), ValueError, "qkv"),
        (dict(qkv=torch.zeros(2, 2, 5, 8, dtype=torch.float64)), TypeError, "qkv"),
        (dict(qkv=torch.zeros(2, 2, 5, 7), cos=torch.zeros(2, 2, 7), sin=torch.zeros(2, 2, 7),
              kv_layer=torch.zeros(2, 2, 1, 6, 7)), ValueError, "head_dim"),
        (dict(qkv=torch.zeros(2, 2, 2, 8)), ValueError, "query head"),
        (dict(kv_layer=torch.zeros(2, 1, 6, 8)), ValueError, "kv_layer"),
        (dict(kv_layer=torch.zeros(3, 2, 1, 6, 8)), ValueError, "kv_layer"),
        (dict(kv_layer=torch.zeros(2, 2, 1, 6, 4)), ValueError, "kv_layer"),
        (dict(kv_layer=torch.zeros(2, 2, 1, 6, 8, dtype=torch.bfloat16)), TypeError, "kv_layer"),
        (dict(cos=torch.zeros(2, 2, 1, 8)), ValueError, "cos"),
        (dict(sin=torch.zeros(2, 2, 8, dtype=torch.float16)), TypeError, "sin"),
        (dict(lens=torch.tensor([0, 1, 2])), ValueError, "lens"),
        (dict(lens=torch.tensor([0.0, 1.0])), TypeError, "lens"),
        (dict(lens=torch.tensor([-1, 0])), ValueError, "lens"),
        (dict(lens=torch.tensor([0, 5])), ValueError, "lens"),  # 5 + T > max_seq 6
        (dict(lens=torch.tensor([0, 0]), kv_layer=torch.zeros(2, 2, 1, 6, 8, device="meta")),
         ValueError, "kv_layer"),
    ],
)
def test_rejects_bad_arguments(change, error, match):
    kwargs = _good_args()
    kwargs.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
                   for k, v in change.items()})
    with pytest.raises(error, match=match):
        rope_store(**kwargs)


def test_unchecked_lens_make_no_sync_but_shapes_are_checked():
    kwargs = _good_args()
    kwargs["lens"] = torch.tensor([0, 4], device=DEVICE)
    rope_store(**kwargs, check_lens=False)
    with pytest.raises(ValueError, match="lens"):
        rope_store(**dict(kwargs, lens=torch.tensor([0], device=DEVICE)), check_lens=False)
