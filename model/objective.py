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
import torch.nn.functional as F

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


class LossTerms(NamedTuple):
    weighted_ce: torch.Tensor  # scalar: Σ over masked positions of CE / t
    n_masked: torch.Tensor  # scalar
    n_maskable: torch.Tensor  # scalar: positions the NELBO is averaged over


def diffusion_loss(model, tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> LossTerms:
    """Noise `tokens`, run the model, and return the NELBO's terms (the vocabulary projection is
    computed at the masked positions only)."""
    cfg = model.module.cfg if hasattr(model, "module") else model.cfg
    noised = apply_noise(tokens, t, u, cfg.mask_id, cfg.bos_id, cfg.pad_id)
    logits = model(noised.inputs, select=noised.mask).logits  # (N, n_vocab)
    weights = (1.0 / t)[:, None].expand_as(tokens)[noised.mask]
    ce = F.cross_entropy(logits, tokens[noised.mask], reduction="none")
    return LossTerms((ce * weights).sum(), noised.mask.sum(), noised.maskable.sum())
