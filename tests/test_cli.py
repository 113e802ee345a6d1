"""Bad input to ``glide generate`` and to :func:`glide.api.generate`: a clear error that names the
argument, exit status 2, and no traceback. None of these cases loads a model."""

import json
import subprocess
import sys

import pytest
import torch

from glide import api
from glide.cli import main


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
    (["--prompt", "hi", "--out", "/nonexistent/dir/out.jsonl"], "--out"),
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
