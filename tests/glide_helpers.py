"""Tiny targets and GliDe drafts for the tests, including a draft trained on its target so that
its chains get accepted (random drafts almost never are)."""

import functools

import numpy as np
import torch

from glide.draft import GlideDraftModel, new_draft_config
from glide.model import LlamaModel, ModelConfig


def tiny_target(seed=0, layers=2, vocab=23, std=0.3, dtype=torch.float64, eos=(2,), max_pos=128, device="cpu"):
    """A small random Llama; on the CPU it runs the reference attention (on CUDA, Triton's)."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=max_pos,
                      eos_token_ids=tuple(eos))
    torch.manual_seed(seed)
    model = LlamaModel(cfg, dtype=dtype, device=device, init_std=std)
    if torch.device(device).type == "cpu":
        model.attn_backend = "reference"
    return model


def tiny_draft(target, seed=1, layers=1, vocab=None, cross=True, std=0.3, hidden=False):
    """A random draft; ``hidden`` gives it the hidden input, with a random (not zero) glimpse."""
    torch.manual_seed(seed)
    cfg = new_draft_config(target, num_layers=layers, cross_attention=cross, draft_vocab=vocab,
                           hidden_input=hidden)
    m = GlideDraftModel(cfg, dtype=target.dtype, init_std=std).attach(target)
    if hidden:
        with torch.no_grad():
            torch.nn.init.normal_(m.hidden_proj.weight, std=std)
            m.hidden_norm.weight.fill_(1.0)
    m.attn_backend = "reference"
    return m


def self_distilled_corpus(target, n=48, prompt_len=(3, 9), new_tokens=40, seed=0):
    """Greedy replies of ``target`` to random prompts, as corpus samples."""
    from glide.speculative.engine import generate_ids
    from glide.train.corpus import Sample

    rng = np.random.default_rng(seed)
    V = target.config.vocab_size
    prompts = [rng.integers(0, V, size=int(rng.integers(*prompt_len))).tolist() for _ in range(n)]
    outs = generate_ids(target, prompts, None, max_new_tokens=new_tokens)
    return [Sample(str(i), np.array(p + o.output_ids), len(p), 0.0) for i, (p, o) in enumerate(zip(prompts, outs))]


@functools.lru_cache(maxsize=None)
def trained_pair(tmp_root: str):
    """(target, trained draft, samples): a float32 tiny target without EOS, and a one-layer
    draft trained on its own greedy replies until its chains are mostly accepted."""
    from glide.draft import load_draft
    from glide.train.features import build_features
    from glide.train.trainer import TrainSettings, train_draft

    target = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(target)
    feats = build_features(target, samples, f"{tmp_root}/features", topk=8, progress=False)
    settings = TrainSettings(batch_size=8, epochs=80, lr=3e-3, warmup_steps=10, save_every=1000,
                             draft_vocab_size=None)
    train_draft(target, samples, feats, f"{tmp_root}/run", settings, progress=False)
    draft = load_draft(f"{tmp_root}/run/draft", target)
    draft.attn_backend = "reference"
    return target, draft, samples


def history_context(target, rows, cap=16):
    """A :class:`DraftContext` over committed ``rows`` (each history ends at its root), every
    row active, with a fresh target cache."""
    from glide.speculative.drafts import DraftContext

    B = len(rows)
    tokens = torch.zeros(B, cap, dtype=torch.int64)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    root = tokens.gather(1, (lengths - 1)[:, None])[:, 0]
    return DraftContext(target, target.new_cache(B, cap + 40), tokens, lengths, root, torch.ones(B, dtype=torch.bool))
