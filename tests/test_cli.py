"""Bad input to ``glide generate`` and to :func:`glide.api.generate`: a clear error that names the
argument, exit status 2, and no traceback. None of these cases loads a model."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from glide import api
from glide.cli import build_parser, main


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


BAD = [
    (["--prompt", "hi", "--method", "beam"], "--method"),
    (["--prompt", "hi", "--temperature", "-0.5"], "--temperature"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--prompt", "hi", "--batch-size", "0"], "--batch-size"),
    (["--prompt", "hi", "--dtype", "float8"], "--dtype"),
    (["--prompt", "hi", "--device", "tpu"], "--device"),
    (["--prompt", "   "], "--prompt"),
    (["--prompt", "hi", "--model", "/nonexistent/model.gguf"], "--model"),
    (["--prompt", "hi", "--method", "glide", "--draft", "/nonexistent/draft.pt"], "--draft"),
    (["--prompt", "hi", "--method", "ar", "--draft", "."], "--draft"),
    (["--prompts", "/nonexistent/prompts.jsonl"], "--prompts"),
    (["--prompt", "hi", "--method", "glide", "--no-fallback"], "--no-fallback"),
    (["--prompt", "hi", "--method", "glide", "--lookup", "3"], "--lookup"),
    (["--prompt", "hi", "--method", "glide", "--tree", "dynamic", "--lookup", "-2"], "--lookup"),
    (["--prompt", "hi", "--out", "/nonexistent/dir/out.jsonl"], "--out"),
    (["--prompt", "hi", "--method", "cape", "--sample-draft"], "--sample-draft"),
    (["--prompt", "hi", "--method", "glide", "--tree", "dynamic", "--sample-draft"], "--sample-draft"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_names_flag(capsys, argv, flag):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert flag in err, err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_cuda(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--device", "cuda")
    assert code == 2 and "--device" in err and "CUDA" in err


@pytest.mark.parametrize("bins", ["1,2", "0,1,1,1,1,1,1,1,1,1,1", "a,b", "99,1,1,1,1,1,1,1,1,1,1"])
def test_bad_bins_name_the_flag(capsys, bins):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--method", "cape", "--bins", bins)
    assert code == 2 and "argument --bins" in err and "Traceback" not in err


def test_bins_need_cape(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--method", "glide", "--bins", "2,2,2,2,2,2,2,2,2,2,2")
    assert code == 2 and "argument --bins" in err


def test_glide_with_a_bad_draft_names_the_flag(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    for draft in (str(tmp_path), str(tmp_path / "missing")):
        for method in ("glide", "cape"):
            code, _, err = run_cli(capsys, "--prompt", "hi", "--method", method, "--draft", draft)
            assert code == 2 and "argument --draft" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: not valid JSON"),
        ('{"prompt": "a"}\n{"id": 3}\n', ":2: the row has no 'prompt'"),
        ('{"prompt": ""}\n', ":1: 'prompt' must be a non-empty string"),
        ("\n\n", "holds no prompts"),
        ('["prompt"]\n', ":1: the row has no 'prompt'"),
    ],
)
def test_bad_prompts_file(capsys, tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    code, _, err = run_cli(capsys, "--prompts", str(path))
    assert code == 2 and "--prompts" in err and needle in err, err


def test_unreadable_prompts_file(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run_cli(capsys, "--prompts", str(path))
    assert code == 2 and "--prompts" in err and "cannot read" in err


def test_read_prompts_keeps_ids_and_order(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "id": "a"}) + "\n\n" + json.dumps({"prompt": "y"}) + "\n")
    got = api.read_prompts(path)
    assert [(p.text, p.id) for p in got] == [("x", "a"), ("y", 1)]


def test_missing_prompt_source_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--method", "ar"])
    assert info.value.code == 2
    assert "--prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(method="nope"), "method"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(dtype="int8"), "dtype"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(seed="x"), "seed"),
    ],
)
def test_api_errors_name_the_argument(kwargs, name):
    with pytest.raises(api.ArgumentError) as info:
        api.generate(["hello"], **kwargs)
    assert info.value.argument == name and str(info.value).startswith(name)


def test_api_rejects_empty_prompt_list():
    with pytest.raises(api.ArgumentError, match="prompts"):
        api.generate([])


def test_cli_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "glide", "generate", "--prompt", "hi", "--temperature", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_out_is_a_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--out", str(tmp_path))
    assert code == 2 and "--out" in err and "is a directory" in err


def test_corrupt_model_names_the_flag(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file")
    out = tmp_path / "o.jsonl"
    code, _, err = run_cli(capsys, "--prompt", "hi", "--model", str(bad), "--out", str(out))
    assert code == 2 and "argument --model" in err and "Traceback" not in err
    assert not out.exists()  # no empty results file left behind


# ----------------------------------------------------------------------------- first-run experience


def _subparser(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["generate", "train-draft"])
def test_every_option_has_help_and_shows_its_default(command):
    for action in _subparser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {flag} has no help text"
        if action.default not in (None, False):
            assert f"(default: " in action.help, f"{command} {flag} hides its default {action.default!r}"


def test_generate_help_lists_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for needle in ["--max-new-tokens N at most", "(default: 64)", "(default: ar)", "(default: 0)",
                   "(default: 1.0", "(default: 1)", "(default: 4)", "(default: bfloat16)",
                   "cpu or cuda (default: cuda when available, else cpu)"]:
        assert needle in out, needle
    assert "(default: None)" not in out


class _Stop(Exception):
    """Raised by a stand-in for the slow part, once the arguments are known."""


def _record_generate(monkeypatch):
    seen = {}

    def fake(prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        raise _Stop

    monkeypatch.setattr(api, "generate", fake)
    return seen


@pytest.mark.parametrize("cuda", [True, False])
def test_device_defaults_to_cuda_when_available(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    want = torch.device("cuda" if cuda else "cpu")
    assert api.resolve_device(None) == want
    assert api.resolve_device("cpu") == torch.device("cpu")
    # the API's default reaches the loader as that device
    got = {}

    def fake_load(method, model_path, device, dtype, tokenizer=None):
        got["device"] = device
        raise _Stop

    monkeypatch.setattr(api, "load", fake_load)
    with pytest.raises(_Stop):
        api.generate(["hi"])
    assert got["device"] == want
    # the CLI leaves the choice to the API
    seen = _record_generate(monkeypatch)
    with pytest.raises(_Stop):
        main(["generate", "--prompt", "hi"])
    assert seen["device"] is None


def test_prompts_file_with_a_byte_order_mark(tmp_path, capsys, monkeypatch):
    path = tmp_path / "p.jsonl"
    path.write_text('\ufeff{"prompt": "x", "id": "a"}\n{"prompt": "y"}\n', encoding="utf-8")
    assert [(p.text, p.id) for p in api.read_prompts(path)] == [("x", "a"), ("y", 1)]
    seen = _record_generate(monkeypatch)
    with pytest.raises(_Stop):
        main(["generate", "--prompts", str(path)])
    assert [p.text for p in seen["prompts"]] == ["x", "y"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_out_in_a_folder_that_refuses_files(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--out", "/proc/x.jsonl")
    assert code == 2 and "argument --out" in err
    assert "cannot create /proc/x.jsonl" in err and "the folder /proc exists" in err, err
    assert "(the system says: " in err  # the OS's reason, whatever it is
    assert "does not exist" not in err


@pytest.mark.parametrize("argv,note", [
    (["--top-p", "0.9"], True),
    (["--top-p", "0.9", "--temperature", "0"], True),
    (["--top-p", "0.9", "--temperature", "0.7"], False),
    (["--temperature", "0"], False),
    ([], False),
])
def test_top_p_at_temperature_zero_is_noted(capsys, monkeypatch, argv, note):
    seen = _record_generate(monkeypatch)
    with pytest.raises(_Stop):
        main(["generate", "--prompt", "hi", *argv])
    err = capsys.readouterr().err
    msg = "glide generate: note: --top-p has no effect at --temperature 0 (greedy decoding)"
    assert err.count(msg) == (1 if note else 0), err
    assert seen["top_p"] == (0.9 if "--top-p" in argv else 1.0)  # noted, not changed


def test_a_bad_top_p_is_an_error_not_a_note(capsys):
    code, _, err = run_cli(capsys, "--prompt", "hi", "--top-p", "0")
    assert code == 2 and "argument --top-p" in err and "note:" not in err
