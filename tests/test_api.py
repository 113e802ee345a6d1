"""glide.api.generate on a tiny random float64 model: the row contract, the methods agreeing
greedily, batching and streaming. The real model is exercised in test_model_integration.py."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from glide import api
from glide.model import LlamaModel, ModelConfig

VOCAB = 41


class ByteTokenizer:
    """Token id = character code mod VOCAB (offset 3); enough to drive the API end to end."""

    chat_template = None
    eos_token_id = None
    pad_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (int(i) % 26)) for i in ids)


@pytest.fixture(scope="module")
def loaded():
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=160)
    torch.manual_seed(0)
    model = LlamaModel(cfg, dtype=torch.float64, init_std=0.3)
    model.attn_backend = "reference"  # attention and compaction; the kernels are tested elsewhere
    return model, ByteTokenizer()


PROMPTS = ["abcabcabcabc", "the cat sat on the mat, the cat", "xyz"]
FIELDS = {"id", "output_ids", "output_text", "new_tokens", "target_forwards", "mean_accepted",
          "seconds", "tokens_per_s", "batch", "batch_seconds"}


def run(loaded, method, **kw):
    kw.setdefault("max_new_tokens", 20)
    return api.generate(PROMPTS, method=method, loaded=loaded, dtype="float32", **kw)


def test_ar_rows_follow_the_contract(loaded):
    rows = run(loaded, "ar")
    assert [r["id"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) == FIELDS
        assert r["new_tokens"] == len(r["output_ids"]) == 20
        assert r["target_forwards"] == r["new_tokens"] - 1  # the first token comes from the prefill
        assert r["mean_accepted"] == 1.0
        assert r["seconds"] > 0 and math.isclose(r["tokens_per_s"], r["new_tokens"] / r["seconds"])
        assert r["output_text"] == loaded[1].decode(r["output_ids"])
        json.dumps(r)  # every row is JSON-serialisable


def test_lookup_equals_ar_greedily_in_fewer_forwards(loaded):
    ar = run(loaded, "ar")
    lk = run(loaded, "lookup")
    assert [r["output_ids"] for r in lk] == [r["output_ids"] for r in ar]
    assert all(a["target_forwards"] >= b["target_forwards"] for a, b in zip(ar, lk))
    for r in lk:
        assert math.isclose(r["mean_accepted"], (r["new_tokens"] - 1) / r["target_forwards"])


@pytest.fixture(scope="module")
def draft_dir(loaded, tmp_path_factory):
    """A random GliDe draft for the tiny model, saved as a draft folder."""
    from glide.draft import GlideDraftModel, new_draft_config, save_draft

    torch.manual_seed(1)
    net = GlideDraftModel(new_draft_config(loaded[0]), dtype=torch.float64, init_std=0.3)
    return str(save_draft(net, tmp_path_factory.mktemp("draft") / "d", dtype=torch.float64))


@pytest.mark.parametrize("method,kw", [("glide", {}), ("glide", {"gamma": 2}), ("cape", {}),
                                       ("cape", {"bins": "3,3,3,3,3,2,2,2,1,1,1"}), ("cape", {"tree": "dynamic"}),
                                       ("glide", {"tree": "cape"}), ("glide", {"tree": "dynamic", "fallback": False}),
                                       ("glide", {"tree": "dynamic", "fallback": False, "lookup": 4})])
def test_glide_and_cape_equal_ar_greedily(loaded, draft_dir, method, kw):
    ar = run(loaded, "ar", batch_size=2)
    sp = run(loaded, method, batch_size=2, draft=draft_dir, **kw)
    assert [r["output_ids"] for r in sp] == [r["output_ids"] for r in ar]
    assert all(set(r) == FIELDS and r["target_forwards"] <= a["target_forwards"] for r, a in zip(sp, ar))


@pytest.mark.parametrize("kw,name", [({"method": "ar", "tree": "dynamic"}, "tree"),
                                     ({"method": "glide", "tree": "bushy"}, "tree"),
                                     ({"method": "cape", "tree": "dynamic", "bins": "2,2,2,2,2,2,2,2,2,2,2"}, "bins"),
                                     ({"method": "glide", "fallback": False}, "fallback"),
                                     ({"method": "glide", "tree": "dynamic", "fallback": "no"}, "fallback"),
                                     ({"method": "glide", "lookup": 4}, "lookup"),
                                     ({"method": "glide", "tree": "dynamic", "lookup": -1}, "lookup"),
                                     ({"method": "glide", "tree": "dynamic", "lookup": 2.0}, "lookup"),
                                     ({"method": "glide", "ngrams": False}, "ngrams"),
                                     ({"method": "glide", "tree": "dynamic", "ngrams": 0}, "ngrams"),
                                     ({"method": "cape", "sample_draft": True}, "sample_draft"),
                                     ({"method": "glide", "tree": "cape", "sample_draft": True}, "sample_draft"),
                                     ({"method": "glide", "sample_draft": 1}, "sample_draft")])
def test_bad_tree_arguments_name_them(loaded, draft_dir, kw, name):
    with pytest.raises(api.ArgumentError) as info:
        api.generate(PROMPTS, loaded=loaded, draft=draft_dir if kw["method"] != "ar" else None, **kw)
    assert info.value.argument == name


def test_a_sampling_glide_chain_through_the_api(loaded, draft_dir):
    """``sample_draft``: greedy output stays ``ar``'s; sampled, a seed reproduces, and the rows
    are the usual ones."""
    ar = run(loaded, "ar", batch_size=2)
    sp = run(loaded, "glide", batch_size=2, draft=draft_dir, sample_draft=True)
    assert [r["output_ids"] for r in sp] == [r["output_ids"] for r in ar]
    a = run(loaded, "glide", batch_size=2, draft=draft_dir, sample_draft=True, temperature=1.0, seed=4)
    b = run(loaded, "glide", batch_size=2, draft=draft_dir, sample_draft=True, temperature=1.0, seed=4)
    assert [r["output_ids"] for r in a] == [r["output_ids"] for r in b]
    assert all(set(r) == FIELDS for r in a)


def test_a_damaged_ngram_table_names_the_draft(loaded, draft_dir, tmp_path):
    import shutil

    folder = tmp_path / "d"
    shutil.copytree(draft_dir, folder)
    (folder / "ngrams.npz").write_bytes(b"PK\x03\x04 cut short")  # a zip header, then nothing
    with pytest.raises(api.ArgumentError) as info:
        api.generate(PROMPTS, method="glide", tree="dynamic", loaded=loaded, draft=str(folder), max_new_tokens=4)
    assert info.value.argument == "draft" and "ngrams.npz" in str(info.value)
    rows = api.generate(PROMPTS, method="glide", tree="dynamic", loaded=loaded, draft=str(folder),
                        max_new_tokens=4, ngrams=False)  # never read with the table off
    assert len(rows) == len(PROMPTS)


def test_a_draft_for_another_model_names_the_argument(loaded, draft_dir):
    other = LlamaModel(loaded[0].config, dtype=torch.float64, init_std=0.3)  # same shape, new weights
    with pytest.raises(api.ArgumentError) as info:
        api.generate(PROMPTS, method="glide", loaded=(other, loaded[1]), draft=draft_dir, max_new_tokens=4)
    assert info.value.argument == "draft" and "another target" in str(info.value)


@pytest.mark.parametrize("method", ["ar", "lookup"])
def test_batching_does_not_change_greedy_output(loaded, method):
    one = run(loaded, method, batch_size=1)
    two = run(loaded, method, batch_size=2)
    assert [r["output_ids"] for r in two] == [r["output_ids"] for r in one]


def test_streamed_text_equals_the_final_text(loaded):
    pieces = {}
    rows = run(loaded, "lookup", batch_size=3, on_text=lambda i, s: pieces.setdefault(i, []).append(s))
    assert {i: "".join(p) for i, p in pieces.items()} == {i: r["output_text"] for i, r in enumerate(rows)}


def test_sampling_is_seeded(loaded):
    a = run(loaded, "lookup", temperature=0.9, top_p=0.95, seed=7)
    b = run(loaded, "lookup", temperature=0.9, top_p=0.95, seed=7)
    c = run(loaded, "lookup", temperature=0.9, top_p=0.95, seed=8)
    assert [r["output_ids"] for r in a] == [r["output_ids"] for r in b]
    assert [r["output_ids"] for r in a] != [r["output_ids"] for r in c]


def test_over_long_max_new_tokens_names_the_argument(loaded):
    with pytest.raises(api.ArgumentError) as info:
        run(loaded, "ar", max_new_tokens=150)  # the longest prompt has 31 tokens, max positions 160
    assert info.value.argument == "max_new_tokens" and "160" in str(info.value)


@pytest.mark.slow
def test_cli_writes_rows_and_hf_matches_ar_in_float32(tmp_path):
    """The real embedded model through the CLI: hf and ar agree token for token in float32."""
    pytest.importorskip("gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Name three colours.", "id": "c"}\n{"prompt": "Say hi."}\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRITON_INTERPRET="0")  # as users run it: no interpreter
    out = {}
    for method in ("hf", "ar"):
        path = tmp_path / f"{method}.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "glide", "generate", "--method", method, "--prompts", str(prompts),
             "--max-new-tokens", "12", "--dtype", "float32", "--batch-size", "2", "--out", str(path)],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["c", 1]
        assert all(set(r) == FIELDS and 1 <= r["new_tokens"] <= 12 for r in rows)
        out[method] = [r["output_ids"] for r in rows]
    assert out["hf"] == out["ar"]


class PairTokenizer(ByteTokenizer):
    """Every character takes two tokens; half a character decodes as U+FFFD, as with UTF-8."""

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]
        text = "".join(chr(0x1F400 + (a * 7 + b) % 64) for a, b in zip(ids[::2], ids[1::2]))
        return text + ("\ufffd" if len(ids) % 2 else "")


def test_streaming_never_shows_half_characters(loaded):
    model, _ = loaded
    pieces = []
    (row,) = api.generate(["hello"], method="ar", max_new_tokens=10, loaded=(model, PairTokenizer()),
                          on_text=lambda i, s: pieces.append(s))
    assert len(pieces) == 5 and "".join(pieces) == row["output_text"] and "\ufffd" not in row["output_text"]


def test_rows_carry_their_batch_and_its_wall_time(loaded):
    rows = run(loaded, "ar", batch_size=2)
    assert [r["batch"] for r in rows] == [0, 0, 1]
    assert rows[0]["batch_seconds"] == rows[1]["batch_seconds"] == max(r["seconds"] for r in rows[:2])
    assert rows[2]["batch_seconds"] == rows[2]["seconds"]


def test_cli_summary_reports_batch_throughput_from_wall_time():
    from glide.cli import summary

    # four prompts decoded together in 2 s, ten tokens each: 20 tokens/s, not 5
    rows = [{"new_tokens": 10, "target_forwards": 9, "seconds": 2.0, "batch": 0, "batch_seconds": 2.0}
            for _ in range(4)]
    line = summary("ar", rows)
    assert "40 new tokens" in line and "20.0 tokens/s decode" in line and "1 batch(es)" in line
    assert "5.0 tokens/s per sequence" in line and "1.00 tokens per target forward" in line
    # one prompt a batch: throughput is the plain rate and no per-sequence figure is added
    single = [{"new_tokens": 10, "target_forwards": 9, "seconds": 2.0, "batch": i, "batch_seconds": 2.0}
              for i in range(2)]
    line = summary("ar", single)
    assert "5.0 tokens/s decode" in line and "per sequence" not in line


def test_a_prompt_too_long_for_the_model_is_named(loaded):
    long_prompt = api.Prompt("x" * 170, id="big")  # 170 tokens; the model has 160 positions
    with pytest.raises(api.ArgumentError) as info:
        api.generate([PROMPTS[0], long_prompt], method="ar", loaded=loaded, max_new_tokens=4)
    assert info.value.argument == "prompts" and "'big'" in str(info.value) and "160" in str(info.value)
    with pytest.raises(api.ArgumentError) as info:  # fits alone, not with the new tokens
        api.generate([api.Prompt("x" * 150, id="mid")], method="ar", loaded=loaded, max_new_tokens=20)
    assert info.value.argument == "max_new_tokens" and "'mid'" in str(info.value)
    assert "max_new_tokens <= 9" in str(info.value)
