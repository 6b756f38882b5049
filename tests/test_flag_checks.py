"""Everything a user can name is checked against what the trained run has, before any file is written: a
feature, position or layer that does not exist, more examples than the scan reads, a validation length the
data cannot hold, a Hub repository id; and a training run that diverges stops without saving NaN weights.

Each mistake ends in one line on stderr (`<prog>: error: ...`), exit status 2, no traceback, and the run
folder exactly as it was. The stages run in-process on copies of the session's tiny run.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from core import cli
from core.files import UserError
from experiment import list_checkpoints
from tests.helpers import tiny_train_config, tiny_transcoder_config

ERROR = re.compile(r"error: ")
TOPK_FLAGS = ["--device", "cpu", "--train_seq_len", "128", "--batch_size", "8", "--scan_batches", "6", "--n_top", "10",
              "--context_before", "8", "--context_after", "4", "--n_quantile", "6", "--n_random", "6"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def copy_run(tiny_run: Path, to: Path, *drop: str) -> Path:
    """The tiny run without what the tests do not need (or must not find), plus `drop`."""
    shutil.copytree(tiny_run, to, ignore=shutil.ignore_patterns("explanations", "ground_truth.json", "exports", "hub",
                                                                "state_step000200.pt", *drop))
    return to


def refused(capsys, main, cls, argv: list[str], *needles: str, ignored=()) -> str:
    """Run a stage as its script does; it must end in one error line naming `needles`, with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main, cls, argv, ignored=ignored)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and ERROR.search(lines[0]), err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


# ---- stage 6: --intervene names nodes that exist ----

def test_intervene_values_are_indices_and_finite_numbers():
    from interp.explanations.interventions import parse_changes

    for bad in ("0_-1_2=0", "-1_0_2=0", "0_0_-2=0", "0_0_2=nan", "0_0_2=inf", "0_0_2=-infx", "0_0_2=1e400x"):
        with pytest.raises(ValueError, match="--intervene"):
            parse_changes(bad)
    (c,) = parse_changes("1_329_9=-0.5x")
    assert (c.layer, c.feature, c.position, c.value, c.relative) == (1, 329, 9, -0.5, True)


def test_intervene_nodes_are_checked_against_the_run(tiny_descriptions, tiny_run, tmp_path, capsys):
    from generate_descriptions import IGNORED, ExplainConfig, main

    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    prompt = "The capital of France is"
    base = ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu", "--prompt", prompt,
            "--gen_length", "2", "--num_generate_steps", "1"]
    refused(capsys, main, ExplainConfig, [*base, "--intervene", "0_99999_3=0"], "0_99999_3",
            "layer 0's transcoder has features 0..511", ignored=IGNORED)
    from experiment import load_run

    tok = load_run(run, "latest", "cpu")[2]
    length = 1 + len(tok.encode(prompt)) + 2  # BOS, the prompt, the continuation
    refused(capsys, main, ExplainConfig, [*base, "--intervene", f"1_3_{length}=0"], f"positions run 0..{length - 1}",
            ignored=IGNORED)
    refused(capsys, main, ExplainConfig, [*base, "--intervene", "0_3_1=0,0_3_1=2x"], "more than once", ignored=IGNORED)
    assert digest(run) == before

    # a node that exists: the run goes through and its settings (the changes among them) are written as JSON
    out = tmp_path / "out" / "explanations.json"
    out.parent.mkdir()
    cli.run(main, ExplainConfig, [*base, "--intervene", f"0_3_{length - 1}=0", "--random_draws", "1",
                                  "--features_per_layer", "2", "--faithfulness_features", "2", "--output", str(out)],
            ignored=IGNORED)
    saved = json.loads(out.read_text())
    assert saved["settings"]["changes"] == [{"layer": 0, "feature": 3, "position": length - 1, "value": 0.0,
                                             "relative": False}]


# ---- stage 5: --features within the layer's features ----

