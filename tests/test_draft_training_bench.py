"""bench.draft_training collects training and validation logs (resumed steps once) and plots them."""

import json

import pytest

from bench.draft_training import collect


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collect_keeps_the_last_row_of_each_step_and_the_validation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    step = lambda k, loss: {"step": k, "loss": loss, "top1": 0.1 * k, "tokens": 10 * k, "seconds": float(k)}
    # a resumed run wrote steps 2 and 3 twice: the later rows count
    _write(run / "log.jsonl", [step(1, 5.0), step(2, 9.0), step(3, 9.0), step(2, 4.0), step(3, 3.0)])
    _write(run / "val.jsonl", [{"step": 0, "loss": 6.0, "top1": 0.1}, {"step": 3, "loss": 4.5, "top1": 0.3}])
    rows, logs, vals = collect({"a": run})
    assert [r["loss"] for r in logs["a"]] == [5.0, 4.0, 3.0]
    assert rows[0]["steps"] == 3 and rows[0]["loss_last50"] == pytest.approx(4.0)
    assert rows[0]["val_loss"] == 4.5 and rows[0]["val_top1"] == 0.3 and [v["step"] for v in vals["a"]] == [0, 3]
    (run / "val.jsonl").unlink()
    rows, _, vals = collect({"a": run})
    assert rows[0]["val_loss"] is None and vals["a"] == []
    with pytest.raises(ValueError, match="no training log"):
        collect({"b": tmp_path / "missing"})


def test_training_plot_draws_validation_lines(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.plot import plot_training

    log = [{"step": k, "loss": 5.0 - 0.1 * k, "top1": 0.01 * k} for k in range(1, 20)]
    data = {"runs": {"a": log, "b": log}, "validation": {"a": [{"step": 0, "loss": 6.0, "top1": 0.0},
                                                               {"step": 19, "loss": 4.0, "top1": 0.2}]}}
    labels = []
    real_save = plt.Figure.savefig

    def keep(fig, *a, **k):
        labels.append(sorted(line.get_label() for line in fig.axes[0].get_lines()))
        return real_save(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    out = plot_training(data, tmp_path)
    assert out and out[0].exists()
    assert labels == [["a", "a (validation)", "b"]]
