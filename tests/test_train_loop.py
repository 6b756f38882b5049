"""The step loop both training stages share: which events follow which step."""
from types import SimpleNamespace

import pytest

from training.loop import Prefetch, due, run_training_steps


@pytest.mark.parametrize("start,log_every,val_every,save_every,expected", [
    (0, 2, 3, 0, ["val 0", "step 0", "step 1", "log 2", "step 2", "val 3", "step 3", "log 4", "step 4", "log 5",
                  "val 5", "save 5"]),
    # resumed: no validation at 0; with --val_loss_every 0 only at the end
    (3, 2, 0, 2, ["step 3", "log 4", "save 4", "step 4", "log 5", "val 5", "save 5"]),
    (0, 10, 0, 0, ["step 0", "step 1", "step 2", "step 3", "step 4", "log 5", "val 5", "save 5"]),  # the end counts
    (5, 1, 1, 1, []),  # already finished
])
def test_events_follow_their_steps(start, log_every, val_every, save_every, expected):
    cfg = SimpleNamespace(train_steps=5, log_every=log_every, val_loss_every=val_every, save_every=save_every)
    events, rates = [], []

    def log(done, tokens_per_s):
        events.append(f"log {done}")
        rates.append(tokens_per_s)
        return {}

    run_training_steps(cfg, start, 100, False, lambda i: events.append(f"step {i}"), log,
                       lambda d: events.append(f"val {d}"), lambda d: events.append(f"save {d}"))
    assert events == expected
    assert all(r > 0 for r in rates)


@pytest.mark.parametrize("done,every,total,expected", [(4, 2, 9, True), (5, 2, 9, False), (9, 0, 9, True),
                                                        (3, 0, 9, False), (9, 4, 9, True)])
def test_due(done, every, total, expected):
    assert due(done, every, total) is expected


@pytest.mark.parametrize("device,synced", [("cuda", [2, 3, 4, 5]), ("cpu", []), (None, [])])
def test_cuda_is_awaited_before_the_clock_at_event_steps_only(monkeypatch, device, synced):
    """Steps only queue GPU work: the loop waits for it before timing a step that logging, validation or
    saving follows (so tokens/s is the steps' own), and never after the other steps."""
    import torch

    cfg = SimpleNamespace(train_steps=5, log_every=2, val_loss_every=3, save_every=0)
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    run_training_steps(cfg, 0, 100, False, lambda i: events.append(f"step {i}"),
                       lambda done, tps: events.append(f"log {done}") or {}, lambda d: events.append(f"val {d}"),
                       lambda d: None, device=torch.device(device) if device else None)
    assert [int(events[i - 1].split()[1]) + 1 for i, e in enumerate(events) if e == "sync"] == synced
    assert events.index("log 2") == events.index("step 1") + 1 + bool(synced)  # waited, then logged


def test_prefetch_makes_the_next_index_in_the_background():
    import threading

    made, ready = [], threading.Event()

    def make(i):
        made.append((i, threading.current_thread().name))
        if i == 1:
            ready.set()
        return i * 10

    prefetch = Prefetch(make, stop=3)
    assert prefetch.get(0) == 0
    assert ready.wait(10)  # step 1 is made while the caller works on step 0
    assert [prefetch.get(1), prefetch.get(2)] == [10, 20]
    prefetch.close()
    assert [i for i, _ in made] == [0, 1, 2]  # each once, none at or past `stop`
    assert all(name.startswith("prefetch") for _, name in made)


def test_prefetch_out_of_order_and_errors():
    import threading
    import time

    running, most, lock = [0], [0], threading.Lock()

    def make(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        if i == 7:
            raise ValueError("no batch 7")
        return i

    prefetch = Prefetch(make, stop=100)
    assert [prefetch.get(i) for i in (0, 5, 6, 2)] == [0, 5, 6, 2]  # any order: each made for its own index
    with pytest.raises(ValueError, match="no batch 7"):
        prefetch.get(7)
    assert prefetch.get(3) == 3
    prefetch.close()
    assert most[0] == 1  # never two at once (the made-ahead one that was not asked for finishes first)
