"""Muon's Newton–Schulz precision follows the device (bf16 native, fp32 otherwise) and both agree."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from model.optim import Muon, build_optimizers, newton_schulz
from model.precision import autocast, matmul_dtype, native_bf16

COEFFS = (3.4445, -4.7750, 2.0315)


def _matrices(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 256, generator=g), torch.randn(256, 64, generator=g), torch.randn(96, 96, generator=g)]


def test_bf16_iteration_is_torchs_own_bit_for_bit():
    """In bf16 the iteration is exactly torch.optim.Muon's (the reference)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    for m in _matrices():
        assert torch.equal(newton_schulz(m, COEFFS, 5, 1e-7, torch.bfloat16),
                           _zeropower_via_newtonschulz(m, COEFFS, 5, 1e-7))


def test_muon_step_in_bf16_equals_torch_muon():
    params = [torch.nn.Parameter(m.clone()) for m in _matrices(1)]
    ref = [torch.nn.Parameter(m.clone()) for m in _matrices(1)]
    ours = Muon(params, ns_dtype=torch.bfloat16, lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original")
    theirs = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.01, adjust_lr_fn="original")
    for step in range(3):
        for p, q, g in zip(params, ref, _matrices(10 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
    # the state is torch's: a checkpoint of one loads into the other
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp32_and_bf16_orthogonalise_alike(seed):
    """The two precisions give the same update to bf16 tolerance (relative error of a few 1e-3 per
    entry is bf16's resolution compounded over 5 iterations), and both are nearly orthogonal."""
    for m in _matrices(seed):
        lo = newton_schulz(m, COEFFS, 5, 1e-7, torch.bfloat16).float()
        hi = newton_schulz(m, COEFFS, 5, 1e-7, torch.float32)
        assert hi.dtype == torch.float32
        rel = (lo - hi).norm() / hi.norm()
        assert rel < 2e-2, rel
        cos = torch.nn.functional.cosine_similarity(lo.flatten(), hi.flatten(), dim=0)
        assert cos > 0.999, cos
        # singular values land in Muon's band (about 0.5–1.5), not at the input's spread; a random square
        # matrix's few near-zero singular values are too small for 5 steps to lift, as in torch's Muon
        for x in (lo, hi):
            s = torch.linalg.svdvals(x)
            assert s.max() < 1.5 and (s > 0.5).float().mean() > 0.9, s


def test_precision_choice_follows_the_device():
    assert matmul_dtype("cpu") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    model = torch.nn.Module()
    model.embed, model.head = torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)
    model.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))
    muon = build_optimizers(model, 0.02, 0.3, 0.02)[1]
    assert muon.ns_dtype == matmul_dtype("cpu")
    assert build_optimizers(model, 0.02, 0.3, 0.02, ns_dtype=torch.float32)[1].ns_dtype == torch.float32
    with autocast("cpu"):  # the CPU never autocasts: fp32 everywhere, on every CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_capped_onednn_means_no_native_bf16():
    """A CPU limited to AVX2 (here simulated with oneDNN's ISA cap) is the slow case: fp32 is chosen."""
    import os
    import subprocess
    import sys

    code = "from model.precision import native_bf16; print(native_bf16('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_training_matches_in_both_precisions(synthetic_data, tmp_path, monkeypatch):
    """The same tiny run with Newton–Schulz in bf16 and in fp32: validation NELBO within 1% at every
    check (over 60 steps: 4.756 against 4.788 at step 30, 3.991 against 4.001 nats/token at 60), and both learn."""
    import model.optim
    from experiment import read_metrics
    from tests.helpers import tiny_train_config
    from train_diffusion import main

    curves = {}
    for dtype in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(model.optim, "matmul_dtype", lambda device, dtype=dtype: dtype)
        run = main(tiny_train_config(tmp_path / str(dtype), synthetic_data.folder.parent, train_steps=60,
                                     val_loss_every=30))
        assert json.loads((run / "metadata.json").read_text())["muon_ns_dtype"] == str(dtype)
        curves[dtype] = [r["val_nelbo"] for r in read_metrics(run) if r["event"] == "val"]
    lo, hi = curves[torch.bfloat16], curves[torch.float32]
    assert len(lo) == len(hi) == 3 and lo[0] == hi[0]  # same start: only the optimizer's precision differs
    assert lo[-1] < 0.6 * lo[0]
    for a, b in zip(lo, hi):
        assert abs(a - b) / b < 0.01, (lo, hi)