def test_features_are_indices_within_the_layer(tiny_descriptions, tiny_run, tmp_path, capsys):
    from get_activation_descriptions import DescriptionsConfig, main
    from interp.descriptions.stage import parse_features

    for bad in ("-1", "1,-2", "x", "1.5", "1,,2"):
        with pytest.raises(UserError, match="--features"):
            parse_features(bad)
    assert parse_features(" 3, 1,3 ") == {1, 3} and parse_features("") is None
    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    base = ["--train_folder", str(run), "--explainer", "tokens", "--device", "cpu"]
    refused(capsys, main, DescriptionsConfig, [*base, "--features", "3,99999"], "99999", "features 0..511")
    refused(capsys, main, DescriptionsConfig, [*base, "--features", "512", "--layers", "1"], "layer 1 has features")
    assert digest(run) == before


# ---- stage 4: what the scan keeps fits what it reads ----

def test_scan_settings_fit_the_tokens_and_sequences_scanned(tiny_topk, tiny_run, tmp_path, capsys):
    from get_topk_activations import IGNORED, TopKConfig, main

    run = copy_run(tiny_run, tmp_path / "run")  # its finished top-k output stays untouched, --overwrite or not
    fresh = copy_run(tiny_run, tmp_path / "fresh", "topk")  # no output yet: none may be started
    for folder in (run, fresh):
        before = digest(folder)
        base = ["--train_folder", str(folder), *TOPK_FLAGS, "--overwrite", "True"]
        tokens = "6,144 tokens the scan reads"  # 6 batches × 8 × 128
        refused(capsys, main, TopKConfig, [*base, "--n_top", "1000000000"], "--n_top 1,000,000,000", tokens,
                ignored=IGNORED)
        refused(capsys, main, TopKConfig, [*base, "--n_quantile", "6145"], "--n_quantile", tokens, ignored=IGNORED)
        refused(capsys, main, TopKConfig, [*base, "--n_random", "1000000"], "--n_random", tokens, ignored=IGNORED)
        refused(capsys, main, TopKConfig, [*base, "--context_before", "1000000000"],
                "= 1000000005 tokens", "--train_seq_len 128", ignored=IGNORED)
        refused(capsys, main, TopKConfig, [*base, "--context_before", "100", "--context_after", "28"],
                "fit in one sequence", ignored=IGNORED)
        refused(capsys, main, TopKConfig, [*base, "--train_seq_len", "100000", "--n_top", "10"],
                "window(s) of 100000 tokens", ignored=IGNORED)  # longer than the training split
        assert digest(folder) == before


# ---- stage 3: --resume names this run's transcoders; validation fits ----

