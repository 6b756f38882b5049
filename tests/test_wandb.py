"""Weights & Biases logging in both training stages, with a stand-in `wandb` module (the package is not a
dependency): what is logged, and that a resumed job continues the same W&B run."""
import shutil
import sys
import types

import pytest

from core.files import UserError
from tests.helpers import tiny_transcoder_config
from training.loop import open_wandb


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, record, step):
        self.logged.append((step, record))


def test_a_resumed_job_continues_its_wandb_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert open_wandb(False, tmp_path, "x", {}) is None
    open_wandb(True, tmp_path / "a", "train_diffusion", {"lr": 1})
    open_wandb(True, tmp_path / "a", "train_diffusion", {"lr": 1})  # the same folder again: a resume
    open_wandb(True, tmp_path / "b", "train_diffusion", {"lr": 1})
    ids = [i["id"] for i in fake.inits]
    assert ids[0] == ids[1] != ids[2] and all(i["resume"] == "allow" for i in fake.inits)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match="pip install wandb"):
        open_wandb(True, tmp_path, "x", {})


def test_transcoder_training_logs_to_wandb(tiny_run, tmp_path, monkeypatch):
    from train_transcoders import main

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    run.mkdir()
    for f in tiny_run.iterdir():
        if f.is_file():
            shutil.copy(f, run / f.name)
    main(tiny_transcoder_config(run, train_steps=4, log_every=2, val_loss_every=2, val_tokens=2048, wandb=True))
    assert len(fake.inits) == 1 and fake.inits[0]["job_type"] == "train_transcoders"
    steps = [(step, "fvu" in rec and "base_nelbo" not in rec, "base_nelbo" in rec) for step, rec in fake.logged]
    assert (2, True, False) in steps and (4, True, False) in steps  # training FVU per layer
    assert (0, False, True) in steps and (4, False, True) in steps  # validation: NELBOs, per-layer FVU
