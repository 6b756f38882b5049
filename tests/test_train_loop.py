"""The step loop both training stages share: which events follow which step."""
from types import SimpleNamespace

import pytest

from training.loop import due, run_training_steps


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
