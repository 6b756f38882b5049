"""No finished work is lost to a second run or an --overwrite: every writing stage locks its output (a second
run ends in one line naming the holder; a dead holder's lock is taken over), output folders get unique names
even within one second, and --overwrite replaces a finished output only once the new one is complete."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data.writer
import training.transcoders
from core import cli, locks
from core.files import UserError
from experiment import paths
from tests.helpers import ROOT, assert_one_line_error, run_cli

STEM = "state_step000400"
HOLDER = f"pid {os.getpid()} on {socket.gethostname()}"  # the test process, holding a lock itself
TOPK_FLAGS = ["--device", "cpu", "--train_seq_len", "128", "--batch_size", "8", "--scan_batches", "6", "--n_top", "10",
              "--context_before", "8", "--context_after", "4", "--n_quantile", "6", "--n_random", "6"]
TC_FLAGS = ["--device", "cpu", "--train_seq_len", "128", "--batch_size", "8", "--grad_acc_steps", "1", "--train_steps",
            "400", "--expansion_factor", "4", "--k", "8", "--val_loss_every", "0", "--val_tokens", "8192",
            "--save_every", "0", "--log_every", "50", "--dead_tokens", "50000"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(tiny_run: Path, dst: Path, keep: tuple[str, ...] = ()) -> Path:
    """The session's run (its checkpoints, config, tokenizer) with only the later stages' outputs in `keep`."""
    drop = {"transcoders", "topk", "descriptions", "explanations", "ground_truth.json", "exports", "hub"} - set(keep)
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def run_main(capsys, main, config, argv: list[str]) -> tuple[int, str, str]:
    """A stage's command line in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run(main, config, argv)
        sys.exit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if re.match(r"^(?:[\w.\- ]+: )?error: ", line)]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_lock(path: Path, command: str = "a killed run") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "command": command,
                                "since": "2026-01-01T00:00:00+00:00", "token": "dead"}))


@pytest.fixture(scope="module")
def full_run(tiny_descriptions, tiny_transcoders, tiny_run, tmp_path_factory):
    """A copy of the session's run with its transcoders, top-k scan and descriptions; read only here."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("concurrency") / "run", ("transcoders", "topk", "descriptions"))


# --- the lock of every writing stage -------------------------------------------------------------------------------

def _stages(run: Path, tmp: Path):
    """(name, main, config class, argv, how the stage's output is locked) for every writing stage."""
    import train_diffusion
    import train_transcoders
    from data import prepare
    from experiment import hub
    from generate_descriptions import ExplainConfig, main as explain
    from get_activation_descriptions import DescriptionsConfig, main as describe
    from get_topk_activations import TopKConfig, main as topk
    from interp.exports import circuit_tracer as export_circuit_tracer, delphi as export_delphi
    from interp.ground_truth import benchmark as ground_truth

    data_dir = Path(json.loads((run / "config.json").read_text())["data"]["folder"]).parent
    resume = ["--resume", str(run), "--device", "cpu", "--data_dir", str(data_dir), "--experiments_dir", str(tmp / "x")]
    out, ds, prompt = tmp / "explanations.json", tmp / "data", "The capital of France is"
    return [
        ("train_diffusion --resume", lambda cfg: train_diffusion.main(cfg, cli.given_flags(resume)),
         train_diffusion.TrainConfig, resume, lambda: locks.hold(run)),
        ("train_transcoders", train_transcoders.main, train_transcoders.TranscoderTrainConfig,
         ["--train_folder", str(run), *TC_FLAGS], lambda: locks.hold(run / "transcoders" / STEM)),
        ("get_topk_activations", topk, TopKConfig, ["--train_folder", str(run), *TOPK_FLAGS],
         lambda: locks.hold(run / "topk" / STEM)),
        ("get_activation_descriptions", describe, DescriptionsConfig,
         ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu"],
         lambda: locks.hold(run / "descriptions" / STEM)),
        ("generate_descriptions --output", explain, ExplainConfig,
         ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu", "--prompt", prompt,
          "--gen_length", "2", "--num_generate_steps", "2", "--output", str(out)], lambda: locks.hold_output(out)),
        ("interp.ground_truth", ground_truth.main, ground_truth.GroundTruthConfig,
         ["--train_folder", str(run), "--device", "cpu"], lambda: locks.hold_output(run / "ground_truth.json")),
        ("interp.exports.delphi", export_delphi.main, export_delphi.DelphiExportConfig,
         ["--train_folder", str(run), "--device", "cpu"],
         lambda: locks.hold_output(run / "exports" / "delphi" / STEM)),
        ("interp.exports.circuit_tracer", export_circuit_tracer.main, export_circuit_tracer.CircuitTracerExportConfig,
         ["--train_folder", str(run)], lambda: locks.hold(run / "exports" / "circuit-tracer" / STEM)),
        ("experiment.hub", hub.main, hub.HubConfig, ["--train_folder", str(run)],
         lambda: locks.hold(run / "hub" / STEM)),
        ("data.prepare", prepare.main, prepare.PrepareConfig,
         ["--dataset", "synthetic", "--synthetic_mb", "0.05", "--tokenizer", "bpe:300", "--workers", "1",
          "--data_dir", str(ds)], lambda: locks.hold_output(ds / "synthetic_seed0_0.05mb_bpe300")),
    ]


