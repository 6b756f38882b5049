"""The compiled path (torch.compile, as on a GPU) checked on the CPU: training steps of the diffusion model and
of the transcoders (masked SDPA: torch 2.13 has no FlexAttention backward on the CPU), and the scan and a
denoising step compiled with the FlexAttention document mask. Each: no graph break, no new graph after the
first step (dynamo's counters), results equal to the eager path within tolerance."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

import training.diffusion
import training.transcoders
from tests.helpers import tiny_train_config, tiny_transcoder_config


@pytest.fixture
def dynamo():
    """Fresh dynamo caches and counters, and after each step the number of graphs compiled so far."""
    torch._dynamo.reset()
    counters.clear()
    graphs_after_step: list[int] = []
    yield graphs_after_step
    torch._dynamo.reset()


def record_graphs(monkeypatch, module, graphs_after_step: list[int]) -> None:
    """Wrap the stage's step loop so that each optimizer step reports how many graphs exist after it."""
    real = module.run_training_steps

    def run_training_steps(cfg, start, tokens_per_step, show, step, *rest):
        def counted(index):
            step(index)
            graphs_after_step.append(counters["stats"]["unique_graphs"])
        return real(cfg, start, tokens_per_step, show, counted, *rest)

    monkeypatch.setattr(module, "run_training_steps", run_training_steps)


def assert_compiled_once(graphs_after_step: list[int], most: int) -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= graphs_after_step[0] <= most, graphs_after_step
    assert graphs_after_step == [graphs_after_step[0]] * len(graphs_after_step), "recompiled after the first step"


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_diffusion_training_compiled_equals_eager(synthetic_data, tmp_path, monkeypatch, dynamo):
    from train_diffusion import main

    def run(name, compile_):
        cfg = tiny_train_config(tmp_path / name, synthetic_data.folder.parent, train_steps=6, log_every=1,
                                val_loss_every=3, val_tokens=2048, compile=compile_)
        return metrics(main(cfg))

    eager = run("eager", False)
    record_graphs(monkeypatch, training.diffusion, dynamo)
    compiled = run("compiled", True)
    # the blocks' training graph (forward and backward) and validation's no-grad graph, both before step 2
    assert_compiled_once(dynamo, most=2)
    assert len(dynamo) == 6
    for a, b in zip(eager, compiled, strict=True):
        assert a["event"] == b["event"] and a["step"] == b["step"]
        for key in ("loss", "val_nelbo"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)


def test_transcoder_training_compiled_equals_eager(tiny_run, tiny_transcoders, tmp_path, monkeypatch, dynamo):
    """AuxK included: with --dead_tokens 1 every latent that did not fire in the last step is dead."""
    import shutil

    from train_transcoders import main

    def run(name, compile_):
        run_dir = tmp_path / name
        shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("transcoders", "topk", "descriptions",
                                                                          "explanations", "exports", "hub"))
        cfg = tiny_transcoder_config(run_dir, train_steps=5, log_every=1, dead_tokens=1, compile=compile_)
        return metrics(main(cfg))

    eager = run("eager", False)
    record_graphs(monkeypatch, training.transcoders, dynamo)
    compiled = run("compiled", True)
    # the first step compiles the blocks and the loss without AuxK (no latent is dead yet); the second adds the
    # loss with AuxK (every latent that did not fire is dead at --dead_tokens 1); then nothing recompiles
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(dynamo) == 5 and dynamo[0] <= 2 and dynamo[1] <= 3 and dynamo[1:] == [dynamo[1]] * 4, dynamo
    steps = [(a, b) for a, b in zip(eager, compiled, strict=True) if a["event"] == "train"]
    assert len(steps) == 5
    for a, b in steps:
        for layer, fvu in a["fvu"].items():
            assert b["fvu"][layer] == pytest.approx(fvu, rel=1e-4, abs=1e-6), (a, b)


def test_auxk_equals_a_per_token_reference():
    """The fixed-shape AuxK equals taking exactly min(d_in/2, dead) dead latents token by token."""
    from model.transcoder import Transcoder, TranscoderConfig

    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(16, 64, 4))
    x, err = torch.randn(20, 16), torch.randn(20, 16)
    pre = torch.nn.functional.relu(tc.encoder(x)) - 0.1  # some dead latents below zero
    tv = torch.tensor(37.0)
    for n_dead in (0, 3, 8, 40):
        dead = torch.zeros(64, dtype=torch.bool)
        dead[torch.randperm(64)[:n_dead]] = True
        want = 0.0
        if n_dead:
            k = min(8, n_dead)
            for i in range(20):
                vals, idx = pre[i, dead].topk(k)
                rows = torch.nonzero(dead)[:, 0][idx]
                want += ((vals.clamp_min(0)[:, None] * tc.W_dec[rows]).sum(0) - err[i]).pow(2).sum()
            want = min(n_dead / 8, 1.0) * want / tv
        got = tc.auxk_loss(pre, err, dead, tv)
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-7), n_dead


def test_scan_and_denoising_step_compiled_with_flex_equal_sdpa(tiny_run, tiny_transcoders, tmp_path, dynamo):
    """The scan (both passes) and a generation through blocks compiled with the FlexAttention document mask."""
    from data.loader import ShardLoader
    from experiment import load_run, load_transcoders, open_data
    from interp.contexts.scan import ScanSettings, scan
    from model.sampler import SamplerConfig, generate

    config, eager, tok, ckpt = load_run(tiny_run, "latest", "cpu")
    _, flex, _, _ = load_run(tiny_run, "latest", "cpu")
    flex.compile_blocks(attn_impl="flex")
    tcs = load_transcoders(tiny_transcoders, [0, 1], "cpu", eager.cfg.model_dim)
    loader = ShardLoader(open_data(config).folder, "train", 128, 8, 0, files=config["data"].get("train_files"))
    s = ScanSettings(n_batches=3, n_top=5, context_before=4, context_after=2, n_quantile=4, n_random=4)
    with torch.no_grad():
        ref, _ = scan(eager, tcs, loader, s, "cpu", tmp_path / "a.pt")
        got, _ = scan(flex, tcs, loader, s, "cpu", tmp_path / "b.pt")
    graphs_after_scan = counters["stats"]["unique_graphs"]
    for layer in (0, 1):
        torch.testing.assert_close(got[layer].top.values, ref[layer].top.values, rtol=1e-4, atol=1e-5)
        assert torch.equal(got[layer].fire_count, ref[layer].fire_count)
        torch.testing.assert_close(got[layer].win_acts["top"], ref[layer].win_acts["top"], rtol=1e-4, atol=1e-5)
    # a denoising run: the same logits at every step, so greedy decoding commits the same tokens
    prompts = [tok.encode("The capital of France is")] * 2
    cfg = SamplerConfig(gen_length=16, steps=4, temperature=0.0)
    a, b = generate(eager, prompts, cfg), generate(flex, prompts, cfg)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 1 <= graphs_after_scan <= 2
    # generation's shapes differ from the scan's: at most one more graph, and none per denoising step
    assert counters["stats"]["unique_graphs"] <= graphs_after_scan + 1
