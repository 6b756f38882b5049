import json
import shutil

import pytest
import torch

from core import cli
from experiment import list_checkpoints, read_metrics
from model.hooks import capture_mlps, replace_mlps
from model.objective import diffusion_loss, val_noise
from model.transcoder import Transcoder, TranscoderConfig, fraction_of_variance_unexplained
from tests.helpers import assert_one_line_error, run_cli, tiny_transcoder_config
from train_transcoders import TranscoderTrainConfig, main
from training.transcoders import update_dead

REFERENCE = ("--train_folder experiments/X --checkpoint_name state_step020000.pt --train_seq_len 4_096 --train_steps "
             "20_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 "
             "--val_loss_every 1_000 --save_every 2_000").split()


def random_transcoder(skip=False, seed=0) -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(TranscoderConfig(16, 64, 5, skip))
    with torch.no_grad():
        tc.encoder.bias.normal_(0, 0.3)
        tc.b_dec.normal_()
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc


@pytest.mark.parametrize("skip", [False, True])
def test_topk_forward_equals_dense_reference(skip):
    tc = random_transcoder(skip)
    x = torch.randn(50, 16)
    dense = torch.relu(x @ tc.encoder.weight.T + tc.encoder.bias)  # (N, M)
    kth = dense.topk(5, dim=-1).values[:, -1:]
    latents = torch.where(dense >= kth, dense, 0.0)
    assert ((latents > 0).sum(1) <= 5).all()
    reference = latents @ tc.W_dec + tc.b_dec + (x @ tc.W_skip.T if skip else 0)
    torch.testing.assert_close(tc(x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tc.dense_latents(x), latents)


def test_scaled_copy_scales_outputs_only():
    tc = random_transcoder(skip=True)
    x = torch.randn(20, 16)
    torch.testing.assert_close(tc.scaled(7.5)(x), 7.5 * tc(x), atol=1e-4, rtol=1e-5)
    assert torch.equal(tc.scaled(7.5).encode(x).indices.sort(1).values, tc.encode(x).indices.sort(1).values)


def test_fvu_of_perfect_and_mean_predictions():
    y = torch.randn(100, 8) * 3 + 1
    assert float(fraction_of_variance_unexplained(y, y)) == 0
    assert float(fraction_of_variance_unexplained(y, y.mean(0).expand_as(y))) == pytest.approx(1.0)
    tc = random_transcoder()
    y = torch.randn(30, 16)
    out = tc.loss(torch.randn(30, 16), y)
    assert float(out.fvu) == pytest.approx(float(fraction_of_variance_unexplained(y, out.output)))


def test_decoder_rows_stay_unit_norm():
    tc = random_transcoder()
    opt = torch.optim.Adam(tc.parameters(), lr=1e-2)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    for _ in range(5):
        out = tc.loss(torch.randn(40, 16), torch.randn(40, 16), dead)
        (out.fvu + out.auxk).backward()
        tc.remove_parallel_gradient()
        g, w = tc.W_dec.grad, tc.W_dec
        assert (g * w).sum(1).abs().max() < 1e-5  # no component along the rows
        opt.step()
        opt.zero_grad()
        tc.normalize_decoder()
        torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(64))
    assert float(out.auxk) > 0


