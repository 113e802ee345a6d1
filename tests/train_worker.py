"""A tiny training run for the resume and DDP tests, as its own process:

    python tests/train_worker.py DIR RUN_NAME [STEPS]          # one process
    torchrun --nproc-per-node 2 tests/train_worker.py DIR RUN   # data-parallel (gloo)

The target, corpus and features are rebuilt identically from fixed seeds (the features only
once, into DIR/features). The final weights go to DIR/RUN/draft.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from glide_helpers import self_distilled_corpus, tiny_target  # noqa: E402

# float32: one process and two ranks then differ only by the order of the gradient sums
SETTINGS = dict(batch_size=4, epochs=6, lr=3e-3, warmup_steps=4, save_every=3, draft_vocab_size=5, bf16=False)


def main():
    import torch.distributed as dist

    from glide.train.features import build_features, open_features
    from glide.train.trainer import TrainSettings, train_draft

    torch.set_num_threads(1)
    root, run = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    target = tiny_target(seed=3, vocab=7, std=0.6, dtype=torch.float32, eos=())
    samples = self_distilled_corpus(target, n=24)
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(f"{root}/features/meta.json"):
        build_features(target, samples, f"{root}/features", topk=4, progress=False)
    if world > 1:
        dist.barrier()
    summary = train_draft(target, samples, open_features(f"{root}/features"), f"{root}/{run}",
                          TrainSettings(**SETTINGS), max_steps=steps, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        print("SUMMARY", summary, flush=True)
    if world > 1:
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()
        from glide.train.command import leave_rank

        leave_rank()  # a gloo rank can abort in interpreter shutdown (see leave_rank)


if __name__ == "__main__":
    main()