STAGE_NAMES = ["train_diffusion --resume", "train_transcoders", "get_topk_activations", "get_activation_descriptions",
               "generate_descriptions --output", "interp.ground_truth", "interp.exports.delphi",
               "interp.exports.circuit_tracer", "experiment.hub", "data.prepare"]


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_a_second_run_on_a_locked_output_ends_in_one_line_naming_the_holder(name, full_run, tmp_path, capsys):
    (_, main, config, argv, lock), = [s for s in _stages(full_run, tmp_path) if s[0] == name]
    before = digest(full_run)
    with lock():
        code, _, err = run_main(capsys, main, config, argv)
    assert_one_error(code, err, "in use by", HOLDER, "since")
    assert digest(full_run) == before  # nothing of the run changed
    assert not (tmp_path / "explanations.json").exists() and not list((tmp_path / "data").glob("synthetic*"))


def test_a_dead_holders_lock_is_reported_in_one_line_and_taken_over(tiny_topk, tiny_run, tmp_path, capsys):
    from get_topk_activations import TopKConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("transcoders", "topk"))
    lock = run / "topk" / STEM / locks.LOCK_FILE
    stale_lock(lock, "get_topk_activations.py --train_folder run")
    code, out, err = run_main(capsys, main, TopKConfig, ["--train_folder", str(run), *TOPK_FLAGS])
    assert code == 0, err
    notes = [line for line in out.splitlines() if "taking over" in line]
    assert len(notes) == 1 and "no longer running" in notes[0] and "get_topk_activations.py" in notes[0], out
    assert not lock.exists()  # released at the end
    assert digest(run / "topk" / STEM) == digest(tiny_topk)


def test_a_lock_is_never_taken_from_a_live_or_remote_holder(tmp_path):
    held = locks.acquire(tmp_path / locks.LOCK_FILE)
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
        locks.acquire(tmp_path / locks.LOCK_FILE)
    held.release()
    assert not (tmp_path / locks.LOCK_FILE).exists()
    remote = {"pid": dead_pid(), "host": "another-machine", "command": "x", "since": "then", "token": "t"}
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps(remote))
    with pytest.raises(UserError, match="another-machine"):  # its pid says nothing about a process here
        locks.acquire(tmp_path / locks.LOCK_FILE)
    assert json.loads((tmp_path / locks.LOCK_FILE).read_text()) == remote


# --- real two-process races ----------------------------------------------------------------------------------------

