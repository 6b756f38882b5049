"""The transcoder's sparse encoder backward (model.transcoder.ActiveLatents) against dense autograd through
the TopK, as the loss was computed before: the same losses and the same gradients of every parameter (and of
the input), with and without AuxK, with tied pre-activations and with latents in the top k whose ReLU is 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.transcoder import Transcoder, TranscoderConfig

D, M, K = 16, 64, 12


def dense_loss(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor | None):
    """The reference: the loss with autograd through the dense (N, M) ReLU pre-activations and their TopK."""
    pre = F.relu(tc.encoder(x))
    acts, indices = pre.topk(tc.cfg.k, dim=-1, sorted=False)
    y_hat = tc.decode(acts, indices, x)
    err = y - y_hat
    total_variance = (y - y.mean(0)).pow(2).sum()
    auxk = y.new_zeros(()) if dead is None else tc.auxk_loss(pre, err, dead, total_variance)
    return err.pow(2).sum() / total_variance, auxk


def awkward_transcoder(skip: bool) -> Transcoder:
    """Latents 0-7 are copies of latents 8-15 (tied pre-activations), and the biases are low enough that many
    tokens have fewer than k positive pre-activations (latents whose ReLU is 0 enter the top k). Its backward is
    the sparse one (by default only on CUDA)."""
    torch.manual_seed(0)
    tc = Transcoder(TranscoderConfig(D, M, K, skip))
    tc.sparse_backward = True
    with torch.no_grad():
        tc.encoder.weight.normal_(0, 0.3)
        tc.encoder.bias.normal_(-1.0, 0.3)
        tc.encoder.weight[:8] = tc.encoder.weight[8:16]
        tc.encoder.bias[:8] = tc.encoder.bias[8:16]
        tc.b_dec.normal_()
        if skip:
            tc.W_skip.normal_(0, 0.1)
    return tc


def grads(tc: Transcoder, x: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    tc.zero_grad(set_to_none=True)
    x.grad = None
    loss.backward()
    out = {name: p.grad.clone() for name, p in tc.named_parameters()}
    out["x"] = x.grad.clone()
    return out


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("n_dead", [None, 0, 3, 40])  # None: AuxK off; 3 < d_in/2 = 8 (slots at -inf); 40 > 8
def test_sparse_backward_equals_dense_autograd(skip, n_dead):
    tc = awkward_transcoder(skip)
    x = torch.randn(200, D, requires_grad=True)
    y = torch.randn(200, D)
    dead = None
    if n_dead is not None:
        dead = torch.zeros(M, dtype=torch.bool)
        dead[torch.randperm(M, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    pre = F.relu(tc.encoder(x)).detach()
    top = pre.topk(K, dim=-1).values
    assert (top[:, -1] == 0).sum() > 20  # many tokens use latents whose ReLU is 0
    assert (pre[:, :8] == pre[:, 8:16]).all() and (pre[:, :8] > 0).any()  # ties among positive latents

    fvu_ref, auxk_ref = dense_loss(tc, x, y, dead)
    want = grads(tc, x, fvu_ref + 0.5 * auxk_ref)
    out = tc.loss(x, y, dead)
    assert not out.encoded.pre_acts.requires_grad
    torch.testing.assert_close(out.fvu, fvu_ref, rtol=0, atol=0)
    torch.testing.assert_close(out.auxk, auxk_ref, rtol=0, atol=0)
    if n_dead:
        assert float(out.auxk.detach()) > 0
    got = grads(tc, x, out.fvu + 0.5 * out.auxk)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * float(want[name].abs().max()),
                                   msg=name)


def test_backward_in_chunks_equals_one_chunk(monkeypatch):
    """The encoder weight's gradient summed a few tokens at a time equals the whole batch at once."""
    import model.transcoder as mt

    tc = awkward_transcoder(False)
    x, y = torch.randn(200, D), torch.randn(200, D)

    def weight_grad():
        tc.zero_grad(set_to_none=True)
        tc.loss(x, y).fvu.backward()
        return tc.encoder.weight.grad.clone()

    whole = weight_grad()
    monkeypatch.setattr(mt, "BACKWARD_CHUNK", 7 * K * D)  # 7 tokens per chunk: 29 chunks
    torch.testing.assert_close(weight_grad(), whole, rtol=1e-6, atol=1e-7)


def test_no_dense_tensor_in_the_backward():
    """The backward builds nothing of the (N, M) shape: the gradient reaches only the active latents' rows."""
    tc = awkward_transcoder(False)
    n = 97  # a token count that no other dimension shares
    x, y = torch.randn(n, D), torch.randn(n, D)
    out = tc.loss(x, y, torch.ones(M, dtype=torch.bool))
    shapes = []

    def record(grad_fn, seen=set()):
        if grad_fn is None or grad_fn in seen:
            return
        seen.add(grad_fn)
        for next_fn, _ in grad_fn.next_functions:
            record(next_fn)
        shapes.append(type(grad_fn).__name__)

    record((out.fvu + out.auxk).grad_fn)
    assert "TopkBackward0" not in shapes and "ReluBackward0" not in shapes and "AddmmBackward0" not in shapes, shapes

    big = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        (out.fvu + out.auxk).backward()
    for e in prof.events():
        big += [s for s in e.input_shapes if isinstance(s, list) and s[:2] == [n, M]]
    assert not big, big


def test_under_bf16_autocast_close_to_dense():
    """Under bf16 autocast (as on CUDA) the sparse gradient matches dense autograd up to bf16's precision."""
    tc = awkward_transcoder(False)
    x, y = torch.randn(300, D, requires_grad=True), torch.randn(300, D)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fvu_ref, auxk_ref = dense_loss(tc, x, y, dead)
    want = grads(tc, x, fvu_ref + auxk_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tc.loss(x, y, dead)
    torch.testing.assert_close(out.fvu, fvu_ref)
    got = grads(tc, x, out.fvu + out.auxk)
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "x"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=0.05, atol=0.02 * float(want[name].abs().max()),
                                   msg=name)


def test_the_cpu_default_is_dense_autograd_and_equal():
    """On a CPU the encoder's gradient goes through the dense pre-activations (faster there); the same numbers."""
    tc = awkward_transcoder(False)
    x, y = torch.randn(64, D).requires_grad_(), torch.randn(64, D)
    dead = torch.zeros(M, dtype=torch.bool)
    dead[::3] = True
    sparse = tc.loss(x, y, dead)
    tc.sparse_backward = None
    dense = tc.loss(x, y, dead)
    assert sparse.encoded.acts.grad_fn is not None and dense.encoded.pre_acts.requires_grad
    assert not sparse.encoded.pre_acts.requires_grad  # the sparse path keeps no graph through (N, M)
    want = grads(tc, x, dense.fvu + dense.auxk)
    got = grads(tc, x, sparse.fvu + sparse.auxk)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
