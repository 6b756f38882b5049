"""The interpretation stages on a model held in bfloat16 (how a GPU holds LLaDA-8B and Dream-7B), on the CPU with
the three tiny architectures converted with `.to(torch.bfloat16)`: the local replacement model and the graph run
in float32, each weight read as float32 for its own matmul only (never a float32 copy of the model or of the whole
head), so a bf16 model's frozen step is exactly the frozen step of the same weights held in float32; the
interventions re-run the bf16 model itself; the transcoder stage and the scan train and read float32 transcoders
on its MLPs."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import interp.explanations.replacement as replacement
from interp.contexts.logits import decoder_logits
from interp.explanations.graph import build_graph
from interp.explanations.interventions import run_step
from interp.explanations.replacement import (
    committable,
    committable_mean,
    freeze,
    head_logits,
    linear_forward,
    mlp_forward,
    target_cotangents,
)
from model.public_models import load_public_model
from tests import test_replacement_public as float32_tests
from tests.test_graph import assert_graph_adds_up
from tests.test_replacement_public import ARCHS, STEPS, random_transcoders, tiny_model

# the bf16 model's own logits against its frozen float32 step, as a share of the largest logit: measured 0.011
# (ours), 0.0084 (LLaDA), 0.0076 (Dream); the model's bf16 residual is rounded (2^-8 relative) at every layer and
# its logits come out of a bf16 head, the frozen step's stay float32
BF16_REL = 2 ** -5


def bf16_tolerance(x: torch.Tensor) -> float:
    return BF16_REL * float(x.abs().max())


@pytest.fixture(scope="module", params=ARCHS)
def step(request, tmp_path_factory):
    """(bf16 model, the same weights held in float32, transcoders (float32), tokens, positions, targets)."""
    arch = request.param
    bf16 = tiny_model(arch, tmp_path_factory, torch.bfloat16).to(torch.bfloat16)
    upcast = copy.deepcopy(bf16).float()
    tokens, positions, targets, layers = STEPS[arch]
    return bf16, upcast, random_transcoders(bf16.cfg.model_dim, layers, 1), torch.tensor(tokens), positions, targets


class Casts(TorchDispatchMode):
    """Records every dtype cast of a tensor that shares its storage with one of `watched` (a weight or a slice of
    it): (name, shape of the cast)."""

    def __init__(self, watched: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.watched = {w.untyped_storage().data_ptr(): name for name, w in watched.items()}
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            name = self.watched.get(args[0].untyped_storage().data_ptr())
            if name is not None:
                self.seen.append((name, tuple(out.shape)))
        return out


def test_the_mlp_read_in_float32_is_the_modules_forward(step):
    _, upcast, _, _, _, _ = step
    x = torch.randn(5, upcast.cfg.model_dim)
    for block in upcast.blocks:
        assert torch.equal(mlp_forward(block.mlp, x), block.mlp(x))


def test_a_bf16_model_is_frozen_in_float32(step):
    """Every frozen quantity is float32 and equals the frozen step of the same weights held in float32;
    linear_forward reproduces it; the logits are the bf16 model's own to bf16's tolerance."""
    bf16, upcast, tcs, tokens, positions, targets = step
    fz, ref = freeze(bf16, tcs, tokens), freeze(upcast, tcs, tokens)
    for name, value in vars(fz).items():
        for a, b in zip(value if isinstance(value, list) else [value], ref.__dict__[name] if isinstance(
                value, list) else [ref.__dict__[name]]):
            assert a.dtype == b.dtype and a.dtype in (torch.float32, torch.long), name
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(linear_forward(bf16, tcs, fz), fz.residual, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        own = bf16(tokens[None]).logits[0]
    assert own.dtype == torch.float32 and fz.logits.shape == own.shape
    err = float((fz.logits - own).abs().max())
    assert 0 < err < bf16_tolerance(own), err  # 0 would mean the frozen step ran in bf16
    g, values = target_cotangents(bf16, fz, positions, targets)
    g_ref, values_ref = target_cotangents(upcast, ref, positions, targets)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values, values_ref, atol=1e-5, rtol=1e-5)


def test_the_head_is_read_in_chunks_of_rows(step, monkeypatch):
    """head_logits and committable_mean in chunks that do not divide the vocabulary equal the whole head's; with
    HEAD_ROWS small, no cast of the head in freeze, build_graph or target_cotangents holds more rows than it."""
    bf16, upcast, tcs, tokens, positions, targets = step
    n, W = upcast.cfg.n_vocab, upcast.head.weight
    keep = committable(n, upcast.cfg.never_predicted(), "cpu")
    h = torch.randn(4, upcast.cfg.model_dim)
    torch.testing.assert_close(head_logits(bf16, h, rows=7), h @ bf16.head.weight[:n].float().T, atol=1e-5,
                               rtol=1e-5)
    assert torch.equal(head_logits(upcast, h), upcast.raw_logits(h))  # a float32 head: the model's own matmul
    torch.testing.assert_close(committable_mean(bf16, rows=7), W[:n][keep].mean(0), atol=1e-6, rtol=1e-5)
    monkeypatch.setattr(replacement, "HEAD_ROWS", 16)
    weights = {name: p for name, p in bf16.named_parameters()}
    with Casts(weights) as casts:
        build_graph(bf16, tcs, tokens, positions, targets)
    heads = [shape for name, shape in casts.seen if name == "head.weight"]
    assert heads and max(rows for rows, _ in heads) == 16, heads
    assert len(heads) == 2 * math.ceil(n / 16)  # freeze's logits and the targets' mean
    # every other weight is cast whole, one at a time, for its own matmul: never a larger float32 tensor
    assert all(shape == tuple(weights[name].shape) for name, shape in casts.seen if name != "head.weight")


def test_the_graph_of_a_bf16_model_is_that_of_its_float32_weights(step):
    """The adjacency, values and bias inputs equal those of the same weights in float32, whose batched backward
    is autograd's (the float32 test, run on those weights); the parts add up to each target."""
    bf16, upcast, tcs, tokens, positions, targets = step
    g, _ = build_graph(bf16, tcs, tokens, positions, targets, batch_size=5)
    ref, _ = build_graph(upcast, tcs, tokens, positions, targets, batch_size=5)
    assert torch.equal(g.feature_nodes, ref.feature_nodes)
    for name in ("adjacency", "activations", "target_values", "bias_inputs", "encoder_bias", "logprobs"):
        torch.testing.assert_close(getattr(g, name), getattr(ref, name), atol=1e-5, rtol=1e-5, msg=name)
    float32_tests.test_the_batched_backward_equals_autograd((upcast, tcs, tokens, positions, targets))
    assert_graph_adds_up(g)


