"""The Python API behind ``glide generate``.

>>> from glide.api import generate
>>> rows = generate(["Tell me a story about a fox."], method="ar", max_new_tokens=32)
>>> rows[0]["output_text"]

Every row holds ``id``, ``output_ids`` (new tokens only), ``output_text``, ``new_tokens``,
``target_forwards`` (target forward passes after the prefill), ``mean_accepted`` (tokens
produced per target forward after the prefill; exactly 1.0 for ``ar``), ``seconds`` (decode
wall time, prefill excluded), ``tokens_per_s`` (``new_tokens / seconds``, that sequence's own
rate), ``batch`` (which batch of ``batch_size`` prompts it was decoded in) and ``batch_seconds``
(that batch's decode wall time: the batch's throughput is its rows' ``new_tokens`` over it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

METHODS = ("hf", "ar", "lookup", "glide", "cape")
"""``hf``: transformers' ``generate()``; ``ar``: our runner, one token a step; ``lookup``: our
runner with a prompt-lookup n-gram draft; ``glide``: the GliDe draft's chain; ``cape``: the chain
expanded by CaPE into a tree."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda")


class ArgumentError(ValueError):
    """A bad argument. ``argument`` names it as the Python API spells it."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.detail = message


@dataclass
class Prompt:
    """One user message (the chat template is applied later) and its id."""

    text: str
    id: str | int


# ----------------------------------------------------------------------------- validation


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ArgumentError("method", f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_sampling(temperature: float, top_p: float) -> None:
    """The engine's own rule (:func:`glide.speculative.verify.check_sampling`), as an ArgumentError."""
    from glide.speculative.verify import check_sampling as engine_rule

    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentError(name, f"must be a number, got {value!r}")
    try:
        engine_rule(temperature, top_p)
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")
        raise ArgumentError(name, rest) from None


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """The drafts' count rule (:func:`glide.speculative.drafts.check_count`), as an
    ArgumentError naming ``name``."""
    from glide.speculative.drafts import check_count

    try:
        return check_count(name, value, minimum)
    except ValueError as exc:
        raise ArgumentError(name, str(exc).removeprefix(f"{name} ")) from None


