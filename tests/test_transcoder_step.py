"""The transcoder stage's optimizer step (training.transcoders.train_step) on a tiny random model: one host read
per step (the dead-latent check), the same result as the step it replaced (AuxK decided per layer and micro-batch,
padding selected, fired latents by boolean indexing), packed forward passes equal unpacked ones, and the compiled
losses equal the eager ones with one graph with AuxK and one without."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from model.diffusion import DiffusionLM, ModelConfig
from model.distributed import Dist
from model.objective import train_noise
from model.transcoder import Transcoder, TranscoderConfig, Transcoders
from tests.syncs import syncing_ops
from training.transcoders import LayerPairs, train_step

N_VOCAB, D, M, B, T = 100, 32, 128, 2, 32
LAYERS = [0, 1]
CPU = torch.device("cpu")
NO_AUTOCAST = contextlib.nullcontext()


def tiny_setup(seed: int = 0):
    """A frozen random 2-layer model, a transcoder per layer, and dead counters: latents 0-9 of layer 0 silent
    for longer than --dead_tokens (AuxK runs), layer 1's all recent."""
    torch.manual_seed(seed)
    mc = ModelConfig(n_vocab=N_VOCAB, vocab_size=128, mask_id=N_VOCAB, pad_id=N_VOCAB + 1, bos_id=N_VOCAB - 1,
                     num_layers=2, num_heads=2, model_dim=D)
    model = DiffusionLM(mc).eval().requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    transcoders = Transcoders({str(layer): Transcoder(TranscoderConfig(D, M, 4)) for layer in LAYERS})
    dead = {layer: torch.zeros(M, dtype=torch.long) for layer in LAYERS}
    dead[0][:10] = 50_000
    cfg = SimpleNamespace(dead_tokens=10_000, auxk_alpha=1 / 32)
    first = LayerPairs(model, LAYERS, *next(micro_batches(model, 0, 1)), NO_AUTOCAST)
    scales = {layer: float(y.pow(2).mean()) ** 0.5 for layer, (x, y) in first.pairs.items()}  # as training does
    return model, transcoders, dead, cfg, scales


