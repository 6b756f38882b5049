import json
import math

import numpy as np
import pytest
import torch

from core import cli
from data.shards import read_shard
from experiment import list_checkpoints, read_metrics
from model.diffusion import DiffusionLM
from tests.helpers import assert_one_line_error, run_cli, tiny_train_config
from train_diffusion import TrainConfig, main

REFERENCE = ("--train_seq_len 4_096 --val_seq_len 4_096 --train_steps 20_000 --grad_acc_steps 8 --num_layers 12 "
             "--num_heads 6 --model_dim 384 "
             "--save_model True --cuda 3 --val_loss_every 1_000 --save_every 2_000").split()


def unigram_entropy(prepared) -> float:
    folder, tok, meta = prepared
    tokens = np.concatenate([np.asarray(read_shard(folder / s["file"])) for s in meta["shards"][1:]])
    p = np.bincount(tokens[tokens != tok.bos_id]) / np.sum(tokens != tok.bos_id)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_reference_command_line_parses(reference_machine):
    cfg = cli.parse_config(TrainConfig, REFERENCE)
    assert (cfg.train_seq_len, cfg.val_seq_len, cfg.train_steps, cfg.grad_acc_steps, cfg.num_layers, cfg.num_heads,
            cfg.model_dim, cfg.save_model, cfg.cuda, cfg.val_loss_every, cfg.save_every, cfg.batch_size) == (
        4096, 4096, 20_000, 8, 12, 6, 384, True, 3, 1000, 2000, 1)


def test_tiny_model_learns_the_synthetic_corpus(tiny_run, synthetic_data):
    """Validation NELBO after 400 tiny steps vs the corpus's unigram entropy (docs/stages/1-train.md quotes both)."""
    val = [r for r in read_metrics(tiny_run) if r["event"] == "val"]
    entropy = unigram_entropy(synthetic_data)
    assert 4.5 < entropy < 5.2  # the 0.3 MB corpus: 4.85 nats/token
    assert val[-1]["val_nelbo"] < entropy - 2.5, (val[-1], entropy)  # measured: 1.5 nats/token
    assert val[-1]["val_bits_per_token"] == pytest.approx(val[-1]["val_nelbo"] / math.log(2))
    assert val[-1]["val_ppl_bound"] == pytest.approx(math.exp(val[-1]["val_nelbo"]))