GATED = """
import os, runpy, sys, time
import interp.descriptions.stage as stage
append, deadline = stage.append_record, time.time() + 120
def gated(path, record):  # writes one record, then waits for the test's go
    append(path, record)
    while not os.path.exists(os.environ["GO_FILE"]) and time.time() < deadline:
        time.sleep(0.05)
stage.append_record = gated
runpy.run_path("get_activation_descriptions.py", run_name="__main__")
"""


def test_two_description_runs_at_once_write_every_record_once(tiny_topk, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", ("topk",))
    args = ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu", "--max_features_per_layer", "15"]
    path = run / "descriptions" / STEM / "descriptions.jsonl"
    go = tmp_path / "go"
    with open(tmp_path / "a.out", "w") as out, open(tmp_path / "a.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", GATED, *args], cwd=ROOT, stdout=out, stderr=err,
                                 env={**os.environ, "GO_FILE": str(go)})
        try:
            deadline = time.time() + 120
            while not (path.exists() and path.read_text().count("\n") >= 1):  # the first run is under way
                assert first.poll() is None and time.time() < deadline, (tmp_path / "a.err").read_text()
                time.sleep(0.05)
            second = run_cli(["get_activation_descriptions.py", *args])
        finally:
            go.touch()
            first.wait(timeout=120)
    assert first.returncode == 0, (tmp_path / "a.err").read_text()[-2000:]
    assert_one_line_error(second, "in use by", f"pid {first.pid}", "get_activation_descriptions", "since")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["layer"], r["feature"]) for r in records]
    live = [sum(not f["dead"] for f in map(json.loads, (run / "topk" / STEM / f"layer_0{layer}" / "features.jsonl")
                                           .read_text().splitlines())) for layer in (0, 1)]
    assert len(keys) == len(set(keys)) == sum(min(15, n) for n in live)  # every feature once


FROZEN_CLOCK = """
import datetime, runpy
class Frozen(datetime.datetime):  # both runs start "in the same second"
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 1, 12, 0, 0, tzinfo=tz)
datetime.datetime = Frozen
runpy.run_path("generate_descriptions.py", run_name="__main__")
"""


