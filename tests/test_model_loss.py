"""The NELBO as one static-shape graph: the masked rows gathered to a fixed capacity, the soft-capped
cross-entropy chunked. Compared with the boolean-indexing loss it replaced (kept here as the reference)."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from model.diffusion import DiffusionLM
from model.objective import (
    LossTerms,
    apply_noise,
    count_masked,
    diffusion_loss,
    row_capacity,
    softcapped_cross_entropy,
    train_noise,
)
from tests.syncs import syncing_ops
from tests.test_diffusion_model import BOS, MASK, N_VOCAB, PAD, docs_batch, randomised, tiny_cfg
from tests.test_model_forward import reference_forward


def reference_loss(model, tokens, t, u) -> LossTerms:
    """The loss with boolean indexing at the masked positions (data-dependent shapes, one host sync each) and
    the full fp32 logits of every masked row, through the reference forward."""
    cfg = model.cfg
    noised = apply_noise(tokens, t, u, cfg.mask_id, cfg.bos_id, cfg.pad_id)
    logits = reference_forward(model, noised.inputs, select=noised.mask).logits
    weights = (1.0 / t)[:, None].expand_as(tokens)[noised.mask]
    ce = F.cross_entropy(logits, tokens[noised.mask], reduction="none")
    return LossTerms((ce * weights).sum(), noised.mask.sum(), noised.maskable.sum())


def batch(B=4, T=40):
    """Documents, padding at the end of one row, and a row that starts inside a document (its position 0
    can be masked: the capacity's fill rows point there)."""
    tokens = docs_batch(B, T)
    tokens[2, 30:] = PAD
    tokens[3, 0] = 7
    t, u = train_noise(torch.arange(B).numpy(), 0, B, 0, T)
    return tokens, t, u


def gradients(model, loss_fn) -> tuple[LossTerms, dict[str, torch.Tensor]]:
    model.zero_grad()
    terms = loss_fn()
    terms.weighted_ce.backward()
    return terms, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("hint", ["none", "exact", "more", "all"])
def test_loss_and_every_gradient_equal_the_reference(hint):
    """Tolerance: the loss to 1e-5 relative; each gradient to 1e-4 relative plus 1e-5 of its largest entry
    (the sums run in another order)."""
    model = randomised(DiffusionLM(tiny_cfg()))
    tokens, t, u = batch()
    exact = count_masked(tokens, t, u, BOS, PAD)
    n_masked = {"none": None, "exact": exact, "more": exact + 9, "all": tokens.numel()}[hint]
    ref, ref_grads = gradients(model, lambda: reference_loss(model, tokens, t, u))
    got, got_grads = gradients(model, lambda: diffusion_loss(model, tokens, t, u, n_masked=n_masked))
    assert int(ref.n_masked) == exact and 0 < exact < tokens.numel() // 2
    assert torch.equal(got.n_masked, ref.n_masked) and torch.equal(got.n_maskable, ref.n_maskable)
    torch.testing.assert_close(got.weighted_ce, ref.weighted_ce, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name  # every weight takes part
        torch.testing.assert_close(got_grads[name], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4, msg=name)


def test_a_too_small_count_makes_the_loss_nan():
    model = randomised(DiffusionLM(tiny_cfg()))
    tokens, t, u = batch()
    exact = count_masked(tokens, t, u, BOS, PAD)
    assert row_capacity(exact - 30, tokens.numel()) < exact
    assert torch.isnan(diffusion_loss(model, tokens, t, u, n_masked=exact - 30).weighted_ce)


def test_count_masked_counts_the_noised_mask():
    tokens, t, u = batch()
    assert count_masked(tokens, t, u, BOS, PAD) == int(apply_noise(tokens, t, u, MASK, BOS, PAD).mask.sum())


def test_row_capacity_has_few_sizes_and_room_for_every_masked_row():
    for n_positions in (1, 7, 160, 32_768):
        sizes = {row_capacity(n, n_positions) for n in range(n_positions + 1)}
        assert len(sizes) <= 8
        for n in range(0, n_positions + 1, max(1, n_positions // 500)):
            assert n <= row_capacity(n, n_positions) <= n_positions
    assert row_capacity(5_000, 32_768) == 8_192  # the work follows the count, not the positions


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_softcapped_cross_entropy_equals_the_full_one(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(N_VOCAB, 32, generator=g)).requires_grad_(True)
    targets = torch.randint(0, N_VOCAB, (50,), generator=g)
    upstream = torch.rand(50, generator=g)
    ref = F.cross_entropy(15 * torch.tanh(h @ w.T / 15), targets, reduction="none")
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [h, w])
    got = softcapped_cross_entropy(h, w, targets, 15.0, chunk)
    got_grads = torch.autograd.grad((got * upstream).sum(), [h, w])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_under_autocast_matches_the_linear_head():
    """Under bf16 autocast the matmuls run in bf16 as `nn.Linear`'s would; logits and softmax in float32."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 32, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(N_VOCAB, 32, generator=g)).requires_grad_(True)
    targets = torch.randint(0, N_VOCAB, (20,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(15 * torch.tanh(F.linear(h, w).float() / 15), targets, reduction="none")
        got = softcapped_cross_entropy(h, w, targets, 15.0, chunk=8)
    ref_grads = torch.autograd.grad(ref.sum(), [h, w])
    got_grads = torch.autograd.grad(got.sum(), [h, w])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))  # bf16 rounding


def test_forward_loss_and_backward_never_wait_for_the_host():
    model = randomised(DiffusionLM(tiny_cfg()))
    tokens, t, u = batch()
    n_masked = count_masked(tokens, t, u, BOS, PAD)  # on the host, before the batch would move to a device
    assert syncing_ops(lambda: diffusion_loss(model, tokens, t, u, n_masked).weighted_ce.backward()) == Counter()
    # the counter does see the reference's boolean indexing
    assert syncing_ops(lambda: reference_loss(model, tokens, t, u).weighted_ce.backward())["aten::nonzero"] > 0


def test_forward_and_loss_are_one_graph():
    model = randomised(DiffusionLM(tiny_cfg()))
    tokens, t, u = batch()
    n_masked = count_masked(tokens, t, u, BOS, PAD)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda: diffusion_loss(model, tokens, t, u, n_masked))()
    finally:
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
