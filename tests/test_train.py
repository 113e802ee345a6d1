"""Draft training: prompt sources and the held-out split, corpus and feature files, the loss,
resuming after a kill, and data-parallel runs under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from glide.train.corpus import CorpusSettings, Sample, build_corpus, load_corpus
from glide.train.features import build_features, open_features
from glide.train.prompts import (
    SourcePrompt,
    conversation_key,
    later_turn,
    is_heldout,
    iter_json_array,
    read_prompt_source,
)
from glide.train.trainer import TrainSettings, batch_plan, draft_vocabulary, train_draft
from glide_helpers import self_distilled_corpus, tiny_target

WORKER = str(Path(__file__).with_name("train_worker.py"))
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- prompt sources
def test_truncated_json_array_keeps_the_complete_records():
    text = '[{"id": "a", "v": [1, 2]},\n {"id": "b", "v": "x, ]"}, {"id": "c", "v": [3'
    assert [r["id"] for r in iter_json_array(text)] == ["a", "b"]


def test_prompt_sources_in_every_format(tmp_path):
    sharegpt = [{"id": "x_0", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                                 {"from": "gpt", "value": "yo"}]},
                {"id": "y_1", "conversations": [{"from": "gpt", "value": "no user turn"}]},
                {"id": "z", "conversations": [{"from": "human", "value": "hi"}]}]  # duplicate text
    p = tmp_path / "s.json"
    p.write_text(json.dumps(sharegpt)[:-1] + ', {"id": "cut", "conv')  # cut off mid-record
    assert read_prompt_source(p) == [SourcePrompt("x_0", "hi")]
    j = tmp_path / "p.jsonl"
    j.write_text('\ufeff{"prompt": "one"}\n\n{"id": 7, "messages": [{"role": "user", "content": "two"}]}\n'
                 '{"conversations": [{"from": "human", "value": "three"}]}\n')
    assert read_prompt_source(j) == [SourcePrompt("0", "one"), SourcePrompt("7", "two"), SourcePrompt("2", "three")]


def test_all_turns_follow_the_first_turns(tmp_path):
    rows = [{"id": "a_0", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "r"},
                                             {"from": "human", "value": "q2"}, {"from": "gpt", "value": "r"},
                                             {"from": "human", "value": "  "}, {"from": "human", "value": "q4"}]},
            {"id": "b", "messages": [{"role": "user", "content": "q2"}, {"role": "user", "content": "b2"}]},
            {"prompt": "solo"}]
    j = tmp_path / "c.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = read_prompt_source(j)
    assert first == [SourcePrompt("a_0", "q1"), SourcePrompt("b", "q2"), SourcePrompt("2", "solo")]
    every = read_prompt_source(j, turns="all")
    # the first turns, unchanged, then the later ones (a text already taken by a first turn is
    # dropped: "q2" stays b's), numbered by their place among the record's user turns
    assert every[:3] == first
    assert every[3:] == [SourcePrompt("a_0@4", "q4"), SourcePrompt("b@2", "b2")]
    # a later turn belongs to its conversation's side of the held-out split
    assert conversation_key("a_0@4") == "a" and conversation_key("b@2") == "b"
    assert conversation_key("x@y") == "x@y"
    assert later_turn("a_0@4") == 4 and later_turn("a_0") is None and later_turn("x@y") is None
    with pytest.raises(ValueError, match="^turns: "):
        read_prompt_source(j, turns="some")


@pytest.mark.parametrize("content,needle", [("", "no usable prompt"), ('{"prompt": 1}\n', "no usable prompt"),
                                            ('{"prompt": "a"}\n{oops\n', ":2: not valid JSON")])
def test_bad_prompt_files_name_data(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=f"^data: .*{needle}"):
        read_prompt_source(p)
    with pytest.raises(FileNotFoundError, match="^data: "):
        read_prompt_source(tmp_path / "missing.jsonl")


def test_heldout_split_is_per_conversation_and_about_two_percent():
    assert conversation_key("QWJhYvA_12") == "QWJhYvA" and conversation_key("plain") == "plain"
    assert conversation_key("a_b") == "a_b"
    ids = [f"conv{i}" for i in range(20000)]
    frac = sum(map(is_heldout, ids)) / len(ids)
    assert 0.015 < frac < 0.025
    for i in ids[:500]:
        assert is_heldout(i) == is_heldout(i + "_0") == is_heldout(i + "_3")


def test_shipped_heldout_prompts_are_heldout_and_absent_from_the_corpus():
    rows = [json.loads(x) for x in (REPO / "bench/prompts/heldout.jsonl").read_text().splitlines() if x.strip()]
    assert rows and all(is_heldout(r["id"]) for r in rows)
    assert {r["kind"] for r in rows} == {"chat", "code"}
    corpus = REPO / "runs/smollm2/corpus"
    if not corpus.exists():
        pytest.skip("no committed corpus")
    ids = {s.id for s in load_corpus(corpus)}
    assert ids and not any(is_heldout(i) for i in ids)


# ---------------------------------------------------------------- corpus and features
class _Tok:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(c) % 5 for c in text]}


def test_corpus_resumes_and_skips_heldout_and_long_prompts(tmp_path):
    t = tiny_target(vocab=7, eos=(), dtype=torch.float32)
    prompts = [SourcePrompt(f"p{i}", "ab" * (1 + i % 4)) for i in range(40)]
    prompts.append(SourcePrompt("long", "x" * 50))
    s = CorpusSettings(max_prompts=12, max_prompt_tokens=20, max_new_tokens=6, batch_size=3, shard_size=4)
    build_corpus(t, _Tok(), prompts, tmp_path / "c", s, progress=False)
    full = load_corpus(tmp_path / "c")
    assert len(full) == 12 and not any(is_heldout(x.id) or x.id == "long" for x in full)
    assert all(len(x.tokens) == x.prompt_len + 6 for x in full)
    assert [x.temperature for x in full[:4]] == [0.0, 1.0, 0.0, 1.0]
    # lose the last shard: a rerun rebuilds exactly it
    last = sorted((tmp_path / "c").glob("shard-*.npz"))[-1]
    before = last.read_bytes()
    last.unlink()
    build_corpus(t, _Tok(), prompts, tmp_path / "c", s, progress=False)
    assert last.read_bytes() == before
    with pytest.raises(ValueError, match="^data: .*other settings"):
        build_corpus(t, _Tok(), prompts, tmp_path / "c", CorpusSettings(max_prompts=5), progress=False)
    # more prompts over full shards: the old shards stay, new ones follow the same selection
    shards = sorted((tmp_path / "c").glob("shard-*.npz"))
    kept = [f.read_bytes() for f in shards]
    bigger = CorpusSettings(max_prompts=20, max_prompt_tokens=20, max_new_tokens=6, batch_size=3, shard_size=4)
    build_corpus(t, _Tok(), prompts, tmp_path / "c", bigger, progress=False)
    assert [f.read_bytes() for f in shards] == kept
    grown = load_corpus(tmp_path / "c")
    assert len(grown) == 20 and [x.id for x in grown[:12]] == [x.id for x in full]
    build_corpus(t, _Tok(), prompts, tmp_path / "d", bigger, progress=False)
    assert [x.id for x in load_corpus(tmp_path / "d")] == [x.id for x in grown]
    # fewer prompts, or more over a partial last shard, is another corpus
    def sized(n):
        return CorpusSettings(max_prompts=n, max_prompt_tokens=20, max_new_tokens=6, batch_size=3, shard_size=4)
    with pytest.raises(ValueError, match="^prompts: .*made for 20 prompts"):
        build_corpus(t, _Tok(), prompts, tmp_path / "c", sized(8), progress=False)
    # the command's default asks for what the corpus is made for
    from glide.train.corpus import planned_prompts
    assert planned_prompts(tmp_path / "c") == 20 and planned_prompts(tmp_path / "none") is None
    build_corpus(t, _Tok(), prompts, tmp_path / "e", sized(10), progress=False)
    with pytest.raises(ValueError, match="^data: .*partial shard"):
        build_corpus(t, _Tok(), prompts, tmp_path / "e", sized(12), progress=False)
    # another source, whose selection would put other prompts in the shards already made
    with pytest.raises(ValueError, match="^data: shard 4 of .*other prompts"):
        build_corpus(t, _Tok(), prompts[::-1], tmp_path / "c", bigger, progress=False)


def test_corpus_grows_from_first_turns_to_all_turns(tmp_path):
    from glide.train.corpus import planned_turns

    t = tiny_target(vocab=7, eos=(), dtype=torch.float32)
    first = [SourcePrompt(f"c{i}", "ab" * (1 + i % 3)) for i in range(10)]
    later = [SourcePrompt(f"c{i}@2", "ba" * (1 + i % 3)) for i in range(10)]
    kw = dict(max_prompt_tokens=20, max_new_tokens=4, batch_size=2, shard_size=4)
    build_corpus(t, _Tok(), first, tmp_path / "c", CorpusSettings(max_prompts=8, **kw), progress=False)
    assert planned_turns(tmp_path / "c") == "first" and planned_turns(tmp_path / "none") is None
    made = [f.read_bytes() for f in sorted((tmp_path / "c").glob("shard-*.npz"))]
    build_corpus(t, _Tok(), first + later, tmp_path / "c", CorpusSettings(max_prompts=16, turns="all", **kw),
                 progress=False)
    shards = sorted((tmp_path / "c").glob("shard-*.npz"))
    assert [f.read_bytes() for f in shards[:2]] == made and len(shards) == 4
    ids = [x.id for x in load_corpus(tmp_path / "c")]
    assert "@2" in ids[-1] and not any("@" in i for i in ids[:8])
    assert planned_turns(tmp_path / "c") == "all"
    with pytest.raises(ValueError, match="^turns: .*keep --turns all"):
        build_corpus(t, _Tok(), first + later, tmp_path / "c", CorpusSettings(max_prompts=16, **kw),
                     progress=False)


def test_features_hold_the_targets_kv_and_teacher_and_resume(tmp_path):
    t = tiny_target(vocab=11, eos=(), dtype=torch.float32)
    samples = self_distilled_corpus(t, n=9, new_tokens=7)
    f = build_features(t, samples, tmp_path / "f", topk=3, tokens_per_batch=40, progress=False)
    for i in (0, 4, 8):
        s = samples[i]
        L = len(s.tokens)
        cache = t.new_cache(1, L)
        ids = torch.tensor([list(s.tokens)])
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None]
        logits = t.forward(ids, torch.arange(L)[None], causal, cache)[0]
        kv = f.sample_kv(i)  # (layers, 2, Hkv, L, D)
        torch.testing.assert_close(kv[0].float(), cache.kv[-1, :, 0, :, :L].to(torch.bfloat16).float())
        ids_k, lp = f.sample_topk(i)
        rows = torch.arange(L)
        teach = (rows >= s.prompt_len - 1) & (rows < L - 1)
        want_lp, want_id = torch.log_softmax(logits, -1).topk(3, -1)
        assert torch.equal(ids_k[teach], want_id[teach]) and (ids_k[~teach] == -1).all()
        torch.testing.assert_close(lp[teach], want_lp[teach], atol=2e-3, rtol=2e-3)
    # an interrupted run: pretend only the first chunk was done, and scribble on the rest
    meta = json.loads((tmp_path / "f/meta.json").read_text())
    kv_before = np.array(f.kv)
    meta["done"] = 2
    (tmp_path / "f/meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="^data: .*unfinished"):
        open_features(tmp_path / "f")
    mm = np.memmap(tmp_path / "f/kv.bin", dtype=np.int16, mode="r+", shape=f.kv.shape)
    mm[:] = 0
    mm.flush()
    f2 = build_features(t, samples, tmp_path / "f", topk=3, tokens_per_batch=40, progress=False)
    order = sorted(range(len(samples)), key=lambda k: (len(samples[k].tokens), k))
    redone = order[2:]
    for k in redone:
        a, b = f2.offsets[k], f2.offsets[k + 1]
        assert np.array_equal(np.array(f2.kv[a:b]), kv_before[a:b])


# ---------------------------------------------------------------- the loop
def test_batch_plan_is_deterministic_and_covers_every_sample():
    lengths = np.random.default_rng(0).integers(5, 50, 37)
    a = batch_plan(37, lengths, 4, 2.0, seed=1)
    assert a == batch_plan(37, lengths, 4, 2.0, seed=1) and a != batch_plan(37, lengths, 4, 2.0, seed=2)
    assert len(a) == 19
    first_epoch = sorted(i for b in a[:10] for i in b)
    assert first_epoch == list(range(37))


def test_draft_vocabulary_keeps_the_frequent_tokens_and_eos():
    samples = [Sample("a", np.array([3, 3, 3, 1, 1, 2]), 1, 0.0), Sample("b", np.array([3, 4]), 1, 0.0)]
    assert draft_vocabulary(samples, 9, 3, always=[8]) == [8, 3, 1]
    assert draft_vocabulary(samples, 9, None) is None and draft_vocabulary(samples, 9, 9) is None


def test_training_lowers_the_loss_and_the_teacher_agreement_rises(tmp_path):
    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=24)
    f = build_features(t, samples, tmp_path / "f", topk=4, progress=False)
    train_draft(t, samples, f, tmp_path / "r", TrainSettings(batch_size=4, epochs=5, lr=3e-3, warmup_steps=4,
                                                            draft_vocab_size=None), progress=False)
    log = [json.loads(x) for x in (tmp_path / "r/log.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.8 * first, (first, last)
    assert np.mean([r["top1"] for r in log[-5:]]) > np.mean([r["top1"] for r in log[:5]]) + 0.1
    card = json.loads((tmp_path / "r/draft/config.json").read_text())["card"]
    assert card["result"]["steps"] == len(log) == 30 and card["training"]["loss"] == "kl"


def test_validation_scores_unseen_samples_and_falls_as_the_draft_learns(tmp_path):
    from glide.train.trainer import evaluate

    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=32)
    f = build_features(t, samples[:24], tmp_path / "f", topk=4, progress=False)
    fv = build_features(t, samples[24:], tmp_path / "fv", topk=4, progress=False)
    s = train_draft(t, samples[:24], f, tmp_path / "r", TrainSettings(batch_size=4, epochs=5, lr=3e-3, warmup_steps=4,
                                                                     draft_vocab_size=None),
                    progress=False, validation=(samples[24:], fv), eval_every=10)
    val = [json.loads(x) for x in (tmp_path / "r/val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 10, 20, 30]
    assert val[-1]["loss"] < 0.9 * val[0]["loss"] and val[-1]["top1"] > val[0]["top1"]
    assert s["val_loss"] == val[-1]["loss"] and s["val_step"] == 30
    # a pure function of the weights: scoring again gives the same, and leaves the model alone
    from glide.draft import load_draft
    d = load_draft(tmp_path / "r/draft", t).float()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    settings = TrainSettings(batch_size=4, draft_vocab_size=None)
    a, b = evaluate(d, samples[24:], fv, settings), evaluate(d, samples[24:], fv, settings, batch_size=3)
    assert a["tokens"] == b["tokens"] == sum(len(x.tokens) - x.prompt_len for x in samples[24:])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["top1"] == pytest.approx(b["top1"], abs=1e-3)
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())
    # by depth in the block: the counts cover every position, the agreements average to top-1
    n, t1 = a["tokens_by_depth"], a["top1_by_depth"]
    assert len(n) == settings.gamma + 1 and sum(n) == a["tokens"] and min(n) > 0
    assert sum(x * y for x, y in zip(n, t1)) / sum(n) == pytest.approx(a["top1"], abs=1e-3)
    # by the teacher's confidence: the same, over buckets; recall grows with k, from top-1 to every
    # token of the (7-token) vocabulary at k = 8
    n, t1 = a["tokens_by_confidence"], a["top1_by_confidence"]
    assert len(n) == len(a["confidence_edges"]) - 1 and sum(n) == a["tokens"] and sum(1 for x in n if x) >= 2
    assert sum(x * y for x, y in zip(n, t1)) / sum(n) == pytest.approx(a["top1"], abs=1e-3)
    r = a["recall"]
    assert r[1] == pytest.approx(a["top1"], abs=1e-3) and r[1] <= r[4] <= r[8] == pytest.approx(1.0)
    assert r[4] < 1.0  # the teacher's argmax is sometimes below the draft's fourth token
    # a given cross mask: the training one reproduces the default; another (the grid moved) differs
    from glide.draft.model import block_cross_mask
    same = evaluate(d, samples[24:], fv, settings,
                    cross_mask=lambda S, shift: block_cross_mask(S, settings.gamma + 1, shift))
    assert same == a
    stale = evaluate(d, samples[24:], fv, settings,
                     cross_mask=lambda S, shift: block_cross_mask(S, settings.gamma + 1, shift - 3))
    assert stale["loss"] != a["loss"]
    few = evaluate(d, samples[24:], fv, settings, limit=2)
    assert few["tokens"] == sum(len(x.tokens) - x.prompt_len for x in samples[24:26])
    with pytest.raises(ValueError, match="^eval_every"):
        train_draft(t, samples[:24], f, tmp_path / "x", settings, progress=False, eval_every=0)


def test_validation_reports_the_sampled_acceptance_of_either_drafting_rule(tmp_path):
    """With the whole (7-token) vocabulary stored, ``sampled_acceptance`` is exact: on one sample,
    the mean over its response positions of p(draft's argmax) and of sum_v min(p_v, q_v),
    computed here from the draft's own forward and the teacher's stored distribution."""
    from glide.draft.model import block_cross_mask
    from glide.train.trainer import evaluate

    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=12)
    f = build_features(t, samples, tmp_path / "f", topk=7, progress=False)
    train_draft(t, samples, f, tmp_path / "r", TrainSettings(batch_size=4, epochs=2, lr=3e-3, warmup_steps=2,
                                                             draft_vocab_size=None), progress=False)
    from glide.draft import load_draft
    d = load_draft(tmp_path / "r/draft", t).float()
    settings = TrainSettings(batch_size=4, draft_vocab_size=None, bf16=False)
    got = evaluate(d, samples, f, settings, limit=1)["sampled_acceptance"]
    smp = samples[0]  # sample 0 starts its block grid at 0
    S, P = len(smp.tokens), smp.prompt_len
    kv = f.sample_kv(0)[-1].float()  # (2, kv_heads, S, head_dim) of the last layer
    ids = torch.as_tensor(smp.tokens, dtype=torch.int64)[None]
    with torch.no_grad():
        q = d(ids, [(kv[0][None], kv[1][None])], block_cross_mask(S, settings.gamma + 1)).double().softmax(-1)[0]
    tid, tlp = f.sample_topk(0)
    greedy, sampled = [], []
    for pos in range(P - 1, S - 1):  # the positions that predict a response token
        p = torch.zeros(7, dtype=torch.float64).index_put_((tid[pos].long(),), tlp[pos].double().exp())
        greedy.append(float(p[int(q[pos].argmax())]))
        sampled.append(float(torch.minimum(p, q[pos]).sum()))
    assert got["greedy_token"] == pytest.approx(sum(greedy) / len(greedy), abs=2e-4)
    assert got["sampled_token"] == pytest.approx(sum(sampled) / len(sampled), abs=2e-4)
    assert 0 < got["greedy_token"] < 1 and 0 < got["sampled_token"] < 1


@pytest.mark.parametrize("loss", ["ce", "mix"])
def test_other_losses_train_too(tmp_path, loss):
    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=16)
    f = build_features(t, samples, tmp_path / "f", topk=4, progress=False)
    s = train_draft(t, samples, f, tmp_path / "r", TrainSettings(batch_size=4, epochs=4, lr=3e-3, loss=loss,
                                                                warmup_steps=2, draft_vocab_size=4),
                    progress=False)
    log = [json.loads(x) for x in (tmp_path / "r/log.jsonl").read_text().splitlines()]
    assert s["steps"] == 16 and log[-1]["loss"] < log[0]["loss"]


def test_resume_refuses_other_settings(tmp_path):
    t = tiny_target(seed=3, vocab=7, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=8)
    f = build_features(t, samples, tmp_path / "f", topk=4, progress=False)
    base = dict(batch_size=4, epochs=2, draft_vocab_size=None)
    train_draft(t, samples, f, tmp_path / "r", TrainSettings(**base), max_steps=2, progress=False)
    with pytest.raises(ValueError, match="^resume: .*other settings"):
        train_draft(t, samples, f, tmp_path / "r", TrainSettings(**base, lr=1e-2), progress=False)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _worker(root, run, *extra, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    e.update(env or {})
    return subprocess.Popen([sys.executable, WORKER, str(root), run, *map(str, extra)], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_run_resumes_with_no_lost_progress(tmp_path):
    """SIGKILL a run once it has saved a checkpoint mid-way; the restarted run ends with the same
    weights, bit for bit, as a run that was never interrupted."""
    p = _worker(tmp_path, "straight")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    p = _worker(tmp_path, "killed")
    state, deadline = tmp_path / "killed" / "state.pt", time.time() + 300
    while time.time() < deadline:
        log = tmp_path / "killed" / "log.jsonl"
        if state.exists() and log.exists() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not (tmp_path / "killed" / "draft").exists(), "the run finished before it was killed"
    saved = torch.load(state, weights_only=False)["step"]
    assert 3 <= saved < 36
    p = _worker(tmp_path, "killed")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    a, b = _weights(tmp_path / "straight" / "draft"), _weights(tmp_path / "killed" / "draft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 36 and sorted(set(steps)) == list(range(1, 37))


def test_torchrun_two_processes_equal_one(tmp_path):
    """Two gloo ranks, each on half of every global batch, train the same draft as one process."""
    p = _worker(tmp_path, "single")
    assert p.wait(timeout=300) == 0, p.stdout.read()
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        WORKER, str(tmp_path), "ddp"], env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _weights(tmp_path / "single" / "draft"), _weights(tmp_path / "ddp" / "draft")
    for k in a:  # stored in bfloat16: equal up to one rounding step
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-4)
    la = [json.loads(x)["loss"] for x in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 36
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def test_target_first_init_is_an_early_exit_after_layer_0():
    """With ``init="target-first"`` the untrained draft computes the target's layer 0 on its
    tokens, then the target's final norm and head."""
    from glide.draft import GlideDraftModel, new_draft_config
    from glide.model.llama import kv_writer, tree_attender
    from glide.train.trainer import init_from_target

    t = tiny_target(vocab=11, dtype=torch.float64, std=0.5)
    d = GlideDraftModel(new_draft_config(t), dtype=torch.float64).attach(t)
    init_from_target(d, t, "target-first")
    ids = torch.tensor([[1, 4, 2, 7, 3, 9]])
    S = ids.shape[1]
    kv = [(torch.randn(1, 2, S, 8, dtype=torch.float64),) * 2]
    got = d(ids, kv, torch.ones(S, S, dtype=torch.bool).tril())
    cache = t.new_cache(1, S)
    pos = torch.arange(S)[None]
    cos, sin = t.rope_cos[pos].unsqueeze(2), t.rope_sin[pos].unsqueeze(2)
    mask = torch.ones(1, S, S, dtype=torch.bool).tril()
    h = t.layers[0](t.embed_tokens(ids), cos, sin, cache.kv[0], kv_writer(cache.lens, 0, 1, S),
                    tree_attender(cache.lens, 0, mask, "reference"))
    torch.testing.assert_close(got, t.lm_head(t.norm(h)), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- the command line
def _tiny_checkpoint(path):
    import transformers

    config = transformers.LlamaConfig(vocab_size=13, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                      eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def test_train_draft_command_runs_its_stages(tmp_path, capsys):
    """features and train stages through ``glide train-draft`` on a tiny checkpoint, then the
    draft it wrote decodes through ``glide.api``."""
    from glide.cli import main
    from glide.model.load import load_model
    from glide.train.corpus import _save_shard

    _tiny_checkpoint(tmp_path / "m")
    target, _ = load_model(tmp_path / "m", dtype=torch.float32)
    samples = self_distilled_corpus(target, n=12, new_tokens=10)
    (tmp_path / "run" / "corpus").mkdir(parents=True)
    _save_shard(tmp_path / "run" / "corpus" / "shard-00000.npz", samples[:8], 13)
    _save_shard(tmp_path / "run" / "corpus" / "shard-00001.npz", samples[8:], 13)
    common = ["train-draft", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(common + ["--stage", "features", "--topk", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "features").iterdir()) == ["shard-00000", "shard-00001"]
    assert main(common + ["--stage", "train", "--epochs", "2", "--batch-size", "4", "--draft-vocab", "0"]) == 0
    out = capsys.readouterr().out
    assert "6/6 steps" in out and "draft written to" in out
    from glide.draft import load_draft
    assert load_draft(tmp_path / "run" / "glide" / "draft", target).config.draft_vocab is None
    # only the first shard, as a separate run: 8 samples, 2 steps an epoch
    assert main(common + ["--stage", "train", "--shards", "1", "--epochs", "1", "--batch-size", "4",
                          "--run-name", "one", "--vanilla"]) == 0
    assert "2/2 steps" in capsys.readouterr().out
    assert not load_draft(tmp_path / "run" / "one" / "draft", target).config.cross_attention
    # the last shard as validation: trains on the first (2 steps), scores the second (4 samples)
    assert main(common + ["--stage", "train", "--val-shards", "1", "--eval-every", "1", "--epochs", "1",
                          "--batch-size", "4", "--run-name", "val"]) == 0
    assert "2/2 steps" in capsys.readouterr().out
    val = [json.loads(x) for x in (tmp_path / "run" / "val" / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [0, 1, 2]
    assert all(v["tokens"] == sum(len(x.tokens) - x.prompt_len for x in samples[8:]) for v in val)
    assert main(common + ["--stage", "train", "--val-shards", "2", "--run-name", "v2"]) == 2
    assert "argument --val-shards" in capsys.readouterr().err
    # calibrate: the run's draft, on the last shard's prompts, greedy and at temperature 1
    from glide.draft.dynamic import load_calibration

    assert main(common + ["--stage", "calibrate", "--calibration-prompts", "3"]) == 2  # 128 tokens do not fit
    assert "argument --calibration-tokens" in capsys.readouterr().err
    assert main(common + ["--stage", "calibrate", "--calibration-prompts", "3", "--calibration-tokens", "12"]) == 0
    assert "calibration of 3 prompts of shard 1 written to" in capsys.readouterr().out
    draft = tmp_path / "run" / "glide" / "draft"
    for temp in (0.0, 1.0):
        assert sum(load_calibration(draft, temp).count) > 0
    info = json.loads((draft / "calibration.json").read_text())["info"]
    assert info["corpus_shard"] == 1 and info["prompts"] == 3
    assert main(common + ["--stage", "calibrate", "--draft", str(tmp_path / "none")]) == 2
    assert "argument --draft" in capsys.readouterr().err


@pytest.mark.parametrize("argv,flag", [(["--stage", "nope"], "--stage"), (["--loss", "l2"], "--loss"),
                                       (["--epochs", "0"], "--epochs"), (["--draft-vocab", "-3"], "--draft-vocab"),
                                       (["--batch-size", "0"], "--batch-size"), (["--init", "zeros"], "--init"),
                                       (["--shards", "0"], "--shards"), (["--max-steps", "-1"], "--max-steps"),
                                       (["--val-shards", "-1"], "--val-shards"), (["--eval-every", "0"], "--eval-every"),
                                       (["--calibration-prompts", "0"], "--calibration-prompts"),
                                       (["--calibration-tokens", "0"], "--calibration-tokens")])
def test_train_draft_bad_arguments_name_the_flag(capsys, argv, flag):
    from glide.cli import main

    assert main(["train-draft", "--out", "/nonexistent/x"] + argv) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


def test_train_draft_on_a_missing_data_file_names_it(capsys, tmp_path):
    from glide.cli import main

    assert main(["train-draft", "--out", str(tmp_path), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "argument --data" in capsys.readouterr().err


def test_grow_state_keeps_the_prior_predictions():
    from glide.draft.model import GlideDraftModel, block_cross_mask
    from glide.train.trainer import grow_state
    from glide_helpers import tiny_draft

    t = tiny_target(layers=3)
    prior = tiny_draft(t, vocab=list(range(0, 23, 2)))
    grown = GlideDraftModel(prior.config.__class__(**{**prior.config.__dict__, "num_layers": 3}),
                            dtype=torch.float64, init_std=None)
    grown.load_state_dict(grow_state(prior, 3))
    grown.attach(t)
    # the prior's layer reads target layer 2 (the last); in the grown draft that is layer 2 too
    assert [grown.config.target_layer(i) for i in range(3)] == [0, 1, 2] and prior.config.target_layer(0) == 2
    torch.manual_seed(0)
    B, S, Hkv, D = 2, 11, t.config.num_kv_heads, t.config.head_dim
    kv = [(torch.randn(B, Hkv, S, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64))
          for _ in range(3)]
    ids = torch.randint(0, 23, (B, S))
    mask = block_cross_mask(S, 5, torch.tensor([0, 2]))
    a, b = grown(ids, kv, mask), prior(ids, kv[2:], mask)
    assert torch.equal(a, b)
    # the new layers start as copies of the prior's first layer with zero output projections
    g = grown.layers[0]
    assert torch.equal(g.qkv_proj.weight, prior.layers[0].qkv_proj.weight)
    assert not g.o_proj.weight.any() and not g.cross_o_proj.weight.any() and not g.down_proj.weight.any()
    assert prior.layers[0].down_proj.weight.any()
    with pytest.raises(ValueError, match="^num_layers: "):
        grow_state(grown, 2)


def test_init_from_a_smaller_draft_grows_it(tmp_path):
    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=8)
    f = build_features(t, samples, tmp_path / "f", num_layers=2, topk=4, progress=False)
    base = dict(batch_size=4, epochs=1, draft_vocab_size=None, bf16=False)
    train_draft(t, samples, f, tmp_path / "a", TrainSettings(**base), progress=False)
    train_draft(t, samples, f, tmp_path / "b", TrainSettings(**base, num_layers=2, lr=1e-30,
                                                             init_from=str(tmp_path / "a" / "draft")),
                progress=False)
    a, b = _weights(tmp_path / "a" / "draft"), _weights(tmp_path / "b" / "draft")
    assert set(b) == set(a) | {k.replace("layers.0.", "layers.1.") for k in a}
    assert all(torch.equal(a[k], b[k.replace("layers.0.", "layers.1.")]) for k in a if k.startswith("layers."))
    assert b["layers.0.down_proj.weight"].abs().max() < 1e-20  # zero, give or take the tiny lr's steps
    # a draft with more layers than the run cannot be the start
    with pytest.raises(ValueError, match="^init_from: .*more layers"):
        train_draft(t, samples, f, tmp_path / "c", TrainSettings(**base, init_from=str(tmp_path / "b" / "draft")),
                    progress=False)


def test_a_draft_reads_the_last_layers_of_deeper_features(tmp_path):
    # features of the last two target layers train a one-layer draft exactly as features of the
    # last layer alone do: the draft reads target layer L - 1, not the first layer held
    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=8)
    one = build_features(t, samples, tmp_path / "f1", num_layers=1, topk=4, progress=False)
    two = build_features(t, samples, tmp_path / "f2", num_layers=2, topk=4, progress=False)
    assert two.meta["target_layers"] == [0, 1] and one.meta["target_layers"] == [1]
    base = TrainSettings(batch_size=4, epochs=1, draft_vocab_size=None, bf16=False)
    train_draft(t, samples, one, tmp_path / "a", base, progress=False)
    train_draft(t, samples, two, tmp_path / "b", base, progress=False)
    a, b = _weights(tmp_path / "a" / "draft"), _weights(tmp_path / "b" / "draft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_a_draft_continues_it(tmp_path):
    t = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(t, n=8)
    f = build_features(t, samples, tmp_path / "f", topk=4, progress=False)
    base = dict(batch_size=4, epochs=1, draft_vocab_size=None, bf16=False)
    train_draft(t, samples, f, tmp_path / "a", TrainSettings(**base), progress=False)
    # zero steps of training (lr tiny) from the first draft: the weights come back unchanged
    train_draft(t, samples, f, tmp_path / "b", TrainSettings(**base, lr=1e-30, init_from=str(tmp_path / "a" / "draft")),
                progress=False)
    a, b = _weights(tmp_path / "a" / "draft"), _weights(tmp_path / "b" / "draft")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the card of the continued draft carries the first stage's card
    from glide.draft.checkpoint import read_draft_config
    first, second = read_draft_config(tmp_path / "a" / "draft")[1], read_draft_config(tmp_path / "b" / "draft")[1]
    assert "prior" not in first and second["prior"] == first and second["training"]["lr"] == 1e-30
    # a continued draft keeps its head rows, even where this corpus's most frequent tokens differ
    from glide.draft import load_draft
    small = dict(base, draft_vocab_size=4)
    train_draft(t, samples, f, tmp_path / "s", TrainSettings(**small), progress=False)
    prior = load_draft(tmp_path / "s" / "draft", t).config.draft_vocab
    other = [Sample(x.id, np.where(x.tokens == prior[-1], prior[0], x.tokens), x.prompt_len, x.temperature)
             for x in samples]
    assert draft_vocabulary(other, 7, 4) != list(prior)
    train_draft(t, other, f, tmp_path / "s2", TrainSettings(**small, init_from=str(tmp_path / "s" / "draft")),
                progress=False)
    assert load_draft(tmp_path / "s2" / "draft", t).config.draft_vocab == prior
    with pytest.raises(ValueError, match="^init_from: "):
        train_draft(t, samples, f, tmp_path / "c", TrainSettings(**dict(base, draft_vocab_size=3),
                                                                init_from=str(tmp_path / "a" / "draft")),
                    progress=False)