def test_interventions_rerun_the_bf16_model(step):
    """The step as it ran gives the graph's target values to bf16's tolerance, in the model and in the replacement
    model; steering the strongest feature to 5× its activation moves the targets as it moves them in the same
    weights held in float32, to bf16's tolerance (measured: within 0.015 of moves up to 0.31)."""
    bf16, upcast, tcs, tokens, positions, targets = step
    g, fz = build_graph(bf16, tcs, tokens, positions, targets)
    base = run_step(bf16, tcs, fz, positions, targets)
    tol = bf16_tolerance(g.target_values)
    torch.testing.assert_close(base.value, g.target_values, atol=tol, rtol=0)
    torch.testing.assert_close(run_step(bf16, tcs, fz, positions, targets, replacement=True).value, base.value,
                               atol=tol, rtol=0)
    i = int(g.activations.argmax())
    layer, pos, f = g.feature_nodes[i].tolist()
    setting = {(layer, pos, f): 5 * float(g.activations[i])}
    moved = run_step(bf16, tcs, fz, positions, targets, setting).value - base.value
    fz32 = freeze(upcast, tcs, tokens)
    moved32 = (run_step(upcast, tcs, fz32, positions, targets, setting).value
               - run_step(upcast, tcs, fz32, positions, targets).value)
    assert moved32.abs().max() > 3e-2  # a move larger than the noise of bf16
    torch.testing.assert_close(moved, moved32, atol=tol / 2, rtol=0)


def test_decoder_logits_of_a_bf16_head_in_chunks(step):
    """A feature's promoted and suppressed tokens from a bf16 head read in chunks of rows that do not divide the
    vocabulary (no cast of more rows than that): those of the same weights in float32, read whole."""
    from model.transcoder import Transcoder, TranscoderConfig

    bf16, upcast, _, _, _, _ = step
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(bf16.cfg.model_dim, 16, 4))
    with torch.no_grad():
        tc.W_dec.normal_()
    pieces = [f"p{i}" for i in range(bf16.cfg.n_vocab)]
    with Casts({"head": bf16.head.weight}) as casts:
        got = decoder_logits(bf16, tc, pieces, k=5, chunk=7, vocab_chunk=11)
    assert casts.seen and max(rows for _, (rows, _) in casts.seen) == 11
    want = decoder_logits(upcast, tc, pieces, k=5, chunk=16, vocab_chunk=10_000)
    for a, b in zip(got, want):
        for kind in ("promotes", "suppresses"):
            assert [p for p, _ in a[kind]] == [p for p, _ in b[kind]]
            assert [v for _, v in a[kind]] == pytest.approx([v for _, v in b[kind]], abs=2e-4)  # rounded to 4 places


# ---- stage 3 and stage 4 on a tiny released-style run whose model is loaded in bf16 ----

