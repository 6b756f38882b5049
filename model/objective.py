"""The absorbing-state diffusion objective (MDLM's continuous-time NELBO) and its noise.

Each sequence draws a noise level t; every maskable position is replaced by [MASK] with probability t; the
loss is the cross-entropy of the clean token at the masked positions, weighted by 1/t. Averaged over
positions, its expectation is the NELBO per token (an untrained model that predicts uniformly scores
ln(n_vocab)). A position is maskable when its token is one the model predicts: never BOS or [PAD] for this
project's models, whose [PAD] lies outside the text vocabulary; for the public models (LLaDA, Dream) every
text token, their EOS included, which is also their [PAD] and, for Dream, their BOS. That is those models'
own training, which masks every token of the text and the EOS padding of an answer alike
(`unmaskable_ids` reads it from the model config).

The noise of a sequence depends only on (seed, its global slot index): t is stratified across the
sequences of one optimizer step (low-discrepancy), the mask draws come from a generator seeded by the
slot. So a resumed run, a data-parallel run and a single-process run see the very same masks.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from model.diffusion import ModelConfig

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
    maskable: torch.Tensor  # (B, T) bool, every position whose token is not one of the kept ids


def unmaskable_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """The ids the noise never masks, ascending: those the model never predicts (`cfg.never_predicted()`:
    BOS unless it is [PAD], [MASK] inside the vocabulary, unused rows) and [PAD] when it lies outside the
    predicted ids. This project's models: (BOS, [PAD]). LLaDA: its BOS, [MASK] and the unused rows; its
    EOS = [PAD] is masked. Dream: [MASK] and the unused rows; its BOS = EOS = [PAD] is masked."""
    ids = set(cfg.never_predicted())
    if cfg.pad_id >= cfg.n_vocab:
        ids.add(cfg.pad_id)
    return tuple(sorted(ids))


def is_padding(tokens: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """(B, T) bool: the positions holding [PAD] when [PAD] is padding only (outside the predicted ids, as for
    this project's models); none when [PAD] is a text token (the public models' EOS)."""
    if cfg.pad_id >= cfg.n_vocab:
        return tokens == cfg.pad_id
    return torch.zeros_like(tokens, dtype=torch.bool)


def _runs(ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted distinct `ids` as runs of consecutive ids, (first, last) each."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _maskable(tokens: torch.Tensor, kept: tuple[int, ...]) -> torch.Tensor:
    """(B, T) bool: tokens none of `kept`, one comparison per run of consecutive kept ids (the public models'
    unused rows are one run), so no id tensor is built on the device."""
    out = torch.ones_like(tokens, dtype=torch.bool)
    for first, last in _runs(kept):
        out &= (tokens != first) if first == last else (tokens < first) | (tokens > last)
    return out


def apply_noise(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int, *kept: int) -> Noised:
    """Mask each position whose token is none of the `kept` ids where u < t (t (B,), u (B, T)). Pass
    `*unmaskable_ids(cfg)` (for this project's models that is BOS and [PAD])."""
    maskable = _maskable(tokens, kept)
    mask = (u < t[:, None]) & maskable
    return Noised(torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask, maskable)


def noise_for_model(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, cfg: ModelConfig) -> Noised:
    """`apply_noise` with the model config's [MASK] and `unmaskable_ids`. With a read-out shift (Dream) the
    first column is never masked either: its own hidden row stands in for a prediction no position makes."""
    noised = apply_noise(tokens, t, u, cfg.mask_id, *unmaskable_ids(cfg))
    if not cfg.logit_shift:
        return noised
    first = torch.zeros_like(noised.mask)
    first[:, 0] = True
    maskable = noised.maskable & ~first
    return Noised(torch.where(first, tokens, noised.inputs), noised.mask & ~first, maskable)


def count_masked(tokens: torch.Tensor, t: torch.Tensor, u: torch.Tensor, *kept: int) -> int:
    """How many positions `apply_noise` masks with the same `kept` ids (pass `*unmaskable_ids(cfg)`): read on
    the host, for `diffusion_loss`'s `n_masked` (call it on the CPU tensors, before the batch moves to the
    device)."""
    return int(((u < t[:, None]) & _maskable(tokens, kept)).sum())


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


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, r) of one chunk, float32: with a cap, r = tanh(h Wᵀ / cap) and logits = cap·r; without (cap
    0), r = logits = h Wᵀ."""
    z = (h @ weight.T).float()
    if cap == 0:
        return z, z
    r = z.div_(cap).tanh_()
    return r * cap, r


class _SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of the soft-capped logits cap·tanh(h Wᵀ / cap) (of h Wᵀ when cap is 0), a chunk
    of rows at a time: the forward keeps each row's log-sum-exp, and the backward recomputes each chunk's
    logits (with a single chunk, its tanh, or its logits without a cap, is kept instead). h and W arrive in the
    matmul dtype; logits, soft cap and softmax are float32 (as `DiffusionLM.logits`)."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, chunk: int):
        with torch.autocast(h.device.type, enabled=False):
            ces, lses = [], []
            for s in range(0, h.shape[0], chunk):
                y, r = _chunk_logits(h[s:s + chunk], weight, cap)  # (C, V)
                lse = torch.logsumexp(y, dim=-1)
                ces.append(lse - y.gather(1, targets[s:s + chunk, None])[:, 0])
                lses.append(lse)
        kept = (r,) if h.shape[0] <= chunk else ()
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
                r = kept[0] if kept else _chunk_logits(hc, weight, cap)[1]  # (C, V)
                dz = (r * cap if cap else r.clone()).sub_(lse[s:s + chunk, None]).exp_()  # softmax
                dz.scatter_add_(1, tc, torch.full(tc.shape, -1.0, device=dz.device))  # minus the one-hot target
                dz.mul_(grad[s:s + chunk, None])
                if cap:
                    dz.mul_(r.square().neg_().add_(1))  # through the soft cap
                dz = dz.to(h.dtype)
                grad_h.append(dz @ weight)
                grad_w += (dz.T @ hc).float()
        return torch.cat(grad_h), grad_w.to(weight.dtype), None, None, None


def softcapped_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                             chunk: int | None = None) -> torch.Tensor:
    """h (N, D), weight (V, D), targets (N,) → (N,) float32 cross-entropy of softmax(cap·tanh(h Wᵀ / cap)),
    or of softmax(h Wᵀ) when `cap` is 0 (no cap), without ever holding the logits of more than `chunk` rows
    (default `chunk_rows(V)`). Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
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
    NaN); None reads the count from the device (one host sync). The maskable positions are `unmaskable_ids`'s
    complement (count with `count_masked(tokens, t, u, *unmaskable_ids(cfg))`); with a logit shift the token at
    position p is predicted from hidden row `readout_rows(p)`, as in the model's own logits."""
    net = model.module if hasattr(model, "module") else model
    cfg = net.cfg
    noised = noise_for_model(tokens, t, u, cfg)
    count = noised.mask.sum()
    capacity = row_capacity(int(count) if n_masked is None else n_masked, tokens.numel())
    rows = torch.nonzero_static(noised.mask.flatten(), size=capacity, fill_value=0)[:, 0]  # (C,) masked first
    valid = torch.arange(capacity, device=tokens.device) < count
    hidden = model(noised.inputs, select=rows[:0]).hidden  # (B, T, D); an empty selection: no logits
    targets = torch.where(valid, tokens.flatten()[rows], 0)
    weights = torch.where(valid, (1.0 / t)[:, None].expand_as(tokens).flatten()[rows], 0.0)
    T = tokens.shape[1]
    read = rows - rows % T + net.readout_rows(rows % T)  # the hidden row each masked token is predicted from
    ce = softcapped_cross_entropy(hidden.flatten(0, 1)[read], net.head.weight[:cfg.n_vocab], targets,
                                  cfg.logit_softcap)
    overflow = torch.where(count > capacity, float("nan"), 1.0)  # an n_masked too small drops rows: say so
    return LossTerms((ce * weights).sum() * overflow, count, noised.maskable.sum())
