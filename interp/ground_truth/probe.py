"""A k-sparse probe over the transcoder features (SAEBench's sparse probing), chosen on one half, scored on the other.

Per category: the k features (any layer) whose mean activation differs most between the category's positions
and the rest on the choosing half (|mean in − mean out|, in each feature's own units, as SAEBench ranks the
latents of one SAE), then a logistic regression on those k activations fitted on the choosing half
(standardised inputs, class-balanced loss, a small L2 penalty, Newton's method), and a decision threshold
chosen on the choosing half to maximise F1 there (halfway between two distinct scores). Reported: F1 held out.
The class sums come from `FeatureCounts` (accumulated sparsely); only the chosen features' activations are ever
made dense.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from interp.ground_truth.counts import FeatureCounts, Positions, f1_score, feature_counts


def mean_difference(c: FeatureCounts) -> torch.Tensor:
    """(F, C) mean activation of each feature at the category's positions minus elsewhere (0 where it is off)."""
    out = c.n - c.in_cat
    return c.act_in / c.in_cat.clamp_min(1) - (c.act_all[:, None] - c.act_in) / out.clamp_min(1)


def choose_features(c: FeatureCounts, k: int) -> torch.Tensor:
    """(C, k) global feature ids with the largest |mean difference|, largest first (so the first j of them
    are the choice for a j-sparse probe)."""
    return mean_difference(c).abs().topk(k, dim=0).indices.T


def gather_activations(p: Positions, chosen: torch.Tensor) -> torch.Tensor:
    """(N, *chosen.shape): the chosen features' activations at every position (0 where not among the TopK)."""
    uniq, inverse = chosen.unique(return_inverse=True)
    slot = torch.searchsorted(uniq, p.feats).clamp_max(len(uniq) - 1)  # (N, S)
    hit = (uniq[slot] == p.feats) & (p.acts > 0)
    dense = torch.zeros(len(p.feats), len(uniq), device=p.feats.device)
    rows = torch.arange(len(p.feats), device=p.feats.device)[:, None].expand_as(slot)[hit]
    dense.index_put_((rows, slot[hit]), p.acts[hit].float(), accumulate=True)
    return dense[:, inverse]


class Probe(NamedTuple):
    mean: torch.Tensor  # (C, k) of the choosing half's activations
    scale: torch.Tensor  # (C, k)
    weight: torch.Tensor  # (C, k)
    bias: torch.Tensor  # (C,)
    threshold: torch.Tensor  # (C,) predict the category where score ≥ threshold

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, k) → (N, C)
        return ((x - self.mean) / self.scale * self.weight).sum(-1) + self.bias


