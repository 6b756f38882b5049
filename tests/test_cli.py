from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from core.cli import arg, parse_config
from core.files import UserError
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


def test_bad_values_are_rejected_in_one_line():
    for argv in (["--save_model", "maybe"], ["--train_seq_len", "4.5"], ["--mode", "c"], ["--unknown", "1"],
                 ["--train_seq_len", "inf"], ["--train_seq_len", "nan"], ["--lr", "x"]):
        with pytest.raises(UserError) as e:
            parse_config(Demo, argv)
        assert "\n" not in str(e.value) and "usage" not in str(e.value)


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


def test_config_files_with_the_command_line_on_top(tmp_path):
    from core.files import UserError

    js = tmp_path / "c.json"
    js.write_text('{"train_seq_len": 4096, "save_model": true, "prompt": ["x", "y"], "mode": "b"}')
    cfg = parse_config(Demo, ["--config", str(js)])
    assert (cfg.train_seq_len, cfg.save_model, cfg.prompt, cfg.mode, cfg.lr) == (4096, True, ["x", "y"], "b", 0.02)
    cfg = parse_config(Demo, ["--config", str(js), "--train_seq_len", "512", "--prompt", "z", "--save_model", "False"])
    assert (cfg.train_seq_len, cfg.prompt, cfg.save_model, cfg.mode) == (512, ["z"], False, "b")  # flags win
    yml = tmp_path / "c.yaml"
    yml.write_text("train_seq_len: 4_096\nlr: 0.001\nlimit: 7\n")
    cfg = parse_config(Demo, ["--config", str(yml)])
    assert (cfg.train_seq_len, cfg.lr, cfg.limit) == (4096, 0.001, 7)
    bad = {"u.json": '{"train_seq_len": 4096, "trian_steps": 3}', "v.json": "{not json", "w.yaml": "- a list",
           "x.json": '{"train_seq_len": -1}'}
    messages = {"u.json": "unknown flag(s) trian_steps", "v.json": "not valid JSON", "w.yaml": "expected a mapping",
                "x.json": "--train_seq_len must be positive"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=messages[name].replace("(", r"\(").replace(")", r"\)")):
            parse_config(Demo, ["--config", str(tmp_path / name)])
    with pytest.raises(UserError, match="cannot read it"):
        parse_config(Demo, ["--config", str(tmp_path / "missing.json")])


@pytest.mark.slow
def test_a_stage_reads_a_config_file(tmp_path):
    (tmp_path / "gen.yaml").write_text("gen_length: 8\nnum_generate_step: 3\n")  # a typo
    assert_one_line_error(run_cli(["generate.py", "--train_folder", str(tmp_path / "none"), "--config",
                                   str(tmp_path / "gen.yaml")]), "unknown flag(s) num_generate_step")
    (tmp_path / "gen.yaml").write_text(f"gen_length: 8\ntrain_folder: {tmp_path / 'none'}\n")
    assert_one_line_error(run_cli(["generate.py", "--config", str(tmp_path / "gen.yaml")]), "gen.yaml: --train_folder",
                          "none does not exist")


def test_values_from_a_config_file_count_as_given(tmp_path):
    from core.cli import given_flags

    (tmp_path / "c.json").write_text('{"train_steps": 10, "lr": 0.1}')
    assert given_flags(["--config", str(tmp_path / "c.json"), "--seed", "3"]) == {"train_steps", "lr", "seed"}
    assert given_flags([f"--config={tmp_path / 'c.json'}"]) == {"train_steps", "lr"}


@pytest.mark.parametrize("error,needle", [
    (OSError(28, "No space left on device", "/data/run/state_step000400.pt"), "No space left on device: /data/run"),
    (PermissionError(13, "Permission denied", "/data/run/log.txt"), "Permission denied: /data/run/log.txt"),
    (OSError(30, "Read-only file system", "/data/run"), "Read-only file system"),
])
def test_a_failure_of_the_machine_is_one_line(error, needle, capsys):
    """A full disk or a read-only folder while a stage runs: one line naming the file, exit 2."""
    from core.cli import run

    def main(cfg):
        raise error

    with pytest.raises(SystemExit) as e:
        run(main, Demo, [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "error: " in err