@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_transcoders_and_scan_on_a_bf16_base_model(family, tmp_path, monkeypatch):
    """experiment/runs.py made to load the released model in bf16 (as on a GPU): stage 3 trains float32
    transcoders on its MLP pairs with a finite FVU and finite NELBOs (its own and with transcoders spliced in),
    and stage 4 scans with them."""
    import experiment.runs as runs
    from experiment.init_base import InitBaseConfig, main as init_base
    from interp.contexts.command import main as topk
    from tests.helpers import tiny_topk_config, tiny_transcoder_config
    from tests.public_tokenizers import write_bpe_public_folder
    from training.transcoders_command import main as transcoders

    loaded = []

    def load_bf16(folder, device="cpu", dtype=None):
        loaded.append(load_public_model(folder, device, torch.bfloat16))
        return loaded[-1]

    monkeypatch.setattr(runs, "load_public_model", load_bf16)
    model = write_bpe_public_folder(tmp_path / "model", family)
    run = init_base(InitBaseConfig(model=str(model), dataset="synthetic", synthetic_mb=0.02, workers=1,
                                   data_dir=str(tmp_path / "data"), experiments_dir=str(tmp_path / "exp")))
    tc = transcoders(tiny_transcoder_config(run, train_seq_len=64, batch_size=4, train_steps=10, val_loss_every=10,
                                            val_tokens=256, log_every=5, expansion_factor=2, k=4))
    n_loaded = len(loaded)
    assert n_loaded and all(next(m.parameters()).dtype == torch.bfloat16 for m in loaded)
    rows = [json.loads(line) for line in (Path(tc) / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if r.get("event") == "val"]
    assert vals
    for r in vals:
        assert all(math.isfinite(v["fvu"]) and math.isfinite(v["spliced_nelbo"]) for v in r["layers"].values())
        assert math.isfinite(r["base_nelbo"]) and math.isfinite(r["all_nelbo"])
    scan = topk(tiny_topk_config(run, train_seq_len=64, batch_size=4, scan_batches=2, n_top=5, context_before=6,
                                 context_after=3, n_quantile=4, n_random=4))
    assert len(loaded) > n_loaded  # the scan read the bf16 model too
    index = json.loads((Path(scan) / "index.json").read_text())
    assert index["complete"] and index["n_tokens"] == 2 * 4 * 64
    features = [json.loads(line) for line in (Path(scan) / "layer_00" / "features.jsonl").read_text().splitlines()]
    assert sum(f["fire_count"] for f in features) > 0


def test_the_noise_floor_is_the_bf16_models_own_rounding(step, capsys):
    """A bf16 model resolves changes of a target value only down to its own rounding, measured at the step as it
    ran against the float32 frozen step over every committable token at the positions read: every single and
    pairwise feature ablation's measured change differs from the same change in the same weights held in float32
    by less than that floor. The same weights in float32 keep float32's floor. The step's analysis scores
    agreement above the floor, records it and prints it."""
    from interp.explanations.graph import total_effects
    from interp.explanations.interventions import NOISE, ablate, agreement, noise_floor
    from interp.explanations.stage import graph_record, print_graph
    from interp.explanations.step_analysis import StepSettings, analyse_step

    bf16, upcast, tcs, tokens, positions, targets = step
    g, fz = build_graph(bf16, tcs, tokens, positions, targets)
    floor = noise_floor(bf16, tcs, fz, positions)
    assert 1e-3 < floor <= bf16_tolerance(g.target_values)  # bf16 rounding: well above float32's 1e-5
    g32, fz32 = build_graph(upcast, tcs, tokens, positions, targets)
    assert noise_floor(upcast, tcs, fz32, positions) == NOISE
    n = g.n_features
    sets = [[i] for i in range(n)] + [[i, j] for i in range(0, n, 3) for j in range(1, n, 5) if i != j]
    ours = ablate(bf16, tcs, fz, g, total_effects(g), sets, run_step(bf16, tcs, fz, positions, targets), False)
    exact = ablate(upcast, tcs, fz32, g32, total_effects(g32), sets, run_step(upcast, tcs, fz32, positions, targets),
                   False)
    errors = [abs(a - b) for x, y in zip(ours, exact) for a, b in zip(x.measured, y.measured)]
    assert len(errors) > 20 and max(errors) < floor, (max(errors), floor)
    assert agreement(floor / 3, -floor / 3, floor) == 1.0 and agreement(floor, -floor, floor) == 0.0
    res = analyse_step(bf16, tcs, tokens, positions, targets, StepSettings(features_per_layer=2, random_draws=2,
                                                                           faithfulness_features=2))
    assert res.noise_floor == pytest.approx(floor)
    record = graph_record(res, Pieces(), {})
    assert record["noise_floor"] == res.noise_floor
    print_graph(record)
    assert f"resolves changes of a value down to {floor:.3g} logit (its own rounding)" in capsys.readouterr().out


class Pieces:
    def decode(self, ids) -> str:
        return "".join(f"<{i}>" for i in ids)
