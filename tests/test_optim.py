"""Muon over stacks of same-shape matrices against the per-matrix reference; fused Adam; no host reads."""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

from model.optim import Muon, batched_newton_schulz, build_optimizers, compiled_newton_schulz, newton_schulz
from tests.syncs import syncing_ops

COEFFS = (3.4445, -4.7750, 2.0315)
# Stated tolerance of the batched update against the per-matrix one: the same operations on the same values
# (bit for bit on this CPU); other kernels (CUDA, compiled) may sum in another order: a few float32 ulps per
# iteration, and bf16's resolution in bf16.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SHAPES = [(64, 64), (256, 64), (64, 256), (64, 64), (256, 64), (96, 40)]  # a model's q/k/v/out, fc, proj


class ReferenceMuon(torch.optim.Muon):
    """The per-matrix Muon step this project used before the batched one (model/optim.py's `Muon`, one
    matrix at a time): the reference the batched step is compared with."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))


def _randn(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 96)])
def test_batched_newton_schulz_equals_the_per_matrix_one(shape, dtype):
    grads = [_randn(shape, seed) for seed in range(5)]
    expected = torch.stack([newton_schulz(g.clone(), COEFFS, 5, 1e-7, dtype) for g in grads])
    x = torch.stack(grads).to(dtype)
    tall = shape[0] > shape[1]
    got = batched_newton_schulz(x.mT if tall else x, COEFFS, 5, 1e-7)
    got = got.mT if tall else got
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


def test_batched_newton_schulz_compiles_as_one_graph_of_the_stack_alone():
    """What runs on CUDA: compiled_newton_schulz traces without a graph break into one graph whose only input
    is the stack (checked with a backend that runs the traced graph as it is: the trace, not the kernels), and
    computes the same."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(len(inputs))
        return gm.forward

    torch._dynamo.reset()
    x = torch.stack([_randn((32, 48), seed) for seed in range(3)])
    compiled = compiled_newton_schulz(COEFFS, 5, 1e-7, backend=backend)
    torch.testing.assert_close(compiled(x), batched_newton_schulz(x, COEFFS, 5, 1e-7), **TOLERANCE[torch.float32])
    compiled(x * 2)
    assert graphs == [1]  # one graph, one input, not recompiled for new values
    torch._dynamo.reset()


def _pair(ns_dtype, nesterov=True, weight_decay=0.01):
    mine = [torch.nn.Parameter(_randn(s, i)) for i, s in enumerate(SHAPES)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    kw = dict(ns_dtype=ns_dtype, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=weight_decay,
              adjust_lr_fn="original")
    return mine, Muon(mine, **kw), ref, ReferenceMuon(ref, **kw)


def _grads(params, step, skip=()):
    for i, p in enumerate(params):
        p.grad = None if i in skip else _randn(p.shape, 100 * step + i)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov,weight_decay", [(True, 0.0), (True, 0.01), (False, 0.01)])
def test_muon_step_equals_the_per_matrix_step(ns_dtype, nesterov, weight_decay):
    mine, ours, ref, theirs = _pair(ns_dtype, nesterov, weight_decay)
    for step in range(4):
        skip = {1} if step == 2 else ()  # a matrix without a gradient is left alone, as before
        _grads(mine, step, skip)
        _grads(ref, step, skip)
        ours.step()
        theirs.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])
    for p, q in zip(mine, ref):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"],
                                   **TOLERANCE[torch.float32])


def test_checkpoints_of_the_per_matrix_muon_load_and_resume():
    """The state_dict is the same as before (and torch's): one written by the per-matrix Muon loads, and the
    resumed steps equal the per-matrix Muon's own continuation."""
    mine, ours, ref, theirs = _pair(torch.float32)
    for step in range(2):
        _grads(ref, step)
        theirs.step()
    with torch.no_grad():
        for p, q in zip(mine, ref):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
    for step in range(2, 4):
        _grads(mine, step)
        _grads(ref, step)
        ours.step()
        theirs.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p, q, **TOLERANCE[torch.float32])
    torch.optim.Muon(ref, lr=0.02, adjust_lr_fn="original").load_state_dict(copy.deepcopy(ours.state_dict()))


def _model():
    model = torch.nn.Module()
    model.embed, model.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False)
    model.blocks = torch.nn.Sequential(torch.nn.Linear(8, 32, bias=False), torch.nn.Linear(32, 8, bias=False),
                                       torch.nn.LayerNorm(8))
    return model


def test_adam_is_fused_on_cuda_by_default():
    adam, _ = build_optimizers(_model(), 0.02, 0.3, 0.02)  # the model is on the CPU
    assert not adam.defaults["fused"]
    adam, _ = build_optimizers(_model(), 0.02, 0.3, 0.02, fused=True)
    assert adam.defaults["fused"]


def test_muon_step_reads_nothing_on_the_host():
    """On the first step (which creates the state) and after. (Adam is fused on CUDA, where its kernel reads its
    step counts on the device; torch's CPU kernel reads them on the host, so the CPU cannot show it.)"""
    model = _model()
    muon = build_optimizers(model, 0.02, 0.3, 0.02, fused=True)[1]
    for step in range(3):
        _grads(list(model.parameters()), step)
        assert syncing_ops(muon.step) == Counter(), step