def micro_batches(model: DiffusionLM, step: int, acc: int):
    for micro in range(acc):
        g = torch.Generator().manual_seed(1000 * step + micro)
        tokens = torch.randint(0, N_VOCAB - 1, (B, T), generator=g)
        tokens[:, 0] = model.cfg.bos_id
        tokens[1, T // 2] = model.cfg.bos_id  # two documents in one window
        yield tokens, *train_noise(np.arange(B) + (step * acc + micro) * B, step, B * acc, 7, T)


def reference_step(model, transcoders, layers, batches, acc, scales, dead, cfg, optimizer) -> list[float]:
    """The step as it was: padding selected by a boolean mask, AuxK decided per layer and micro-batch
    (skipped where the layer has no dead latent), fired latents marked by boolean indexing."""
    fired = {layer: torch.zeros(len(dead[layer]), dtype=torch.bool) for layer in layers}
    sums = torch.zeros(len(layers), 2, dtype=torch.float64)
    n_tokens = 0
    for tokens, t, u in batches:
        pairs = LayerPairs(model, layers, tokens, t, u, NO_AUTOCAST, padded=True)
        n_tokens += pairs.n_tokens
        for i, layer in enumerate(layers):
            x, y = pairs.pairs[layer]
            dead_now = dead[layer] > cfg.dead_tokens
            out = transcoders[str(layer)].loss(x, y / scales[layer], dead_now if bool(dead_now.any()) else None)
            ((out.fvu + cfg.auxk_alpha * out.auxk) / acc).backward()
            fired[layer][out.encoded.indices[out.encoded.acts > 0]] = True
            sums[i] += torch.stack([out.sse.detach().double(), out.total_variance.detach().double()])
    for layer in layers:
        dead[layer] += n_tokens
        dead[layer][fired[layer]] = 0
    for tc in transcoders.values():
        tc.remove_parallel_gradient()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for tc in transcoders.values():
        tc.normalize_decoder()
    return (sums[:, 0] / sums[:, 1]).tolist()


def run_steps(steps: int, acc: int, group: int = 1, reference: bool = False, loss_fns=None):
    model, transcoders, dead, cfg, scales = tiny_setup()
    optimizer = torch.optim.Adam(transcoders.parameters(), lr=3e-3)
    fvus = []
    for step in range(steps):
        batches = micro_batches(model, step, acc)
        if reference:
            fvus.append(reference_step(model, transcoders, LAYERS, batches, acc, scales, dead, cfg, optimizer))
        else:
            fvu = train_step(model, transcoders, LAYERS, batches, acc, scales, dead, cfg, optimizer, Dist(),
                             NO_AUTOCAST, CPU, loss_fns(transcoders) if loss_fns else None, group)
            assert fvu.dtype == torch.float64 and fvu.shape == (2,)
            fvus.append(fvu.tolist())
    return fvus, transcoders, dead


def assert_same_runs(a, b, rtol: float, atol: float) -> None:
    (fvu_a, tcs_a, dead_a), (fvu_b, tcs_b, dead_b) = a, b
    np.testing.assert_allclose(np.array(fvu_a), np.array(fvu_b), rtol=rtol, atol=atol)
    for name, value in tcs_a.state_dict().items():
        torch.testing.assert_close(tcs_b.state_dict()[name], value, rtol=rtol, atol=atol, msg=name)
    for layer in LAYERS:
        assert torch.equal(dead_a[layer], dead_b[layer]), layer


def test_a_step_reads_the_device_once():
    """After its first step, a step issues one syncing operation: the dead-latent check (a bool()). SGD stands
    in for the stage's fused Adam, which on CUDA reads its step count on the device (its CPU kernel reads it on
    the host)."""
    model, transcoders, dead, cfg, scales = tiny_setup()
    optimizer = torch.optim.SGD(transcoders.parameters(), lr=1e-3)
    one_check = syncing_ops(lambda: bool(torch.tensor(True)))

    def step(index: int):  # the data and its noise are drawn on the host beforehand (CPU tensors, as the loader's)
        batches = list(micro_batches(model, index, 2))
        return lambda: train_step(model, transcoders, LAYERS, batches, 2, scales, dead, cfg, optimizer, Dist(),
                                  NO_AUTOCAST, CPU)

    step(0)()
    assert syncing_ops(step(1)) == one_check  # AuxK on (layer 0 has dead latents)
    dead[0].zero_()
    assert syncing_ops(step(2)) == one_check  # AuxK off


def test_step_equals_the_step_it_replaced():
    """AuxK on every layer while one has dead latents (0 where a layer has none) equals AuxK per layer."""
    new = run_steps(4, acc=2)
    old = run_steps(4, acc=2, reference=True)
    assert_same_runs(old, new, rtol=1e-6, atol=1e-7)
    assert (new[2][0] > 10_000).any() and not (new[2][1] > 10_000).any()  # AuxK ran, on one layer's dead latents


def test_packed_forward_passes_equal_unpacked():
    """--forward_batch_size packs micro-batches into one base-model pass: the same step up to float order."""
    unpacked = run_steps(3, acc=4)
    for group in (2, 4):
        assert_same_runs(unpacked, run_steps(3, acc=4, group=group), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_losses_equal_eager():
    """Compiled: one graph without AuxK (step 1: nothing dead) and one with it (step 2 on), shared by both
    layers, no graph break, nothing recompiled later; the same training as eager."""
    torch._dynamo.reset()
    counters.clear()

    def compiled(transcoders):
        return {layer: torch.compile(transcoders[str(layer)].loss) for layer in LAYERS}

    def staged(loss_fns=None):  # nothing dead at first; with --dead_tokens 100, the silent latents die after step 1
        model, transcoders, dead, cfg, scales = tiny_setup()
        dead[0].zero_()
        cfg.dead_tokens = 100
        fns = loss_fns(transcoders) if loss_fns else None
        optimizer = torch.optim.Adam(transcoders.parameters(), lr=3e-3)
        fvus, graphs, auxk = [], [], []
        for step in range(4):
            auxk.append(any(bool((d > cfg.dead_tokens).any()) for d in dead.values()))
            fvus.append(train_step(model, transcoders, LAYERS, micro_batches(model, step, 2), 2, scales, dead, cfg,
                                   optimizer, Dist(), NO_AUTOCAST, CPU, fns).tolist())
            graphs.append(counters["stats"]["unique_graphs"])
        return (fvus, transcoders, dead), graphs, auxk

    eager, _, auxk = staged()
    got, graphs, _ = staged(compiled)
    torch._dynamo.reset()
    assert auxk == [False, True, True, True]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs == [1, 2, 2, 2], graphs
    assert_same_runs(eager, got, rtol=1e-4, atol=1e-6)


def test_reference_setup_is_not_trivial():
    """The runs compared above are not degenerate: finite FVUs of the order of 1, weights that move."""
    fvus, transcoders, _ = run_steps(4, acc=2)
    _, start, _, _, _ = tiny_setup()
    assert all(0.1 < v < 10 for step in fvus for v in step), fvus
    assert not torch.equal(start["0"].encoder.weight, transcoders["0"].encoder.weight)


@pytest.mark.slow
def test_compiled_base_model_keeps_its_hooks():
    """Blocks compiled by the stage: the training capture, a forward pass without hooks and one with an MLP
    replaced (as validation runs them), then the capture again: every pass equals the eager model's."""
    from model.hooks import replace_mlps

    torch._dynamo.reset()
    counters.clear()
    eager, _, _, _, _ = tiny_setup()
    model, _, _, _, _ = tiny_setup()
    model.compile_blocks()
    tokens, t, u = next(micro_batches(model, 0, 1))

    def passes(net):
        first = LayerPairs(net, LAYERS, tokens, t, u, NO_AUTOCAST, padded=False).pairs
        with torch.no_grad():
            plain = net(tokens).logits
            with replace_mlps(net, {1: lambda x: 2 * x}):
                replaced = net(tokens).logits
        again = LayerPairs(net, LAYERS, tokens, t, u, NO_AUTOCAST, padded=False).pairs
        return first, plain, replaced, again

    try:
        want, got = passes(eager), passes(model)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(want[1], want[2], atol=1e-3)  # the replacement changes the output
    for a, b in zip(want, got):
        if isinstance(a, dict):
            for layer in LAYERS:
                for x, y in zip(a[layer], b[layer]):
                    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert 1 <= graphs <= 4, graphs  # the blocks share their graphs: captured, plain, replaced (not one per layer)
