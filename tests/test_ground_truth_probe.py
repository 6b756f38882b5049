"""The k-sparse probe over transcoder features: sparse selection against a dense reference, and the fit."""
import pytest
import torch

from interp.ground_truth.counts import Positions, feature_counts
from interp.ground_truth.probe import (
    _balanced_loss,
    best_threshold,
    choose_features,
    fit_probe,
    gather_activations,
    mean_difference,
    sparse_probes,
)


def random_positions(n: int, n_features: int, slots: int, n_categories: int, seed: int) -> Positions:
    g = torch.Generator().manual_seed(seed)
    feats = torch.stack([torch.randperm(n_features, generator=g)[:slots] for _ in range(n)])  # distinct per row
    acts = torch.rand(n, slots, generator=g) * (torch.rand(n, slots, generator=g) < 0.8)  # some slots off
    cats = torch.randint(-1, n_categories, (n,), generator=g)
    zeros = torch.zeros(n, dtype=torch.long)
    return Positions(cats, zeros.bool(), zeros, zeros, zeros - 1, feats, acts, zeros)


def dense(p: Positions, n_features: int) -> torch.Tensor:
    return torch.zeros(len(p.cats), n_features).scatter(1, p.feats, p.acts)


@pytest.mark.parametrize("seed,n_features,slots,n_categories", [(0, 20, 3, 3), (1, 50, 8, 5), (2, 7, 7, 2)])
def test_the_sparse_mean_difference_matches_a_dense_computation(seed, n_features, slots, n_categories):
    p = random_positions(300, n_features, slots, n_categories, seed)
    x = dense(p, n_features)  # (N, F) the reference
    counts = feature_counts(p, n_features, n_categories)
    for c in range(n_categories):
        inside = p.cats == c
        expected = x[inside].mean(0) - x[~inside].mean(0)
        torch.testing.assert_close(mean_difference(counts)[:, c], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(counts.tp[:, c], ((x > 0) & inside[:, None]).float().sum(0))
    k = min(4, n_features)
    chosen = choose_features(counts, k)
    ref = torch.stack([(x[p.cats == c].mean(0) - x[p.cats != c].mean(0)).abs().topk(k).indices
                       for c in range(n_categories)])
    assert torch.equal(chosen, ref)
    torch.testing.assert_close(gather_activations(p, chosen), x[:, chosen])  # (N, C, k)


def planted(n: int, seed: int) -> Positions:
    """Category 0 is "feature 1 fires OR feature 2 fires" (disjoint halves of it); features 3-9 are noise."""
    g = torch.Generator().manual_seed(seed)
    cats = torch.where(torch.rand(n, generator=g) < 0.2, 0, -1)
    which = torch.randint(1, 3, (n,), generator=g)
    signal = torch.where(cats == 0, which, torch.zeros_like(which))
    noise = torch.randint(3, 10, (n,), generator=g)
    feats = torch.stack([torch.where(signal > 0, signal, torch.full_like(signal, 1)), noise], 1)
    acts = torch.stack([(signal > 0).float() * (1 + torch.rand(n, generator=g)), torch.rand(n, generator=g)], 1)
    zeros = torch.zeros(n, dtype=torch.long)
    return Positions(cats, zeros.bool(), zeros, zeros, zeros - 1, feats, acts, zeros)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_probe_needs_as_many_features_as_the_concept_has_parts(seed):
    select, report = planted(3000, seed), planted(3000, seed + 10)
    out = sparse_probes(select, report, n_features=10, n_categories=1, ks=(1, 2, 5))
    assert set(out[2].features[0].tolist()) == {1, 2}
    assert out[1].features[0].tolist()[0] in (1, 2)
    assert float(out[1].f1_heldout[0]) == pytest.approx(2 * 0.5 / 1.5, abs=0.05)  # half the category
    assert float(out[2].f1_heldout[0]) == pytest.approx(1.0)
    assert float(out[5].f1_heldout[0]) == pytest.approx(1.0)
    for k in (1, 2, 5):
        assert float(out[k].f1_selection[0]) >= float(out[k].f1_heldout[0]) - 0.05


@pytest.mark.parametrize("scores,y,threshold", [
    ([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0], 1.5),  # halfway between the last one taken and the next
    # ties at 0: "score ≥ 0" would take all four, so the threshold stays above them
    ([3.0, 0.0, 0.0, 0.0], [1, 1, 0, 0], 1.5),
    ([0.0, 0.0, 0.0, 0.0], [1, 1, 1, 0], float("-inf")),  # everything tied: predicting all is the only choice
])
def test_the_threshold_is_chosen_between_distinct_scores(scores, y, threshold):
    t = best_threshold(torch.tensor(scores)[:, None], torch.tensor(y, dtype=torch.bool)[:, None])
    assert float(t[0]) == threshold


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 3), (2, 5)])
def test_the_fit_reaches_the_minimum_of_its_loss(seed, k):
    # overlapping classes, so the minimum is finite: there the gradient of the regularised loss vanishes
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(400, 2, generator=g) < torch.tensor([0.1, 0.4])
    x = torch.rand(400, 2, k, generator=g) + y[..., None] * torch.rand(k, generator=g)
    probe = fit_probe(x, y, l2=1e-3)
    beta = torch.cat([probe.weight, probe.bias[:, None]], 1).requires_grad_(True)
    z = ((x - probe.mean) / probe.scale).transpose(0, 1)  # (C, N, k)
    zb = torch.cat([z, torch.ones(2, 400, 1)], -1)
    n_pos = y.float().sum(0)
    balance = torch.where(y, 400 / (2 * n_pos), 400 / (2 * (400 - n_pos))).T
    _balanced_loss(zb, beta, y.T.float(), balance, 1e-3).sum().backward()
    assert beta.grad.abs().max() < 1e-5
