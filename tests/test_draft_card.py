"""The draft card lists every training stage of a continued draft, oldest first."""

from bench.draft_card import render, stages


def _stage(lr, steps, seconds, samples, prior=None, val=None):
    card = {"training": {"loss": "kl", "epochs": 2.0, "lr": lr, "warmup_steps": 10, "init": "random",
                         "batch_size": 8, "gamma": 4, "bf16": True, "seed": 0},
            "result": {"steps": steps, "seconds": seconds, "loss": 3.0, "top1": 0.5, **(val or {})},
            "corpus": {"samples": samples, "tokens": 100, "response_tokens": 60}, "hardware": "cpu"}
    if prior is not None:
        card["prior"] = prior
    return card


def test_card_lists_each_stage_and_the_totals():
    first = _stage(0.003, 100, 600, 24)
    second = _stage(0.001, 50, 300, 47, prior=first, val={"val_loss": 2.5, "val_top1": 0.6})
    assert stages(second) == [first, second] and stages({}) == []
    config = {"config": {"num_layers": 1, "cross_attention": True, "draft_vocab": [1, 2, 3],
                         "target": {"vocab_size": 9}}, "card": second}
    text = render(config, None, "glide", notes=["corpus: 10 min"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    assert rows[0].startswith("| 1 | `random` init | 24 |") and "0.003 (10)" in rows[0] and rows[0].endswith("| - | - |")
    assert rows[1].startswith("| 2 | stage 1 | 47 |") and rows[1].endswith("| 2.5 | 0.6 |")
    assert "All stages: 150 steps, 15.0 min" in text and "- corpus: 10 min" in text
    assert "head cut to 3 most frequent" in text


def test_card_shows_the_shipped_calibration():
    import torch

    from glide.draft.dynamic import Calibration

    greedy, sampled = Calibration(), Calibration()
    greedy.add(torch.tensor([0.95, 0.95, 0.25]), torch.tensor([True, False, True]))
    sampled.add(torch.tensor([0.25]), torch.tensor([False]))
    body = {"info": {"prompts": 32, "corpus_shard": 79, "max_new_tokens": 128},
            "tables": {"greedy": greedy.to_dict(), "sampled": sampled.to_dict()}}
    config = {"config": {"num_layers": 1, "cross_attention": True, "draft_vocab": None,
                         "target": {"vocab_size": 9}}, "card": _stage(0.001, 10, 60, 8)}
    text = render(config, None, "glide", calibration=body)
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert rows == ["| 0.20-0.30 | 1 | 0.250 | 1.000 | 1 | 0.250 | 0.000 |",
                    "| 0.90-1.00 | 2 | 0.950 | 0.500 | - | - | - |"]
    assert "32 prompts of corpus shard 79" in text
    assert "Calibration" not in render(config, None, "glide")


def test_card_says_which_user_turns_the_corpus_answered():
    config = {"config": {"num_layers": 1, "cross_attention": True, "draft_vocab": None,
                         "target": {"vocab_size": 9}}, "card": _stage(0.001, 10, 60, 47)}
    assert "47 self-distilled ShareGPT prompts (each conversation's first user turn," in render(config, None, "glide")
    config["card"]["corpus"]["later_turns"] = 7
    text = render(config, None, "glide")
    assert "47 self-distilled ShareGPT prompts (40 conversations' first user turns and 7 later user turns" in text