def test_two_explanation_runs_in_the_same_second_keep_both(tiny_descriptions, tiny_transcoders, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run", ("transcoders", "topk", "descriptions"))
    prompts = ["The capital of France is", "The month after March is"]
    procs = [subprocess.Popen([sys.executable, "-c", FROZEN_CLOCK, "--train_folder", str(run), "--explainer", "tokens",
                               "--device", "cpu", "--prompt", p, "--gen_length", "2", "--num_generate_steps", "2"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for p in prompts]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    folders = sorted((run / "explanations").iterdir())
    assert [f.name for f in folders] == ["20260101_120000", "20260101_120000_2"]
    written = [json.loads((f / "explanations.json").read_text())["prompts"][0]["prompt"] for f in folders]
    assert sorted(written) == sorted(prompts) and all((f / "report.html").exists() for f in folders)
    assert not list(run.rglob(locks.LOCK_FILE))


def test_folders_made_in_the_same_second_get_unique_names(tmp_path, monkeypatch):
    """Another run creating the same name between the check and the mkdir (the race) never shares a folder."""
    monkeypatch.setattr(paths, "stamp_now", lambda: "20260101_120000")
    mkdir, raced = Path.mkdir, set()

    def another_run_first(self, *args, **kwargs):
        if self.name.startswith("20260101_120000") and self.parent not in raced:
            raced.add(self.parent)
            mkdir(self, parents=True)  # the other run's folder, made an instant earlier
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", another_run_first)
    run = paths.new_run_folder("diffusion", tmp_path / "exp")
    assert run.name == "20260101_120000_diffusion_2" and run.is_dir()
    assert paths.new_run_folder("diffusion", tmp_path / "exp").name == "20260101_120000_diffusion_3"
    made = [paths.StagePaths(run, "state_step000400.pt").new_explanations() for _ in range(2)]
    assert [m.name for m in made] == ["20260101_120000_2", "20260101_120000_3"]


# --- --overwrite replaces only with a complete output --------------------------------------------------------------

def test_topk_overwrite_with_a_corrupt_transcoder_keeps_the_old_output(tiny_topk, tiny_run, tmp_path, capsys):
    from get_topk_activations import TopKConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("transcoders", "topk"))
    before = digest(run / "topk" / STEM)
    weights = run / "transcoders" / STEM / "blocks.1.mlp" / "sae.safetensors"
    weights.write_bytes(b"\0" * 64 + weights.read_bytes()[64:])
    code, _, err = run_main(capsys, main, TopKConfig, ["--train_folder", str(run), *TOPK_FLAGS, "--overwrite", "True"])
    assert_one_error(code, err, "blocks.1.mlp")
    assert digest(run / "topk" / STEM) == before  # byte for byte
    assert sorted(p.name for p in (run / "topk").iterdir()) == [STEM]  # no staging folder left


def test_topk_overwrite_replaces_the_output_whole(tiny_topk, tiny_run, tmp_path, capsys):
    from get_topk_activations import TopKConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("transcoders", "topk"))
    leftover = run / "topk" / f"{STEM}.new"  # a killed overwrite's staging folder, with its dead holder's lock
    (leftover / "layer_00").mkdir(parents=True)
    (leftover / "layer_00" / "features.jsonl").write_text("half")
    stale_lock(leftover / locks.LOCK_FILE)
    code, _, err = run_main(capsys, main, TopKConfig, ["--train_folder", str(run), *TOPK_FLAGS[:-4], "--n_quantile",
                                                       "4", "--n_random", "4", "--overwrite", "True"])
    assert code == 0, err
    assert sorted(p.name for p in (run / "topk").iterdir()) == [STEM]
    index = json.loads((run / "topk" / STEM / "index.json").read_text())
    assert index["settings"]["n_quantile"] == 4 and not list((run / "topk").rglob(locks.LOCK_FILE))


def _records(path: Path) -> list[tuple]:
    return [(r["explainer"], r["layer"], r["feature"]) for r in map(json.loads, path.read_text().splitlines())]


def test_description_overwrite_with_damaged_contexts_keeps_every_record(tiny_descriptions, tiny_run, tmp_path, capsys):
    from get_activation_descriptions import DescriptionsConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("topk", "descriptions"))
    path = run / "descriptions" / STEM / "descriptions.jsonl"
    before = path.read_bytes()
    contexts = run / "topk" / STEM / "layer_01" / "contexts.jsonl"
    lines = contexts.read_text().splitlines(keepends=True)
    contexts.write_text("".join(lines[:3]) + '{"feature": 7, "top": [\n' + "".join(lines[4:]))
    code, _, err = run_main(capsys, main, DescriptionsConfig, ["--train_folder", str(run), "--explainer", "tokens",
                                                               "--device", "cpu", "--overwrite", "True"])
    assert_one_error(code, err, "contexts.jsonl")
    assert path.read_bytes() == before and len(_records(path)) == len(set(_records(path))) > 100
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(p.name for p in tiny_descriptions.iterdir())


def test_an_interrupted_description_overwrite_keeps_every_record(tiny_descriptions, tiny_run, tmp_path, capsys,
                                                                  monkeypatch):
    import interp.descriptions.stage as stage
    from get_activation_descriptions import DescriptionsConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("topk", "descriptions"))
    path = run / "descriptions" / STEM / "descriptions.jsonl"
    before = path.read_bytes()
    append, n = stage.append_record, []

    def killed_after_five(p, record):
        if len(n) == 5:
            raise KeyboardInterrupt
        n.append(1)
        append(p, record)

    monkeypatch.setattr(stage, "append_record", killed_after_five)
    code, _, err = run_main(capsys, main, DescriptionsConfig, ["--train_folder", str(run), "--explainer", "tokens",
                                                               "--device", "cpu", "--overwrite", "True"])
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert path.read_bytes() == before  # the old records stay until the new ones are all made
    assert not list(path.parent.glob("descriptions.new*"))