def resolve_device(device: str | None) -> torch.device:
    """``cuda`` or ``cpu``; ``None`` picks ``cuda`` when this machine has it, else ``cpu``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ArgumentError("device", f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("device", "cuda was asked for but this machine has no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The fastest correct dtype by default: bfloat16 on both CPU (avx512_bf16) and CUDA."""
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ArgumentError("dtype", f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ArgumentError("dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_prompts(prompts: Sequence[str | Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ArgumentError("prompts", "no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = p if isinstance(p, Prompt) else Prompt(text=p, id=i)
        if not isinstance(p.text, str):
            raise ArgumentError("prompt", f"prompt {p.id!r} must be a string, got {type(p.text).__name__}")
        if not p.text.strip():
            raise ArgumentError("prompt", f"prompt {p.id!r} is empty")
        out.append(p)
    return out


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a JSONL prompts file: one object a line with ``prompt`` and an optional ``id``.

    Blank lines are skipped. Errors name the argument ``prompts_file`` and the line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ArgumentError("prompts_file", f"no such file: {path}")
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a leading BOM (Windows editors) is dropped
            lines = fh.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArgumentError("prompts_file", f"cannot read {path}: {exc}") from None
    prompts = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ArgumentError("prompts_file", f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ArgumentError("prompts_file", f"{path}:{lineno}: the row has no 'prompt' field")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ArgumentError("prompts_file", f"{path}:{lineno}: 'prompt' must be a non-empty string")
        prompts.append(Prompt(text=row["prompt"], id=row.get("id", len(prompts))))
    if not prompts:
        raise ArgumentError("prompts_file", f"{path} holds no prompts")
    return prompts


def check_path(name: str, path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArgumentError(name, f"no such file or directory: {path}")
    return path


# ----------------------------------------------------------------------------- generation


def encode_chat(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as one user turn of the chat template, ready for the reply."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def eos_ids(config, tokenizer) -> tuple[int, ...]:
    ids = set()
    for src in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, Iterable):
            ids.update(int(x) for x in src)
    return tuple(sorted(ids))


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


DRAFT_METHODS = ("glide", "cape")


def check_draft_applies(method: str, draft_path: str | None) -> str | None:
    """Check ``draft`` against ``method`` before any slow load; return the draft folder to use.

    ``glide`` takes ``draft_path`` or the draft shipped for the embedded model; its config is
    read here, so a missing or corrupt draft fails before the target is loaded.
    """
    if method not in DRAFT_METHODS:
        if draft_path is not None:
            raise ArgumentError("draft", f"method {method!r} takes no draft; --draft is for glide and cape")
        return None
    from glide.draft.checkpoint import default_draft_path, read_draft_config

    path = draft_path if draft_path is not None else default_draft_path()
    if draft_path is None and not os.path.isdir(path):
        raise ArgumentError("draft", f"no draft is shipped at {path}; train one with `glide train-draft` "
                                     "and pass it with --draft")
    try:
        read_draft_config(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ArgumentError("draft", str(exc).removeprefix("draft: ")) from None
    return path


TREES = ("chain", "cape", "dynamic")


def make_draft(method: str, draft_path: str | None, model, gamma: int = 4, bins=None, tree=None,
               temperature: float = 0.0, fallback: bool = True, lookup: int | None = None,
               ngrams: bool = True, sample_draft: bool = False):
    """The draft for ``method``; ``None`` for the target-only methods.

    The dynamic tree sizes itself with the calibration the draft folder ships for
    ``temperature`` (``calibration.json``, see :func:`glide.draft.dynamic.load_calibration`),
    or with the draft's raw probabilities when it ships none; ``fallback`` lets it pause
    drafting where drafting does not pay; ``lookup`` (``None``: the tree's default) is the
    number of prompt-lookup tokens it merges into its candidates; with ``ngrams`` it also
    reads the corpus n-gram table the draft folder ships (``ngrams.npz``), if any;
    ``sample_draft`` makes the glide chain sample its tokens (:class:`glide.draft.GlideDraft`).

    Raises
    ------
    ArgumentError
        Naming ``draft`` when the draft does not fit ``model``.
    """
    path = check_draft_applies(method, draft_path)
    if method == "lookup":
        from glide.speculative.drafts import PromptLookupDraft

        return PromptLookupDraft()
    if method in DRAFT_METHODS:
        from glide.draft import CapeDraft, GlideDraft, load_draft
        from glide.draft.cape import PAPER_BINS

        try:
            net = load_draft(path, model)
        except (FileNotFoundError, ValueError) as exc:
            raise ArgumentError("draft", str(exc).removeprefix("draft: ")) from None
        tree = tree or ("chain" if method == "glide" else "cape")
        if tree == "dynamic":
            from glide.draft.dynamic import LOOKUP, DynamicTreeDraft, load_calibration, load_ngrams

            lookup = LOOKUP if lookup is None else lookup
            try:
                calibration = load_calibration(path, temperature)
                table = load_ngrams(path, model.config.vocab_size) if ngrams and lookup else None
            except ValueError as exc:
                raise ArgumentError("draft", str(exc).removeprefix("draft: ")) from None
            return DynamicTreeDraft(net, calibration=calibration, fallback=fallback, lookup=lookup,
                                    ngrams=table)
        if tree == "chain":
            return GlideDraft(net, gamma=gamma, sample=sample_draft)
        return CapeDraft(net, gamma=gamma, bins=PAPER_BINS if bins is None else bins)
    return None


def check_prompt_lengths(items, encoded, max_new_tokens: int, reserve: int, limit: int) -> None:
    """Each prompt's tokens, plus ``max_new_tokens`` and ``reserve`` verification slots, must fit
    the model's ``limit`` positions; the error names the prompt.

    Raises
    ------
    ArgumentError
        Naming ``prompts`` for a prompt that leaves no room for a new token, else
        ``max_new_tokens``; the message names the prompt's id.
    """
    for p, ids in zip(items, encoded):
        need = len(ids) + max_new_tokens + reserve
        if need <= limit:
            continue
        extra = f" and {reserve} verification slot(s)" if reserve else ""
        if len(ids) + reserve + 1 > limit:  # no max_new_tokens would do: the prompt is at fault
            raise ArgumentError(
                "prompts",
                f"prompt {p.id!r} is too long: it has {len(ids)} tokens and the model has {limit} "
                f"positions (room is needed for at least one new token{extra}); shorten it",
            )
        raise ArgumentError(
            "max_new_tokens",
            f"prompt {p.id!r} has {len(ids)} tokens; with max_new_tokens={max_new_tokens}{extra} it "
            f"needs {need} positions, the model has {limit}; use max_new_tokens <= "
            f"{limit - len(ids) - reserve} for this prompt",
        )


def check_bins(bins):
    """CaPE's bin table (``None``: the paper's), as an ArgumentError naming ``bins``."""
    if bins is None:
        return None
    from glide.draft.cape import check_bins as rule

    try:
        return rule(bins)
    except ValueError as exc:
        raise ArgumentError("bins", str(exc).removeprefix("bins ")) from None


def generate(
    prompts: Sequence[str | Prompt],
    method: str = "ar",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 1,
    model: str | None = None,
    draft: str | None = None,
    gamma: int = 4,
    bins=None,
    tree: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    cuda_graphs: bool | None = None,
    progress: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    loaded=None,
    fallback: bool = True,
    lookup: int | None = None,
    ngrams: bool = True,
    sample_draft: bool = False,
) -> list[dict]:
    """Generate a reply to each prompt with ``method``.

    Parameters
    ----------
    prompts : sequence of str or Prompt
        User messages; the model's chat template is applied.
    method : {"hf", "ar", "lookup", "glide", "cape"}
    max_new_tokens : int
        At most this many new tokens a prompt (EOS ends a reply earlier).
    temperature : float
        0 is greedy; > 0 samples from the target's distribution (lossless for every method).
    top_p : float in (0, 1]
    seed : int
        With temperature > 0, prompt ``i`` (its position in ``prompts``) samples from the
        stream ``(seed, i)``: the same on any batch size and with any method but ``hf``, whose
        transformers sampler is seeded once a batch.
    batch_size : int
        Prompts decoded together.
    model : str, optional
        A transformers checkpoint directory or GGUF file; the embedded SmolLM2-135M-Instruct by
        default.
    draft : str, optional
        A GliDe draft folder (``glide``, ``cape``); the draft shipped for the embedded model by
        default.
    gamma : int
        Draft tokens per step (``glide``; the spine of ``cape``).
    bins : sequence of int or str, optional
        ``cape``: candidates per depth by ``floor(10 * confidence)``; the paper's
        ``8,8,8,6,6,6,4,4,2,2,2,2`` by default.
    tree : {"chain", "cape", "dynamic"}, optional
        The draft tree for ``glide``/``cape``: ``chain`` (``glide``'s default), ``cape``
        (``cape``'s default), or ``dynamic``: a best-first tree sized by the verify cost
        measured on this device (:mod:`glide.draft.dynamic`).
    device : {"cpu", "cuda"}, optional
        ``cuda`` when this machine has it, else ``cpu``, by default.
    dtype : {"float32", "bfloat16", "float16"} or torch.dtype, optional
    cuda_graphs : bool, optional
        Replay the target's decode and verification forwards from CUDA graphs
        (:mod:`glide.model.graphs`). ``None`` turns them on for ``device="cuda"``; ``True`` on
        the CPU is an error naming ``cuda_graphs``. Not used by ``hf``.
    progress : bool
        Show a progress bar over the prompts (on stderr).
    on_text : callable(prompt_index, text_piece), optional
        Streams decoded text as it is produced (``ar`` and speculative methods).
    loaded : tuple, optional
        ``(model, tokenizer)`` already loaded by :func:`load`, to reuse across calls.
    fallback : bool
        ``dynamic`` only: while drafted steps, as timed, emit fewer tokens per second than
        plain one-token steps (by a 10% margin), decode without drafting for a pause that
        doubles while drafting keeps losing, as on this CPU at batch 4. ``False`` drafts at
        every step.
    lookup : int, optional
        ``dynamic`` only: up to this many prompt-lookup tokens (the continuation of the last
        earlier occurrence of the sequence's last tokens) merged into the tree's candidates,
        ranked by their measured acceptance beside the draft's; ``0`` turns it off. ``None``:
        the tree's default (:class:`glide.draft.dynamic.DynamicTreeDraft`).
    ngrams : bool
        ``dynamic`` with lookup only: where a sequence's history has no continuation, take one
        from the corpus n-gram table the draft ships (``ngrams.npz``, if any). ``False``: never.
    sample_draft : bool
        ``glide`` with its chain only, when sampling (``temperature`` > 0): the draft samples its
        tokens and the target accepts each with ``min(1, p/q)`` (the residual rule), which
        accepts more often than checking the draft's argmax; equally exact, but a seed then no
        longer reproduces ``ar``'s sample token for token. No effect when greedy.

    Returns
    -------
    list of dict
        One row a prompt, in input order (see the module docstring for the fields).
    """
    check_method(method)
    check_sampling(temperature, top_p)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("batch_size", batch_size)
    check_positive_int("gamma", gamma)
    bins = check_bins(bins)
    if tree is not None and (tree not in TREES or method not in DRAFT_METHODS):
        raise ArgumentError("tree", f"must be one of {', '.join(TREES)} with method glide or cape, "
                                    f"got {tree!r} with method {method!r}")
    if not isinstance(fallback, bool):
        raise ArgumentError("fallback", f"must be True or False, got {fallback!r}")
    if not fallback and tree != "dynamic":
        raise ArgumentError("fallback", f"only the dynamic tree pauses drafting; got tree {tree!r}")
    if lookup is not None:
        check_positive_int("lookup", lookup, minimum=0)
        if tree != "dynamic":
            raise ArgumentError("lookup", f"only the dynamic tree merges prompt lookup; got tree {tree!r}")
    if not isinstance(ngrams, bool):
        raise ArgumentError("ngrams", f"must be True or False, got {ngrams!r}")
    if not ngrams and tree != "dynamic":
        raise ArgumentError("ngrams", f"only the dynamic tree reads the n-gram table; got tree {tree!r}")
    if not isinstance(sample_draft, bool):
        raise ArgumentError("sample_draft", f"must be True or False, got {sample_draft!r}")
    if sample_draft and (method != "glide" or tree not in (None, "chain")):
        raise ArgumentError("sample_draft", f"only the glide chain samples its draft tokens; got method "
                                            f"{method!r} with tree {tree!r}")
    if bins is not None and (method != "cape" or tree not in (None, "cape")):
        raise ArgumentError("bins", f"method {method!r} takes no bins; --bins is for cape trees")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError("seed", f"must be an integer, got {seed!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ArgumentError("cuda_graphs", f"must be True, False or None, got {cuda_graphs!r}")
    if cuda_graphs and dev.type != "cuda":
        raise ArgumentError("cuda_graphs", f"CUDA graphs need device cuda, got {dev.type}")
    items = check_prompts(prompts)
    model_path = check_path("model", model)
    draft_path = check_path("draft", draft)
    check_draft_applies(method, draft_path)  # before a slow load
    from glide.threads import cpu_snapshot, fit_threads

    cpu_start = cpu_snapshot()  # fit_threads measures the other processes' load from here on
    tok = encoded = None
    if loaded is None:  # prompts that cannot fit fail before the weights load, where we can tell
        from glide.model.load import peek_tokenizer

        peek = peek_tokenizer(model_path, dt)
        if peek is not None:
            tok, limit = peek
            encoded = [encode_chat(tok, p.text) for p in items]
            check_prompt_lengths(items, encoded, max_new_tokens, 0 if method == "hf" else 1, limit)

    target, tokenizer = loaded if loaded is not None else load(method, model_path, dev, dt, tokenizer=tok)
    if tokenizer is None:
        raise ArgumentError("model", f"{model_path} has no tokenizer files; glide generate needs one")
    config = target.config
    if encoded is None or tokenizer is not tok:
        encoded = [encode_chat(tokenizer, p.text) for p in items]
    draft_obj = None if method == "hf" else make_draft(method, draft_path, target, gamma, bins, tree, temperature, fallback,
                                                          lookup, ngrams, sample_draft)
    # our engine also reserves room for one verification tree past the last token (and a
    # GliDe draft for its own cache's scratch rows)
    from glide.speculative.engine import room

    reserve = 0 if method == "hf" else room(draft_obj)
    check_prompt_lengths(items, encoded, max_new_tokens, reserve, int(config.max_position_embeddings))
    eos = eos_ids(config, tokenizer)

    fit_threads(dev, since=cpu_start)  # on a CPU, use the cores others leave free (glide/threads.py)
    rows: list[dict] = [None] * len(items)  # type: ignore[list-item]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"glide {method}", unit="prompt")
    order = list(range(len(items)))
    for batch_index, chunk in enumerate(_batches(order, batch_size)):
        ids = [encoded[i] for i in chunk]
        if method == "hf":
            outs = _hf_generate(target, ids, max_new_tokens, temperature, top_p, seed, eos, tokenizer, chunk)
        else:
            outs = _our_generate(target, ids, draft_obj, max_new_tokens, temperature, top_p, seed, eos,
                                 tokenizer, on_text, chunk, cuda_graphs)
        batch_seconds = max(float(out.seconds) for out in outs)  # the batch's decode wall time
        for i, out in zip(chunk, outs):
            rows[i] = _row(items[i], out, tokenizer)
            rows[i]["batch"] = batch_index
            rows[i]["batch_seconds"] = batch_seconds
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return rows


def load(method: str, model_path: str | None, device: torch.device, dtype: torch.dtype, tokenizer=None):
    """Load the target for ``method``: transformers' model for ``hf``, ours otherwise.
    ``tokenizer``, when already read, is used instead of reading it again."""
    from glide.model.load import load_hf, load_model

    loader = load_hf if method == "hf" else load_model
    return loader(model_path, dtype=dtype, device=device, tokenizer=tokenizer)


@dataclass
class _Out:
    output_ids: list[int]
    target_forwards: int
    seconds: float


def _row(prompt: Prompt, out, tokenizer) -> dict:
    ids = list(out.output_ids)
    n = len(ids)
    fw = int(out.target_forwards)
    secs = float(out.seconds)
    return {
        "id": prompt.id,
        "output_ids": ids,
        "output_text": tokenizer.decode(ids, skip_special_tokens=True),
        "new_tokens": n,
        "target_forwards": fw,
        # the first new token comes from the prefill; the rest from target_forwards passes
        "mean_accepted": (n - 1) / fw if fw > 0 else float("nan"),
        "seconds": secs,
        "tokens_per_s": n / secs if secs > 0 else float("nan"),
    }


def _our_generate(target, ids, draft, max_new_tokens, temperature, top_p, seed, eos, tokenizer,
                  on_text, chunk, cuda_graphs=None):
    from glide.speculative.engine import generate_ids

    on_tokens = None
    if on_text is not None:
        sent = {b: [] for b in range(len(ids))}
        shown = {b: "" for b in range(len(ids))}

        def on_tokens(b, new_ids):  # decode the whole reply so multi-token characters render
            sent[b].extend(int(t) for t in new_ids)
            text = tokenizer.decode(sent[b], skip_special_tokens=True)
            # a character split across tokens decodes as U+FFFD until its last byte arrives
            text = text.rstrip("\ufffd")
            if len(text) > len(shown[b]):
                on_text(chunk[b], text[len(shown[b]):])
                shown[b] = text

    return generate_ids(
        target, ids, draft, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        eos_token_ids=eos, seed=seed, row_ids=chunk, on_tokens=on_tokens, cuda_graphs=cuda_graphs,
    )


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (end of prefill)."""

    def __init__(self):
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt itself
            self.first = time.perf_counter()

    def end(self):
        pass


def _hf_generate(hf_model, ids, max_new_tokens, temperature, top_p, seed, eos, tokenizer, chunk):
    """transformers' ``generate()`` on a left-padded batch; decode time excludes the prefill.

    Its sampler draws from one global generator for the whole batch, so unlike our engine a
    prompt's sample depends on its batch: the generator is seeded from ``seed`` and the index
    of the batch's first prompt (``chunk[0]``), so that repeated prompts at least differ from
    batch to batch.
    """
    dev = next(hf_model.parameters()).device
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, width - len(x):] = torch.tensor(x)
        attn[b, width - len(x):] = 1
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=list(eos), pad_token_id=pad)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    from glide.speculative.verify import stream_keys

    torch.manual_seed(int(stream_keys(seed, [chunk[0]])[0]) & (2 ** 63 - 1))
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids=input_ids.to(dev), attention_mask=attn.to(dev), streamer=clock, **kwargs
        )
    end = time.perf_counter()
    decode_start = clock.first if clock.first is not None else start
    results = []
    for b in range(len(ids)):
        new = out[b, width:].tolist()
        cut = len(new)
        for j, t in enumerate(new):
            if t in eos:
                cut = j + 1
                break
        new = new[:cut]
        results.append(_Out(output_ids=new, target_forwards=max(len(new) - 1, 0),
                            seconds=end - decode_start))
    return results