def _balanced_loss(zb: torch.Tensor, beta: torch.Tensor, target: torch.Tensor, balance: torch.Tensor,
                   l2: float) -> torch.Tensor:
    """(C,) class-balanced mean logistic loss of each category's probe, plus its L2 penalty (bias exempt).
    zb (C, N, k + 1): standardised activations with a last column of ones; target, balance (C, N)."""
    logits = (zb @ beta[..., None])[..., 0]  # (C, N)
    ce = F.binary_cross_entropy_with_logits(logits, target, weight=balance, reduction="none").mean(1)
    return ce + l2 * beta[:, :-1].pow(2).sum(-1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 15, l2: float = 1e-3) -> Probe:
    """One logistic regression per category, all at once: x (N, C, k) activations, y (N, C) bool. Newton's
    method with step halving (k ≤ a few, so each category's Hessian is a (k+1)² matrix): the regularised loss
    is strictly convex, and a few dozen iterations reach its minimum."""
    n, C, k = x.shape
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mean) / scale).transpose(0, 1)  # (C, N, k)
    zb = torch.cat([z, torch.ones(C, n, 1, device=x.device)], -1).contiguous()  # (C, N, k + 1): bias column last
    target = y.T.float()  # (C, N)
    n_pos = target.sum(1, keepdim=True).clamp(1, n - 1)
    balance = torch.where(y.T, n / (2 * n_pos), n / (2 * (n - n_pos)))  # (C, N): each class weighs half
    ridge = torch.diag(torch.cat([torch.full((k,), 2 * l2), torch.tensor([1e-6])])).to(x.device)
    beta = torch.zeros(C, k + 1, device=x.device)
    loss = _balanced_loss(zb, beta, target, balance, l2)
    for _ in range(steps):
        p = torch.sigmoid((zb @ beta[..., None])[..., 0])  # (C, N)
        grad = (zb.transpose(1, 2) @ (balance * (p - target))[..., None])[..., 0] / n  # (C, k + 1)
        grad[:, :-1] += 2 * l2 * beta[:, :-1]
        hess = zb.transpose(1, 2) @ (zb * (balance * p * (1 - p))[..., None]) / n + ridge  # (C, k + 1, k + 1)
        step = torch.linalg.solve(hess, grad)
        size = torch.ones(C, 1, device=x.device)
        for _ in range(20):  # halve the step of each category whose loss would rise
            trial = beta - size * step
            new = _balanced_loss(zb, trial, target, balance, l2)
            worse = new > loss + 1e-12
            if not worse.any():
                break
            size[worse] /= 2
        better = new <= loss + 1e-12
        beta = torch.where(better[:, None], trial, beta)
        done = (loss - torch.where(better, new, loss)).max() < 1e-7  # the loss has stopped falling
        loss = torch.where(better, new, loss)
        if done:
            break
    probe = Probe(mean, scale, beta[:, :-1], beta[:, -1], torch.zeros(C, device=x.device))
    return probe._replace(threshold=best_threshold(probe.scores(x), y))


def best_threshold(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(C,) the score threshold with the best F1 on these positions (scores (N, C), y (N, C) bool). Only
    thresholds between distinct scores are candidates ("score ≥ threshold" takes a run of tied scores whole), and
    the threshold sits halfway to the next lower score, so a held-out score a little under the lowest chosen one
    still counts; where everything is predicted it is -inf."""
    s, order = scores.sort(dim=0, descending=True)
    tp = y.gather(0, order).float().cumsum(0)
    predicted = torch.arange(1, len(s) + 1, device=s.device, dtype=torch.float)[:, None]
    f1 = f1_score(tp, predicted, y.float().sum(0)[None, :])
    run_end = torch.ones_like(s, dtype=torch.bool)
    run_end[:-1] = s[:-1] > s[1:]
    best = torch.where(run_end, f1, torch.full_like(f1, -1.0)).argmax(0)
    below = torch.cat([s[1:], torch.full_like(s[:1], float("-inf"))])  # the next lower score (none after the last)
    return (s.gather(0, best[None, :])[0] + below.gather(0, best[None, :])[0]) / 2


def probe_f1(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = probe.scores(x) >= probe.threshold
    return f1_score((pred & y).float().sum(0), pred.float().sum(0), y.float().sum(0))


class ProbeResult(NamedTuple):
    features: torch.Tensor  # (C, k) global feature ids
    f1_selection: torch.Tensor  # (C,)
    f1_heldout: torch.Tensor  # (C,)


def sparse_probes(select: Positions, report: Positions, n_features: int, n_categories: int,
                  ks: tuple[int, ...] = (1, 2, 5), steps: int = 15) -> dict[int, ProbeResult]:
    """A k-sparse probe per category for every k: features and fit on `select`, F1 on both halves."""
    counts = feature_counts(select, n_features, n_categories)
    chosen = choose_features(counts, min(max(ks), n_features))  # (C, K)
    x_sel, x_rep = gather_activations(select, chosen), gather_activations(report, chosen)  # (N, C, K)
    classes = torch.arange(n_categories, device=select.cats.device)
    y_sel, y_rep = select.cats[:, None] == classes, report.cats[:, None] == classes
    out = {}
    for k in ks:
        k_ = min(k, chosen.shape[1])
        probe = fit_probe(x_sel[..., :k_], y_sel, steps)
        out[k] = ProbeResult(chosen[:, :k_], probe_f1(probe, x_sel[..., :k_], y_sel),
                             probe_f1(probe, x_rep[..., :k_], y_rep))
    return out