def test_an_interrupted_transcoder_overwrite_keeps_the_old_transcoders(tiny_transcoders, tiny_run, tmp_path, capsys,
                                                                       monkeypatch):
    from train_transcoders import TranscoderTrainConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("transcoders",))
    out = run / "transcoders" / STEM
    before = digest(out)
    step, calls = training.transcoders.train_step, []

    def killed_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(training.transcoders, "train_step", killed_in_step_two)
    argv = ["--train_folder", str(run), *TC_FLAGS, "--train_steps", "3", "--overwrite", "True"]
    code, _, err = run_main(capsys, main, TranscoderTrainConfig, argv)
    assert code == 130 and "Traceback" not in err, err
    assert digest(out) == before and sorted(p.name for p in out.parent.iterdir()) == [STEM]


def test_a_killed_transcoder_overwrite_is_started_over(tiny_transcoders, tiny_run, tmp_path, capsys):
    from train_transcoders import TranscoderTrainConfig, main

    run = copy_run(tiny_run, tmp_path / "run", ("transcoders",))
    out = run / "transcoders" / STEM
    leftover = out.with_name(f"{STEM}.new")  # SIGKILLed in the middle of an overwrite
    leftover.mkdir()
    (leftover / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1}) + "\n")
    stale_lock(leftover / locks.LOCK_FILE)
    code, _, err = run_main(capsys, main, TranscoderTrainConfig,
                            ["--train_folder", str(run), *TC_FLAGS, "--train_steps", "2", "--overwrite", "True"])
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == [STEM]
    assert json.loads((out / "config.json").read_text())["train_steps"] == 2
    events = [(r["event"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(events) == len(set(events)) and ("train", 1) not in events  # the killed run's lines are gone
    assert (out / "blocks.1.mlp" / "sae.safetensors").exists()
    assert (out / "log.txt").read_text().count("transcoders for") == 1  # one run's lines, once


# --- data.prepare writes a dataset whole or not at all -------------------------------------------------------------

PREPARE = ["--dataset", "synthetic", "--synthetic_mb", "0.05", "--tokenizer", "bpe:300", "--workers", "1",
           "--shard_size", "2000"]


def test_a_preparation_that_fails_part_way_leaves_no_dataset_folder(tmp_path, capsys, monkeypatch):
    from data.prepare import PrepareConfig, main

    write, calls = data.writer.write_shard, []

    def bad_value_in_shard_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise UserError("a bad value in the third shard")
        return write(*args, **kwargs)

    monkeypatch.setattr(data.writer, "write_shard", bad_value_in_shard_three)
    code, _, err = run_main(capsys, main, PrepareConfig, [*PREPARE, "--data_dir", str(tmp_path / "d")])
    assert_one_error(code, err, "bad value")
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").iterdir())


def test_a_killed_preparations_leftover_is_removed(tmp_path, capsys):
    from data.prepare import PrepareConfig, main

    leftover = tmp_path / "d" / "synthetic_seed0_0.05mb_bpe300.partial"
    leftover.mkdir(parents=True)
    (leftover / "meta.json").write_text(json.dumps({"params": {"shard_size": 1}, "complete": False}))
    (leftover / "synthetic_val_000000.bin").write_bytes(b"half a shard")
    code, out, err = run_main(capsys, main, PrepareConfig, [*PREPARE, "--data_dir", str(tmp_path / "d")])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["synthetic_seed0_0.05mb_bpe300"]
    meta = json.loads((tmp_path / "d" / "synthetic_seed0_0.05mb_bpe300" / "meta.json").read_text())
    assert meta["complete"] and meta["train_shards"] >= 2 and "removing" in out
