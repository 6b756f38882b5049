"""Reliability: killed stages resume to the same result; bad inputs across every stage end in one line,
a non-zero exit and no changed file; checkpoints never run code."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiment import read_metrics
from interp.contexts.store import read_jsonl
from tests.helpers import ROOT, assert_one_line_error, run_cli


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the process as soon as `ready()` is true (it must not have finished by then)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the process finished before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkilled_diffusion_training_resumes_to_the_same_model(synthetic_data, tmp_path):
    common = ["train_diffusion.py", "--dataset", "synthetic", "--synthetic_mb", "0.3", "--data_dir",
              str(synthetic_data.folder.parent), "--device", "cpu", "--num_layers", "2", "--num_heads", "2",
              "--model_dim", "64", "--train_seq_len", "128", "--val_seq_len", "128", "--val_tokens", "4096",
              "--batch_size", "4", "--grad_acc_steps", "1", "--train_steps", "24", "--save_every", "4",
              "--val_loss_every", "12", "--log_every", "2"]
    assert run_cli([*common, "--experiments_dir", str(tmp_path / "a")], timeout=300).returncode == 0
    proc = start([*common, "--experiments_dir", str(tmp_path / "b")])
    kill_when(proc, lambda: any((tmp_path / "b").glob("*/state_step000008.pt")))
    (run_b,) = (tmp_path / "b").iterdir()
    assert not (run_b / "state_step000024.pt").exists()
    resumed = run_cli([*common, "--resume", str(run_b)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run_a,) = (tmp_path / "a").iterdir()
    a = torch.load(run_a / "state_step000024.pt", weights_only=True)["model"]
    b = torch.load(run_b / "state_step000024.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(run_a)) == strip(read_metrics(run_b))


def _copy_base(tiny_run, dst):
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("transcoders", "topk", "descriptions", "explanations",
                                                                 "ground_truth.json"))
    return dst


def test_sigkilled_transcoder_training_resumes_to_the_same_transcoders(tiny_run, tmp_path):
    runs = [_copy_base(tiny_run, tmp_path / n) for n in ("a", "b")]
    flags = ["--device", "cpu", "--train_seq_len", "128", "--batch_size", "8", "--grad_acc_steps", "1",
             "--train_steps", "20", "--expansion_factor", "4", "--k", "8", "--val_loss_every", "10",
             "--val_tokens", "4096", "--save_every", "5", "--log_every", "1"]
    assert run_cli(["train_transcoders.py", "--train_folder", str(runs[0]), *flags], timeout=300).returncode == 0
    proc = start(["train_transcoders.py", "--train_folder", str(runs[1]), *flags])
    out_b = runs[1] / "transcoders" / "state_step000400"
    kill_when(proc, lambda: (out_b / "state_step000010.pt").exists())
    again = run_cli(["train_transcoders.py", "--train_folder", str(runs[1]), *flags], timeout=300)  # same command
    assert again.returncode == 0, again.stderr[-2000:]
    out_a = runs[0] / "transcoders" / "state_step000400"
    a = torch.load(out_a / "state_step000020.pt", weights_only=True)
    b = torch.load(out_b / "state_step000020.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for layer in ("blocks.0.mlp", "blocks.1.mlp"):
        assert (out_a / layer / "sae.safetensors").read_bytes() == (out_b / layer / "sae.safetensors").read_bytes()


def test_sigkilled_description_stage_loses_and_redoes_nothing(tiny_topk, tiny_run, tiny_llms, tmp_path):
    run = _copy_base(tiny_run, tmp_path / "run")
    shutil.copytree(tiny_run / "transcoders", run / "transcoders")
    shutil.copytree(tiny_run / "topk", run / "topk")
    args = ["get_activation_descriptions.py", "--train_folder", str(run), "--explainer", str(tiny_llms["t5"]),
            "--device", "cpu", "--batch_size", "1", "--max_features_per_layer", "12", "--n_examples", "2",
            "--max_new_tokens", "4", "--n_score", "2"]
    path = run / "descriptions" / "state_step000400" / "descriptions.jsonl"
    proc = start(args)
    kill_when(proc, lambda: path.exists() and path.read_text().count("\n") >= 5)
    before = read_jsonl(path) if path.read_text().endswith("\n") else read_jsonl(path)[:-1]
    done = run_cli(args, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = read_jsonl(path)
    keys = [(r["layer"], r["feature"]) for r in after]
    assert len(keys) == len(set(keys)) == 24  # every feature once: nothing lost, nothing redone
    assert after[:len(before)] == before  # finished records untouched
    assert f"{len(before)} already done" in done.stdout


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path('/tmp') / 'reliability_pwned'}",))


@pytest.fixture(scope="module")
def broken_run(tiny_run, tiny_descriptions, tmp_path_factory):
    """A copy of the tiny run with extra broken checkpoints: truncated, garbage, tampered pickle."""
    run = tmp_path_factory.mktemp("broken") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("explanations", "ground_truth.json"))
    good = (run / "state_step000400.pt").read_bytes()
    (run / "truncated.pt").write_bytes(good[:len(good) // 2])
    (run / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": Evil()}, run / "tampered.pt")
    return run


STAGES_ON_RUN = ["generate.py", "train_transcoders.py", "get_topk_activations.py", "get_activation_descriptions.py",
                 "generate_descriptions.py"]
CASES = [
    ("--checkpoint_name truncated.pt", "cannot load checkpoint"),
    ("--checkpoint_name garbage.pt", "cannot load checkpoint"),
    ("--checkpoint_name tampered.pt", "cannot load checkpoint"),
    ("--checkpoint_name state_step999999.pt", "does not exist"),
    ("--cuda 7", "cuda:7 does not exist"),
]


# stage 5 reads the top-k output, never the checkpoint's weights: a broken checkpoint file is not its input
TABLE = [(stage, flags, needle) for stage in STAGES_ON_RUN for flags, needle in CASES
         if stage != "get_activation_descriptions.py" or "cannot load" not in needle]


@pytest.mark.parametrize("stage,flags,needle", TABLE)
def test_bad_inputs_across_stages(stage, flags, needle, broken_run):
    before = tree_digest(broken_run)
    extra = ["--explainer", "tokens"] if stage in ("get_activation_descriptions.py", "generate_descriptions.py") else []
    proc = run_cli([stage, "--train_folder", str(broken_run), *flags.split(), *extra])
    assert_one_line_error(proc, needle)
    assert tree_digest(broken_run) == before
    assert not Path("/tmp/reliability_pwned").exists()  # the tampered pickle never ran


@pytest.mark.parametrize("argv,needle", [
    (["train_diffusion.py", "--dataset", "{empty}"], "holds no .txt"),
    (["train_diffusion.py", "--train_steps", "-5"], "must be positive"),
    (["train_diffusion.py", "--cuda", "7"], "cuda:7 does not exist"),
    (["generate.py", "--train_folder", "{missing}"], "does not exist"),
    (["train_transcoders.py", "--train_folder", "{missing}"], "does not exist"),
    (["get_topk_activations.py", "--train_folder", "{missing}"], "does not exist"),
    (["get_activation_descriptions.py", "--train_folder", "{missing}", "--explainer", "tokens"], "does not exist"),
    (["generate_descriptions.py", "--train_folder", "{missing}", "--explainer", "tokens"], "does not exist"),
    (["generate.py", "--train_folder", "{run}", "--num_heads", "3"], "disagrees"),
    (["train_transcoders.py", "--train_folder", "{run}", "--k", "0"], "must be positive"),
    (["get_topk_activations.py", "--train_folder", "{run}", "--n_top", "-1"], "must be positive"),
    (["generate_descriptions.py", "--train_folder", "{run}", "--explainer", "tokens", "--gen_length", "0"],
     "must be positive"),
])
def test_bad_inputs_table(argv, needle, broken_run, tmp_path):
    (tmp_path / "empty").mkdir()
    subst = {"{empty}": str(tmp_path / "empty"), "{missing}": str(tmp_path / "missing"), "{run}": str(broken_run)}
    before = tree_digest(broken_run)
    proc = run_cli([subst.get(a, a) for a in argv] + ["--experiments_dir", str(tmp_path / "exp")]
                   if argv[0] == "train_diffusion.py" else [subst.get(a, a) for a in argv])
    assert_one_line_error(proc, needle)
    assert tree_digest(broken_run) == before and not (tmp_path / "exp").exists()


def test_checkpoints_load_weights_only(tiny_run):
    from core.files import UserError, load_checkpoint

    state = load_checkpoint(tiny_run / "state_step000400.pt")
    assert "model" in state
    tampered = tiny_run.parent / "tampered_direct.pt"
    torch.save({"model": Evil()}, tampered)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_checkpoint(tampered)
    assert not Path("/tmp/reliability_pwned").exists()