def test_auxk_under_bf16_autocast():
    """On CUDA the loss runs under bf16 autocast; the CPU's bf16 autocast exercises the same dtype mix."""
    tc = random_transcoder()
    dead = torch.ones(64, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tc.loss(torch.randn(40, 16), torch.randn(40, 16), dead)
    assert torch.isfinite(out.auxk) and float(out.auxk) > 0


def test_dead_latent_counting():
    counter = torch.tensor([0, 5, 100, 100])
    update_dead(counter, torch.tensor([True, False, True, False]), 10)
    assert counter.tolist() == [0, 15, 0, 110]


def test_transcoders_on_the_tiny_model(tiny_transcoders, tiny_run):
    """Per-layer metrics after 400 steps (expansion 4, k 8): FVU, L0, dead fraction, spliced NELBO."""
    summary = json.loads((tiny_transcoders / "metrics.json").read_text())
    assert summary["step"] == 400
    for layer, m in summary["layers"].items():
        assert m["fvu"] < 0.2, (layer, m)  # measured: 0.05 (layer 0) and 0.14 (layer 1)
        assert 1 <= m["l0"] <= 8 and 0 <= m["dead_fraction"] < 0.5
        assert summary["base_nelbo"] < m["spliced_nelbo"] < summary["base_nelbo"] + 0.5, m
    assert summary["all_nelbo"] >= max(m["spliced_nelbo"] for m in summary["layers"].values()) - 0.05
    names = {p.name for p in tiny_transcoders.iterdir()}
    assert {"config.json", "metrics.json", "metrics.jsonl", "transcoders.png", "blocks.0.mlp", "blocks.1.mlp",
            "state_step000400.pt"} <= names
    assert tiny_transcoders == tiny_run / "transcoders" / "state_step000400"


def test_spliced_nelbo_goes_through_the_real_model(tiny_transcoders, tiny_run):
    """Recompute layer 1's spliced NELBO by hand from the saved files; the real MLP as its own
    replacement must give exactly the base NELBO."""
    from data.loader import ShardLoader
    from experiment import load_run

    config, model, tok, _ = load_run(tiny_run, "latest", "cpu")
    tc = Transcoder.load(tiny_transcoders / "blocks.1.mlp")
    loader = ShardLoader(config["data"]["folder"], "val", 128, 8)
    n = loader.n_sequential(8192)
    sums = {"base": torch.zeros(2, dtype=torch.float64), "tc": torch.zeros(2, dtype=torch.float64),
            "self": torch.zeros(2, dtype=torch.float64)}
    for batch in loader.sequential(8192):
        t, u = val_noise(batch.index, n, 1234, 128)
        for name, repl in (("base", {}), ("tc", {1: tc}), ("self", {1: model.blocks[1].mlp.forward})):
            with torch.no_grad(), replace_mlps(model, repl):
                terms = diffusion_loss(model, batch.tokens, t, u)
            sums[name] += torch.stack([terms.weighted_ce.double(), terms.n_maskable.double()])
    nelbo = {k: float(v[0] / v[1]) for k, v in sums.items()}
    summary = json.loads((tiny_transcoders / "metrics.json").read_text())
    assert nelbo["self"] == nelbo["base"] == pytest.approx(summary["base_nelbo"], rel=1e-6)
    assert nelbo["tc"] == pytest.approx(summary["layers"]["1"]["spliced_nelbo"], rel=1e-5)
    assert nelbo["tc"] != nelbo["base"]


def test_sparsify_loads_the_files_and_computes_the_same(tiny_transcoders, tiny_run):
    sparsify = pytest.importorskip("sparsify")
    from experiment import load_run

    _, model, _, _ = load_run(tiny_run, "latest", "cpu")
    tokens = torch.randint(0, model.cfg.n_vocab, (2, 64))
    with torch.no_grad(), capture_mlps(model, [0]) as seen:
        model(tokens)
    x = seen[0][0].reshape(-1, model.cfg.model_dim)
    ours = Transcoder.load(tiny_transcoders / "blocks.0.mlp")
    theirs = sparsify.SparseCoder.load_from_disk(tiny_transcoders / "blocks.0.mlp")
    assert theirs.cfg.transcode and theirs.cfg.k == 8 and theirs.num_latents == 512
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).sae_out, ours(x), atol=1e-4, rtol=1e-4)
    # the folders are named by the module they read: load_many keys by module path, and each key is a module
    many = sparsify.SparseCoder.load_many(str(tiny_transcoders), local=True)
    assert list(many) == ["blocks.0.mlp", "blocks.1.mlp"]
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], type(model.blocks[0].mlp)) for name in many)


def test_runs_with_the_older_layer_folders_still_load(tiny_transcoders, tmp_path):
    from experiment import finished_transcoder_layers, load_transcoders, transcoder_dir

    old = tmp_path / "old"
    old.mkdir()
    for layer in (0, 1):
        shutil.copytree(tiny_transcoders / f"blocks.{layer}.mlp", old / f"layer_{layer:02d}")
    assert finished_transcoder_layers(old) == [0, 1] and transcoder_dir(old, 1) == old / "layer_01"
    loaded = load_transcoders(old, [0, 1], "cpu", 128)
    new = Transcoder.load(tiny_transcoders / "blocks.1.mlp")
    assert all(torch.equal(a, b) for a, b in zip(loaded[1].state_dict().values(), new.state_dict().values()))
    shutil.copytree(tiny_transcoders / "blocks.1.mlp", old / "blocks.1.mlp")  # both: the module path wins
    assert transcoder_dir(old, 1) == old / "blocks.1.mlp" and finished_transcoder_layers(old) == [0, 1]