def test_transcoder_resume_and_validation_length_are_checked(tiny_transcoders, tiny_run, tmp_path, capsys):
    from train_transcoders import TranscoderTrainConfig, main

    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    out = run / "transcoders" / "state_step000400"
    base = ["--train_folder", str(run), "--device", "cpu", "--train_seq_len", "128", "--batch_size", "8",
            "--grad_acc_steps", "1", "--train_steps", "400", "--expansion_factor", "4", "--k", "8",
            "--val_loss_every", "0", "--val_tokens", "8192", "--save_every", "0", "--dead_tokens", "50000"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    refused(capsys, main, TranscoderTrainConfig, [*base, "--resume", str(elsewhere)], "--resume", str(out))
    stray = tmp_path / "state_step000400.pt"
    shutil.copy(out / "state_step000400.pt", stray)
    refused(capsys, main, TranscoderTrainConfig, [*base, "--resume", str(stray)], "not a checkpoint of this run's")
    refused(capsys, main, TranscoderTrainConfig, [*base, "--val_tokens", "64", "--overwrite", "True"],
            "--val_tokens 64 is less than one validation sequence of 128")
    refused(capsys, main, TranscoderTrainConfig, [*base, "--val_seq_len", "100000", "--val_tokens", "1000000",
                                                  "--overwrite", "True"], "val split", "window(s) of 100000 tokens")
    assert digest(run) == before
    for ok in (str(out), str(run), str(out / "state_step000400.pt"), "latest"):  # all name this run: finished
        assert main(cli.parse_config(TranscoderTrainConfig, [*base, "--resume", ok])) == out
    assert digest(run) == before


# ---- the ground-truth benchmark: --val_tokens within the validation split ----

def test_ground_truth_val_tokens_within_the_split(tiny_transcoders, tiny_run, tmp_path, capsys):
    from interp.ground_truth.benchmark import GroundTruthConfig, main

    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    refused(capsys, main, GroundTruthConfig, ["--train_folder", str(run), "--device", "cpu", "--val_tokens",
                                              "1000000"], "holds 3,072 tokens", "(24 windows of 128)")
    assert digest(run) == before


# ---- exports: the Hub repository id before the export, a failed push after it ----

def test_hub_repository_id_is_checked_offline():
    from experiment.hub import check_repo_id

    for bad in ("bad name with spaces", "a/b/c", "user/re..po", "-x/y", "x" * 200):
        with pytest.raises(UserError, match="is not a Hub repository id"):
            check_repo_id(bad)
    check_repo_id("user/repo")
    check_repo_id("")


@pytest.mark.parametrize("module", ["experiment.hub", "interp.exports.circuit_tracer"])
def test_a_failed_push_leaves_a_complete_export(module, tiny_transcoders, tiny_run, tmp_path, capsys, monkeypatch):
    import importlib

    import huggingface_hub
    from huggingface_hub import errors

    def no_network(*args, **kwargs):
        raise getattr(errors, "HTTPError", OSError)("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    mod = importlib.import_module(module)
    cls = mod.HubConfig if module == "experiment.hub" else mod.CircuitTracerExportConfig
    run = copy_run(tiny_run, tmp_path / "run", "topk", "descriptions")
    out = tmp_path / "export"
    refused(capsys, mod.main, cls, ["--train_folder", str(run), "--output", str(out), "--push_to_hub",
                                           "user/repo"], "could not push to the Hub: [Errno -3] Temporary failure "
                                                         "in name resolution", f"the export is complete at {out}")
    names = {p.name for p in out.iterdir()}
    assert names >= ({"config.json", "README.md", "model.safetensors"} if module == "experiment.hub" else
                     {"config.yaml", "layer_0.safetensors", "layer_1.safetensors"})


# ---- training: weights that are no longer finite are never validated or saved ----

def test_diffusion_weights_that_turn_nan_are_never_saved(synthetic_data, tmp_path, monkeypatch):
    import training.diffusion
    from train_diffusion import main

    real, calls = training.diffusion.accumulate_gradients, []

    def poisoned(net, *args, **kwargs):  # step 10's loss is finite, its update is not
        sums = real(net, *args, **kwargs)
        calls.append(1)
        if len(calls) == 10:
            for p in net.parameters():
                p.grad.fill_(float("nan"))
        return sums

    monkeypatch.setattr(training.diffusion, "accumulate_gradients", poisoned)
    cfg = tiny_train_config(tmp_path, synthetic_data.folder.parent, train_steps=12, save_every=5, log_every=1)
    with pytest.raises(training.diffusion.TrainingDiverged, match=r"NaN or infinite at step 10.*state_step000005\.pt"):
        main(cfg)
    (folder,) = (tmp_path / "exp").iterdir()
    assert [p.name for p in list_checkpoints(folder)] == ["state_step000005.pt"]


def test_transcoder_weights_that_turn_nan_are_never_saved(tiny_run, tmp_path, monkeypatch):
    import training.transcoders
    from train_transcoders import main

    real, calls = training.transcoders.train_step, []

    def poisoned(model, transcoders, *args, **kwargs):  # step 10's FVU is finite, its weights are not
        fvu = real(model, transcoders, *args, **kwargs)
        calls.append(1)
        if len(calls) == 10:
            with torch.no_grad():
                next(iter(transcoders.parameters())).fill_(float("nan"))
        return fvu

    monkeypatch.setattr(training.transcoders, "train_step", poisoned)
    run = copy_run(tiny_run, tmp_path / "run", "transcoders", "topk", "descriptions")
    with pytest.raises(UserError, match=r"diverged at step 10 .*NaN or infinite.*state_step000005\.pt"):
        main(tiny_transcoder_config(run, train_steps=12, save_every=5, log_every=1))
    out = run / "transcoders" / "state_step000400"
    assert [p.name for p in list_checkpoints(out)] == ["state_step000005.pt"]
    from model.transcoder import Transcoder

    for layer in (0, 1):
        assert all(torch.isfinite(t).all() for t in Transcoder.load(out / f"blocks.{layer}.mlp").state_dict().values())
