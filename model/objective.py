"""The absorbing-state diffusion objective (MDLM's continuous-time NELBO) and its noise.

Each sequence draws a noise level t; every position except BOS and padding is replaced by [MASK] with
probability t; the loss is the cross-entropy of the clean token at the masked positions, weighted by
1/t. Averaged over positions, its expectation is the NELBO per token (an untrained model that predicts
uniformly scores ln(n_vocab)).

The noise of a sequence depends only on (seed, its global slot index): t is stratified across the
sequences of one optimizer step (low-discrepancy), the mask draws come from a generator seeded by the
slot. So a resumed run, a data-parallel run and a single-process run see the very same masks.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

T_MIN = 1e-3  # t is drawn in [T_MIN, 1]: 1/t stays bounded
VAL_SEED = 1234  # validation noise is the same for every run, whatever its --seed, so runs compare


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _uniform(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def train_noise(slots: np.ndarray, step: int, per_step: int, seed: int,
                seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (B,), uniforms (B, T)) for the sequences at global `slots` of optimizer step `step`, which
    holds `per_step` sequences in all."""
    offset = float(_uniform(_seed(seed, 1, step), 1))
    local = torch.as_tensor(slots - step * per_step, dtype=torch.float64)
    t = torch.remainder(offset + local / per_step, 1.0).float()
    u = torch.stack([_uniform(_seed(seed, 2, int(s)), seq_len) for s in slots])
    return T_MIN + (1 - T_MIN) * t, u


