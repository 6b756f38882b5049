"""--wandb_project on both training stages: the W&B project a run logs into (default "diffusion-interp")."""
import sys

import pytest

from core.cli import parse_config
from core.files import UserError
from tests.test_wandb import FakeWandb
from training.config import TrainConfig, TranscoderTrainConfig
from training.loop import open_wandb


def test_open_wandb_logs_into_the_project(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    open_wandb(True, tmp_path / "a", "train_diffusion", {})
    open_wandb(True, tmp_path / "a", "train_diffusion", {}, "my-project")
    assert [i["project"] for i in fake.inits] == ["diffusion-interp", "my-project"]


@pytest.mark.parametrize("cls", [TrainConfig, TranscoderTrainConfig])
def test_both_training_stages_take_the_flag(cls, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    argv = ["--train_folder", str(tmp_path)] if cls is TranscoderTrainConfig else []
    assert parse_config(cls, argv).wandb_project == "diffusion-interp"
    cfg = parse_config(cls, [*argv, "--wandb", "True", "--wandb_project", "team.runs-2"])
    assert (cfg.wandb, cfg.wandb_project) == (True, "team.runs-2")
    with pytest.raises(UserError, match="--wandb_project"):
        parse_config(cls, [*argv, "--wandb_project", "a/b"])