def test_resume_equals_an_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    import training.transcoders as tt

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for dst in (run_a, run_b):  # two copies of the base run, each with its own transcoders folder
        dst.mkdir()
        for f in tiny_run.iterdir():
            if f.is_file():
                shutil.copy(f, dst / f.name)
    kw = dict(train_steps=6, save_every=3, val_loss_every=3, log_every=1)
    a = main(tiny_transcoder_config(run_a, **kw))

    real = tt.save_checkpoint

    def save_then_die(path, state):
        real(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(tt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_transcoder_config(run_b, **kw))
    monkeypatch.setattr(tt, "save_checkpoint", real)
    b = run_b / "transcoders" / "state_step000400"
    assert [p.name for p in list_checkpoints(b)] == ["state_step000003.pt"]
    assert main(tiny_transcoder_config(run_b, **kw)) == b  # the same command resumes
    sa = torch.load(a / "state_step000006.pt", weights_only=True)
    sb = torch.load(b / "state_step000006.pt", weights_only=True)
    for name in sa["model"]:
        assert torch.equal(sa["model"][name], sb["model"][name]), name
    for layer in sa["dead_tokens"]:
        assert torch.equal(sa["dead_tokens"][layer], sb["dead_tokens"][layer])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    # a finished job is not redone, and other settings are refused rather than mixed in
    assert main(tiny_transcoder_config(run_b, **kw)) == b
    with pytest.raises(cli.UserError, match="other settings"):
        main(tiny_transcoder_config(run_b, **{**kw, "k": 4}))


def test_two_process_ddp_equals_one_process(tiny_run, tmp_path):
    """torchrun with two gloo processes trains the same transcoders as one process with the same global batch."""
    runs = []
    for name in ("one", "two"):
        dst = tmp_path / name
        later_stages = shutil.ignore_patterns("transcoders", "topk", "descriptions", "explanations")
        shutil.copytree(tiny_run, dst, ignore=later_stages)
        runs.append(dst)
    flags = ["--device", "cpu", "--train_seq_len", "128", "--batch_size", "4", "--grad_acc_steps", "2",
             "--train_steps", "6", "--expansion_factor", "4", "--k", "8", "--val_loss_every", "3",
             "--val_tokens", "4096", "--save_every", "0", "--log_every", "1"]
    assert run_cli(["train_transcoders.py", "--train_folder", str(runs[0]), *flags]).returncode == 0
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_transcoders.py",
                    "--train_folder", str(runs[1]), *flags], timeout=300)
    assert proc.returncode == 0, [line for line in proc.stderr.splitlines() if "step/s" not in line][:60]
    m1, m2 = (read_metrics(r / "transcoders" / "state_step000400") for r in runs)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for a, b in zip(m1, m2):
        if a["event"] == "train":
            assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-3)
        else:
            for layer in a["layers"]:
                assert a["layers"][layer]["fvu"] == pytest.approx(b["layers"][layer]["fvu"], rel=1e-3)
            assert a["all_nelbo"] == pytest.approx(b["all_nelbo"], rel=1e-3)


def test_reference_command_line_parses(reference_machine):
    cfg = cli.parse_config(TranscoderTrainConfig, REFERENCE)
    assert (cfg.train_seq_len, cfg.train_steps, cfg.grad_acc_steps, cfg.num_layers, cfg.save_model, cfg.cuda,
            cfg.expansion_factor, cfg.k, cfg.mask_ratio) == (4096, 20_000, 8, 12, True, 1, 32, 32, "random")


@pytest.mark.parametrize("extra,needle", [
    (["--checkpoint_name", "state_step000123.pt"], "does not exist; available"),
    (["--model_dim", "384"], "--model_dim 384 disagrees"),
    (["--k", "9999", "--expansion_factor", "2"], "larger than the 256 latents"),
    (["--layers", "0,7"], "layers 0..1"),
    (["--mask_ratio", "1.5"], "[0, 1]"),
])
def test_bad_inputs(tiny_run, extra, needle):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    proc = run_cli(["train_transcoders.py", "--train_folder", str(tiny_run), "--device", "cpu", "--train_steps", "2",
                    "--train_seq_len", "128", "--val_tokens", "1024", *extra])
    assert_one_line_error(proc, needle)
    assert before == sorted(p.name for p in tiny_run.rglob("*"))


@pytest.mark.slow
def test_missing_train_folder(tmp_path):
    assert_one_line_error(run_cli(["train_transcoders.py", "--train_folder", str(tmp_path / "x")]), "does not exist")