def val_noise(index: np.ndarray, n_total: int, seed: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed grid of t over the `n_total` validation sequences, and fixed masks: every validation
    sees exactly the same noised inputs."""
    t = (torch.as_tensor(index, dtype=torch.float64) + 0.5) / n_total
    u = torch.stack([_uniform(_seed(seed, 3, int(i)), seq_len) for i in index])
    return T_MIN + (1 - T_MIN) * t.float(), u


def at_mask_ratio(noise: tuple[torch.Tensor, torch.Tensor], mask_ratio: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`noise` (t (B,), uniforms (B, T)) as the noise process drew it when `mask_ratio` is "random", else with
    every sequence's t fixed at `mask_ratio` (the same uniforms: the masks are nested across fixed ratios)."""
    t, u = noise
    if mask_ratio != "random":
        t = torch.full_like(t, float(mask_ratio))
    return t, u


class Noised(NamedTuple):
    inputs: torch.Tensor  # (B, T) tokens with [MASK] where masked
    mask: torch.Tensor  # (B, T) bool, True where masked (these are scored)
    maskable: torch.Tensor  # (B, T) bool, every position except BOS and padding


def apply_noise(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int, bos_id: int,
                pad_id: int) -> Noised:
    maskable = (tokens != bos_id) & (tokens != pad_id)
    mask = (u < t[:, None]) & maskable
    return Noised(torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask, maskable)


def count_masked(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, bos_id: int, pad_id: int) -> int:
    """How many positions `apply_noise` masks: read on the host, for `diffusion_loss`'s `n_masked` (call it on
    the CPU tensors, before the batch moves to the device)."""
    return int(((u < t[:, None]) & (tokens != bos_id) & (tokens != pad_id)).sum())


ROW_BUCKETS = 8  # rows padded to a multiple of 1/8 of the positions: at most 8 shapes, which the allocator reuses


def row_capacity(n_masked: int, n_positions: int) -> int:
    """The fixed number of rows the loss scores: `n_masked` rounded up to a multiple of ⌈n_positions / 8⌉
    (at least one such multiple), at most `n_positions`."""
    step = max(1, -(-n_positions // ROW_BUCKETS))
    return min(n_positions, max(1, -(-n_masked // step)) * step)


CHUNK_ELEMENTS = 1 << 26  # the logits of one chunk of rows: 256 MiB in float32


def chunk_rows(n_vocab: int) -> int:
    """Rows per chunk of the cross-entropy: about CHUNK_ELEMENTS logits, a multiple of 64 rows."""
    return max(64, CHUNK_ELEMENTS // n_vocab // 64 * 64)


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the soft-capped logits cap·tanh(h Wᵀ / cap), a chunk of rows at a time: the
    forward keeps each row's log-sum-exp, and the backward recomputes each chunk's logits (with a single chunk,
    its tanh is kept instead). h and W arrive in the matmul dtype; logits, soft cap and softmax are float32 (as
    `DiffusionLM.logits`)."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, chunk: int):
        with torch.autocast(h.device.type, enabled=False):
            ces, lses = [], []
            for s in range(0, h.shape[0], chunk):
                th = (h[s:s + chunk] @ weight.T).float().div_(cap).tanh_()  # (C, V)
                y = th * cap
                lse = torch.logsumexp(y, dim=-1)
                ces.append(lse - y.gather(1, targets[s:s + chunk, None])[:, 0])
                lses.append(lse)
        kept = (th,) if h.shape[0] <= chunk else ()
        ctx.save_for_backward(h, weight, targets, torch.cat(lses), *kept)
        ctx.cap, ctx.chunk = cap, chunk
        return torch.cat(ces)

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse, *kept = ctx.saved_tensors
        cap, chunk = ctx.cap, ctx.chunk
        with torch.autocast(h.device.type, enabled=False):
            grad_h, grad_w = [], torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for s in range(0, h.shape[0], chunk):
                hc, tc = h[s:s + chunk], targets[s:s + chunk, None]
                th = kept[0] if kept else (hc @ weight.T).float().div_(cap).tanh_()  # (C, V)
                dz = (th * cap).sub_(lse[s:s + chunk, None]).exp_()  # softmax
                dz.scatter_add_(1, tc, torch.full(tc.shape, -1.0, device=dz.device))  # minus the one-hot target
                dz.mul_(grad[s:s + chunk, None]).mul_(th.square().neg_().add_(1))  # through the soft cap
                dz = dz.to(h.dtype)
                grad_h.append(dz @ weight)
                grad_w += (dz.T @ hc).float()
        return torch.cat(grad_h), grad_w.to(weight.dtype), None, None, None


def softcapped_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                             chunk: int | None = None) -> torch.Tensor:
    """h (N, D), weight (V, D), targets (N,) → (N,) float32 cross-entropy of softmax(cap·tanh(h Wᵀ / cap)),
    without ever holding the logits of more than `chunk` rows (default `chunk_rows(V)`). Under autocast the
    matmuls run in the autocast dtype, as `nn.Linear` would."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _SoftcappedCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets, cap,
                                         chunk or chunk_rows(weight.shape[0]))


class LossTerms(NamedTuple):
    weighted_ce: torch.Tensor  # scalar: Σ over masked positions of CE / t
    n_masked: torch.Tensor  # scalar
    n_maskable: torch.Tensor  # scalar: positions the NELBO is averaged over


def diffusion_loss(model, tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor,
                   n_masked: int | None = None) -> LossTerms:
    """Noise `tokens`, run the model, and return the NELBO's terms. The masked positions are gathered into
    `row_capacity(n_masked, B·T)` rows (the rows past the masked ones weigh zero) and the cross-entropy is
    chunked, so with `n_masked` given (e.g. `count_masked` on the CPU tensors) the shapes are static and nothing
    waits for the host. `n_masked` must be at least the number of masked positions (if it is less, the loss is
    NaN); None reads the count from the device (one host sync)."""
    net = model.module if hasattr(model, "module") else model
    cfg = net.cfg
    noised = apply_noise(tokens, t, u, cfg.mask_id, cfg.bos_id, cfg.pad_id)
    count = noised.mask.sum()
    capacity = row_capacity(int(count) if n_masked is None else n_masked, tokens.numel())
    rows = torch.nonzero_static(noised.mask.flatten(), size=capacity, fill_value=0)[:, 0]  # (C,) masked first
    valid = torch.arange(capacity, device=tokens.device) < count
    hidden = model(noised.inputs, select=rows[:0]).hidden  # (B, T, D); an empty selection: no logits
    targets = torch.where(valid, tokens.flatten()[rows], 0)
    weights = torch.where(valid, (1.0 / t)[:, None].expand_as(tokens).flatten()[rows], 0.0)
    ce = softcapped_cross_entropy(hidden.flatten(0, 1)[rows], net.head.weight[:cfg.n_vocab], targets,
                                  cfg.logit_softcap)
    overflow = torch.where(count > capacity, float("nan"), 1.0)  # an n_masked too small drops rows: say so
    return LossTerms((ce * weights).sum() * overflow, count, noised.maskable.sum())
