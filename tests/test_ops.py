"""torch.ops.glide.*: the custom ops give the launchers' results, pass ``opcheck`` and run
inside ``torch.compile(fullgraph=True)``.

On the CPU the ops run the kernels under ``TRITON_INTERPRET=1`` (set by ``conftest.py``).
``aot_eager`` is the compile backend here: it traces with the fake implementations and needs
no C compiler.
"""

import pytest
import torch

import glide.kernels.ops  # noqa: F401 - registers torch.ops.glide.*
from glide.kernels import cape_topk, compact_kv, cross_attention, tree_attention
from glide.kernels.reference import compact_kv_ref, cross_attention_ref, tree_attention_ref
from test_attention_kernels import f64
from tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _attention_inputs(dtype=torch.float32, seed=0):
    """Batch 2, T 5, 6 q heads over 2 KV heads (group 3), head_dim 16; q a strided view."""
    gen = torch.Generator().manual_seed(seed)
    B, T, Hq, Hkv, D, S = 2, 5, 6, 2, 16, 40
    q = torch.randn(B, Hq, T, D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(DEVICE, dtype)
    lens = torch.tensor([30, 3], device=DEVICE)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask[3, 1:3] = False  # a branch: node 3 hangs off node 0
    mask = mask.expand(B, T, T).contiguous().to(DEVICE)
    return q, k, v, lens, mask


def test_tree_attention_op_matches_launcher():
    q, k, v, lens, mask = _attention_inputs()
    got = torch.ops.glide.tree_attention(q, k, v, lens, mask, 0.3)
    want = tree_attention(q, k, v, lens, mask, 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.is_contiguous() and got.shape == q.shape
    assert_close(got, tree_attention_ref(*f64(q, k, v), lens, mask, 0.3))
    split = torch.ops.glide.tree_attention(q, k, v, lens, mask, None, 3)
    assert_close(split, tree_attention_ref(*f64(q, k, v), lens, mask))


def test_cross_attention_op_matches_launcher():
    q, k, v, lens, _ = _attention_inputs()
    got = torch.ops.glide.cross_attention(q, k, v, lens)
    torch.testing.assert_close(got, cross_attention(q, k, v, lens), rtol=0, atol=0)
    assert_close(got, cross_attention_ref(*f64(q, k, v), lens))


def test_cape_topk_op_matches_launcher():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    probs, ids = torch.ops.glide.cape_topk(logits, 4, 0.7)
    want_probs, want_ids = cape_topk(logits, 4, 0.7)
    torch.testing.assert_close(probs, want_probs, rtol=0, atol=0)
    assert torch.equal(ids, want_ids)


def test_compact_kv_op_mutates_like_launcher():
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(2, 2, 1, 12, 16, generator=gen).to(DEVICE)
    lens = torch.tensor([3, 5], device=DEVICE)
    path_idx = torch.tensor([[0, 2, 4], [1, 0, 0]], device=DEVICE)
    path_lens = torch.tensor([3, 1], device=DEVICE)
    want = compact_kv_ref(kv.clone(), lens, path_idx, path_lens)
    assert torch.ops.glide.compact_kv(kv, lens, path_idx, path_lens) is None
    assert torch.equal(kv, want)
    again = kv.clone()
    compact_kv(again, lens, path_idx, path_lens)  # the launcher: same move once more
    torch.ops.glide.compact_kv(kv, lens, path_idx, path_lens)
    assert torch.equal(kv, again)


def test_opcheck_attention_and_topk():
    q, k, v, lens, mask = _attention_inputs()
    torch.library.opcheck(torch.ops.glide.tree_attention.default, (q, k, v, lens, mask, 0.5))
    torch.library.opcheck(torch.ops.glide.cross_attention.default, (q, k, v, lens))
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    torch.library.opcheck(torch.ops.glide.cape_topk.default, (logits, 3, 1.0))


def test_opcheck_compact_kv():
    kv = torch.randn(2, 1, 1, 8, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    lens, path_idx, path_lens = (torch.tensor(x, device=DEVICE) for x in ([2], [[1, 3]], [2]))
    torch.library.opcheck(torch.ops.glide.compact_kv.default, (kv, lens, path_idx, path_lens))


def test_compiled_fullgraph_decoder_step():
    """One graph: tree attention, an output projection, top-k on the logits, compaction."""
    q, k, v, lens, mask = _attention_inputs()
    B, T, Hq, D = q.shape
    w = torch.randn(Hq * D, 50, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kv = torch.stack([k, v])
    path_idx = torch.tensor([[0, 1, 3], [0, 2, 4]], device=DEVICE)
    path_lens = torch.tensor([2, 3], device=DEVICE)

    def step(q, kv, lens, mask, path_idx, path_lens):
        attn = torch.ops.glide.tree_attention(q, kv[0], kv[1], lens, mask, None)
        logits = attn.reshape(B * T, Hq * D) @ w
        probs, ids = torch.ops.glide.cape_topk(logits, 4, 1.0)
        torch.ops.glide.compact_kv(kv, lens, path_idx, path_lens)
        return attn, probs, ids

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    kv_eager = kv.clone()
    want = step(q, kv_eager, lens, mask, path_idx, path_lens)
    got = compiled(q, kv, lens, mask, path_idx, path_lens)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert torch.equal(kv, kv_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs CUDA")
@pytest.mark.gpu
def test_tree_attention_op_in_cuda_graph():
    q, k, v, lens, mask = _attention_inputs(torch.bfloat16)
    want = tree_attention(q, k, v, lens, mask)
    torch.ops.glide.tree_attention(q, k, v, lens, mask, None)  # compile outside the capture
    torch.ops.glide.cross_attention(q, k, v, lens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.glide.tree_attention(q, k, v, lens, mask, None)
        cross = torch.ops.glide.cross_attention(q, k, v, lens)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(cross, cross_attention(q, k, v, lens), rtol=0, atol=0)