def test_run_folder_contract(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "metadata.json", "tokenizer.json", "metrics.jsonl", "log.txt", "loss.png",
            "state_step000200.pt", "state_step000400.pt"} <= names
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["num_layers"] == 2 and config["tokenizer"]["kind"] == "bpe"
    assert config["data"]["train_files"] == ["synthetic_train_000001.bin"]  # the shards this run reads, for good
    assert json.loads((tiny_run / "metadata.json").read_text())["torch"] == torch.__version__
    state = torch.load(tiny_run / "state_step000400.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 400 and len(state["optimizers"]) == 2 and "data_position" in state
    model = DiffusionLM.load(tiny_run / "state_step000400.pt", "cpu")  # strict load
    assert model.cfg.model_dim == 128
    losses = [r["loss"] for r in read_metrics(tiny_run) if r["event"] == "train"]
    assert losses[-1] < 0.6 * losses[0]


def test_two_n_steps_equal_n_plus_resume_plus_n(synthetic_data, tmp_path, monkeypatch):
    data_dir = synthetic_data.folder.parent
    kw = dict(train_steps=8, save_every=4, val_loss_every=4, log_every=3)  # a log interval spans the resume
    straight = main(tiny_train_config(tmp_path / "a", data_dir, **kw))

    real_save, saved = DiffusionLM.save, []

    def save_then_die(self, path, extra=None):
        real_save(self, path, extra)
        saved.append(path)
        raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(DiffusionLM, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_train_config(tmp_path / "b", data_dir, **kw))
    monkeypatch.setattr(DiffusionLM, "save", real_save)
    folder = saved[0].parent
    assert [p.name for p in list_checkpoints(folder)] == ["state_step000004.pt"]
    resumed = main(tiny_train_config(tmp_path / "b", data_dir, resume=str(folder), **kw))
    assert resumed == folder

    a = torch.load(straight / "state_step000008.pt", weights_only=True)
    b = torch.load(folder / "state_step000008.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(folder))  # one curve, no duplicated steps


def test_packed_runs_resume_exactly_and_may_change_the_packing(synthetic_data, tmp_path, monkeypatch):
    """--forward_batch_size (micro-batches packed into one forward pass) is recorded like any flag; a packed
    run resumes bit for bit; and it is not a setting a resumed run must keep: the result stays that of the
    same sequences and noise, up to float sums."""
    import shutil

    data_dir = synthetic_data.folder.parent
    kw = dict(train_steps=6, save_every=3, log_every=2, batch_size=4, grad_acc_steps=2)
    straight = main(tiny_train_config(tmp_path / "a", data_dir, forward_batch_size=8, **kw))
    assert json.loads((straight / "config.json").read_text())["train"]["forward_batch_size"] == 8
    assert "2 micro-batches per forward pass" in (straight / "log.txt").read_text()

    real_save, saved = DiffusionLM.save, []

    def save_then_die(self, path, extra=None):
        real_save(self, path, extra)
        saved.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionLM, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_train_config(tmp_path / "b", data_dir, forward_batch_size=8, **kw))
    monkeypatch.setattr(DiffusionLM, "save", real_save)
    folder = saved[0].parent
    other = shutil.copytree(folder, tmp_path / "c" / folder.name)
    main(tiny_train_config(tmp_path / "b", data_dir, forward_batch_size=8, resume=str(folder), **kw))
    main(tiny_train_config(tmp_path / "c", data_dir, forward_batch_size=4, resume=str(other), **kw))

    a = torch.load(straight / "state_step000006.pt", weights_only=True)["model"]
    b = torch.load(folder / "state_step000006.pt", weights_only=True)["model"]
    c = torch.load(other / "state_step000006.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    torch.testing.assert_close(c["head.weight"], a["head.weight"], atol=1e-3, rtol=0)  # see the DDP test below
    losses = [[r["loss"] for r in read_metrics(run) if r["event"] == "train"] for run in (straight, other)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(synthetic_data, tmp_path):
    common = ["--dataset", "synthetic", "--synthetic_mb", "0.3", "--data_dir", str(synthetic_data.folder.parent),
              "--device", "cpu", "--num_layers", "2", "--num_heads", "2", "--model_dim", "64", "--train_seq_len", "128",
              "--val_seq_len", "128", "--val_tokens", "8192", "--batch_size", "2", "--grad_acc_steps", "2",
              "--train_steps", "6", "--log_every", "1", "--val_loss_every", "3", "--save_every", "0"]
    single = run_cli(["train_diffusion.py", *common, "--experiments_dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_diffusion.py",
                   *common, "--experiments_dir", str(tmp_path / "two")], timeout=300)
    assert ddp.returncode == 0, [line for line in ddp.stderr.splitlines() if "step/s" not in line][:60]
    (one,), (two,) = (tmp_path / "one").iterdir(), (tmp_path / "two").iterdir()
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        key = "loss" if r1["event"] == "train" else "val_nelbo"
        assert r1[key] == pytest.approx(r2[key], rel=1e-4), (r1, r2)
    # Weights: Adam (eps 1e-10) and Muon turn near-zero gradients into full-size steps, so summation order
    # alone moves some embedding and block entries (one process with 1 vs 2 threads differs as much).
    # The loss curve above is the real check; the head, fed by large gradients, must agree closely too.
    w1 = torch.load(one / "state_step000006.pt", weights_only=True)["model"]
    w2 = torch.load(two / "state_step000006.pt", weights_only=True)["model"]
    torch.testing.assert_close(w1["head.weight"], w2["head.weight"], atol=1e-3, rtol=0)
    assert "2 process(es)" in (two / "log.txt").read_text()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_data, tmp_path, monkeypatch):
    import model.objective
    import training.diffusion

    real, calls = model.objective.diffusion_loss, []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # the 7th training batch (validation is off)
            return terms._replace(weighted_ce=terms.weighted_ce * float("nan"))
        return terms

    monkeypatch.setattr(training.diffusion, "diffusion_loss", poisoned)
    cfg = tiny_train_config(tmp_path, synthetic_data.folder.parent, train_steps=10, save_every=5)
    with pytest.raises(training.diffusion.TrainingDiverged, match="step 7.*state_step000005.pt"):
        main(cfg)
    (folder,) = (tmp_path / "exp").iterdir()
    assert [p.name for p in list_checkpoints(folder)] == ["state_step000005.pt"]
    DiffusionLM.load(folder / "state_step000005.pt")  # intact


@pytest.mark.slow
def test_tiny_command_line_end_to_end(tmp_path):
    """The tiny command of docs/stages/1-train.md, exactly, plus where to put its files."""
    proc = run_cli(["train_diffusion.py", "--dataset", "synthetic", "--device", "cpu", "--num_layers", "2",
                    "--model_dim", "64", "--num_heads", "2", "--train_seq_len", "256", "--train_steps", "200",
                    "--data_dir", str(tmp_path / "data"), "--experiments_dir", str(tmp_path / "exp"),
                    "--val_seq_len", "256", "--val_tokens", "32_768"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp_path / "exp").iterdir()
    val = [r for r in read_metrics(folder) if r["event"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 200 and val[-1]["val_nelbo"] < val[0]["val_nelbo"] - 3


@pytest.mark.slow
@pytest.mark.parametrize("argv,needle", [
    (["--train_steps", "0"], "--train_steps must be positive"),
    (["--model_dim", "30", "--num_heads", "4"], "not divisible"),
    (["--cuda", "3", "--dataset", "synthetic"], "cuda:3 does not exist"),
    (["--device", "tpu"], "use cpu, cuda or cuda:N"),
    (["--val_tokens", "100"], "less than one --val_seq_len"),
    (["--resume", "nowhere/run"], "nowhere/run does not exist"),
])
def test_bad_inputs_are_one_line_errors(argv, needle, tmp_path):
    if "--cuda" in argv and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    proc = run_cli(["train_diffusion.py", *argv, "--experiments_dir", str(tmp_path / "exp"),
                    "--data_dir", str(tmp_path / "data")])
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())


def test_resume_with_another_shape_is_refused(tiny_run, synthetic_data):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    proc = run_cli(["train_diffusion.py", "--resume", str(tiny_run), "--model_dim", "96", "--device", "cpu"])
    width = json.loads((tiny_run / "config.json").read_text())["train"]["model_dim"]
    assert_one_line_error(proc, f"--resume: the run was trained with other settings {{'model_dim': ({width}, 96)}}")
    assert before == {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}


def test_sequence_lengths_flex_cannot_take_are_refused_on_cuda(synthetic_data, tmp_path, monkeypatch):
    import training.diffusion
    from model.distributed import Dist

    monkeypatch.setattr(training.diffusion, "setup_distributed", lambda cfg: (Dist(), torch.device("cuda:0")))
    cfg = tiny_train_config(tmp_path, synthetic_data.folder.parent, train_seq_len=100)
    with pytest.raises(cli.UserError, match="multiples of 128"):
        main(cfg)
