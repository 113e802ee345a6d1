"""glide.threads: CPU threads fitted to the cores that other processes leave free."""

import os

import pytest
import torch

from bench.hog import cpu_hog
from glide import threads


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("GLIDE_AUTO_THREADS", raising=False)
    monkeypatch.setattr(threads, "_LAST_FIT", [float("-inf"), None])
    yield
    torch.set_num_threads(before)


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _need_quiet_machine(quiet, most):
    """These tests watch the whole machine: skip, saying why, when other processes keep more
    than ``most`` cores busy (pytest-xdist workers, a training job)."""
    if quiet is not None and quiet > most:
        pytest.skip(f"other processes keep {quiet:.1f} of {_cores()} cores busy: needs a quieter machine")


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_a_busy_looping_process_is_seen():
    quiet = threads.others_busy_cores(0.3)
    _need_quiet_machine(quiet, _cores() - 1.5)  # room to see one more busy core
    with cpu_hog(1):
        threads.others_busy_cores(0.2)  # let it start
        busy = threads.others_busy_cores(0.3)
    assert quiet is not None and busy is not None
    assert busy - quiet > 0.5, (quiet, busy)


@pytest.mark.parametrize("busy, cores, initial, want", [
    (0.0, 2, 2, 2), (0.3, 2, 2, 2), (0.8, 2, 2, 1), (1.0, 2, 2, 1), (2.0, 2, 2, 1), (7.0, 2, 2, 1),
    (1.0, 16, 8, 8), (10.2, 16, 8, 6),
])
def test_threads_use_the_free_cores(monkeypatch, busy, cores, initial, want):
    monkeypatch.setattr(threads, "others_busy_cores", lambda window, since=None: busy)
    monkeypatch.setattr(threads, "_INITIAL_THREADS", initial)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert threads.fit_threads("cpu") == want
    assert torch.get_num_threads() == want


def test_the_users_choice_and_other_devices_are_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "others_busy_cores", lambda window, since=None: calls.append(1) or 1.0)
    torch.set_num_threads(2)
    assert threads.fit_threads("cuda") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.fit_threads("cpu") is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("GLIDE_AUTO_THREADS", "0")
    assert threads.fit_threads("cpu") is None
    assert calls == [] and torch.get_num_threads() == 2


def test_a_recent_measurement_is_reused(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "others_busy_cores", lambda window, since=None: calls.append(1) or 0.0)
    first = threads.fit_threads("cpu", every=60)
    assert threads.fit_threads("cpu", every=60) == first and len(calls) == 1
    threads.fit_threads("cpu", every=0)
    assert len(calls) == 2


def test_generate_fits_threads_before_decoding(monkeypatch):
    from glide import api
    from test_api import ByteTokenizer, VOCAB
    from glide.model import LlamaModel, ModelConfig

    seen = []
    monkeypatch.setattr(threads, "fit_threads", lambda dev, **k: seen.append(torch.device(dev).type))
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    model = LlamaModel(cfg, dtype=torch.float32, init_std=0.3)
    model.attn_backend = "reference"
    api.generate(["abc"], method="ar", max_new_tokens=2, loaded=(model, ByteTokenizer()), device="cpu")
    assert seen == ["cpu"]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_a_window_opened_earlier_needs_no_wait_and_leaves_out_our_own_work():
    import time

    quiet = threads.others_busy_cores(0.2)
    _need_quiet_machine(quiet, 0.3)
    start = threads.cpu_snapshot()
    end = time.perf_counter() + 0.4
    while time.perf_counter() < end:  # this process's own work, as while loading a model
        pass
    t0 = time.perf_counter()
    busy = threads.others_busy_cores(0.1, since=start)
    assert time.perf_counter() - t0 < 0.05  # the window is already long enough: no sleep
    assert busy is not None and busy < 0.5, busy  # our own busy core is not "other processes"
    with cpu_hog(1):
        threads.others_busy_cores(0.2)  # let it start
        start = threads.cpu_snapshot()
        time.sleep(0.3)
        assert threads.others_busy_cores(0.1, since=start) > 0.5
