from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from core.cli import arg, parse_config
from tests.helpers import assert_one_line_error, run_cli


@dataclass
class Demo:
    """A demo stage."""

    train_seq_len: int = arg(1024, "tokens per sequence")
    save_model: bool = arg(False, "write checkpoints")
    lr: float = arg(0.02, "learning rate")
    name: str = arg("run", "run name")
    mode: Literal["a", "b"] = arg("a", "a mode")
    limit: Optional[int] = arg(None, "an optional limit")
    prompt: list[str] = arg([], "repeatable prompt")

    def __post_init__(self):
        if self.train_seq_len <= 0:
            raise ValueError(f"--train_seq_len must be positive, got {self.train_seq_len}")


def test_reference_style_values_parse():
    cfg = parse_config(Demo, ["--train_seq_len", "4_096", "--save_model", "True", "--lr", "1e-3", "--limit", "2_000",
                              "--prompt", "a b", "--prompt", "c", "--mode", "b"])
    assert (cfg.train_seq_len, cfg.save_model, cfg.lr, cfg.limit, cfg.prompt, cfg.mode) == (
        4096, True, 1e-3, 2000, ["a b", "c"], "b")
    assert parse_config(Demo, ["--save_model", "False"]).save_model is False
    assert parse_config(Demo, []).prompt == [] and parse_config(Demo, []).limit is None


def test_bad_values_are_rejected():
    for argv in (["--save_model", "maybe"], ["--train_seq_len", "4.5"], ["--mode", "c"], ["--unknown", "1"]):
        with pytest.raises(SystemExit):
            parse_config(Demo, argv)


def test_ignored_flags_are_reported_once(capsys):
    cfg = parse_config(Demo, ["--save_every", "2_000", "--cuda", "1"], ignored=("save_every", "cuda", "val_loss_every"))
    assert cfg.train_seq_len == 1024
    assert capsys.readouterr().out.strip() == "ignored by this stage: --save_every, --cuda"


def test_help_lists_every_field_with_default():
    proc = run_cli(["-m", "data.prepare", "--help"])
    assert proc.returncode == 0
    for flag in ("--dataset", "--tokenizer", "--num_shards", "--shard_size", "--workers", "--synthetic_mb"):
        assert flag in proc.stdout
    assert "(default: 'fineweb-edu')" in " ".join(proc.stdout.split())


def test_validation_error_is_one_line():
    proc = run_cli(["-m", "data.prepare", "--dataset", "synthetic", "--shard_size", "0"])
    assert_one_line_error(proc, "--shard_size must be positive")
