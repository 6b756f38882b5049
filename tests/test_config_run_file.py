"""--config accepts a run's own config.json: stage 1 takes its "train" section; any other stage says in one
line what to pass instead."""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from core.cli import given_flags, parse_config
from core.files import UserError
from training.config import TrainConfig, TranscoderTrainConfig


def run_config(tmp_path, cfg: TrainConfig):
    """A config.json as stage 1 writes it (training/diffusion.py: the flags under "train")."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": asdict(cfg), "model": {"n_vocab": 300, "mask_id": 300, "num_layers": 2},
                                "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "n_vocab": 300},
                                "data": {"folder": str(tmp_path / "data"), "params": {"dataset": "synthetic"}}}))
    return path


def test_stage_1_takes_a_runs_config_json(tmp_path):
    cfg = replace(TrainConfig(), dataset="synthetic", train_steps=123, model_dim=64, num_heads=2, seed=7,
                  device="cpu", model_name="again")
    path = run_config(tmp_path, cfg)
    assert parse_config(TrainConfig, ["--config", str(path)]) == cfg
    assert parse_config(TrainConfig, ["--config", str(path), "--seed", "8"]) == replace(cfg, seed=8)  # flags win
    assert {"train_steps", "seed", "dataset"} <= given_flags(["--config", str(path)])
    assert not {"train", "model", "data"} & given_flags(["--config", str(path)])


def test_another_stage_says_what_to_pass(tmp_path):
    path = run_config(tmp_path, replace(TrainConfig(), dataset="synthetic"))
    with pytest.raises(UserError, match="a run's config.json.*train_diffusion.py takes that section.*--train_folder"):
        parse_config(TranscoderTrainConfig, ["--config", str(path)])


def test_a_flat_config_with_a_section_named_like_a_flag_is_unchanged(tmp_path):
    (tmp_path / "c.json").write_text('{"train_steps": 5, "tokenizer": "bpe:300"}')
    cfg = parse_config(TrainConfig, ["--config", str(tmp_path / "c.json")])
    assert (cfg.train_steps, cfg.tokenizer) == (5, "bpe:300")
