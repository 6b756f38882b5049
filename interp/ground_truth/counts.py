"""The ground-truth benchmark's counting: one feature's F1 for a category, and the controls printed beside it.

Everything here is a pure function of `Positions`: what the benchmark recorded at every scored position of
one half of the validation tokens at one noise level (BOS and padding are never scored). A feature "fires"
at a position when it is among the transcoder's active TopK latents there with a positive activation. The
F1 of a feature for a category is that of "fires" against "the position's clean token belongs to the
category", over the positions of one view: the visible ones (the model sees the token) or the masked ones
(the model sees [MASK] and must infer what is hidden).

Controls, each computed with the very same choose-on-one-half, score-on-the-other discipline:
- random live feature: the held-out F1 of every feature that fired at least once in the choosing half
  (dead ones left out), as a distribution (mean, 95th and 99th percentile);
- shuffled labels: the categories permuted among the positions of each half, then the best feature chosen
  and scored exactly as for the real labels;
- token-id lookup (no model): predict the category wherever the *input* id is one of the ids chosen for it
  on the choosing half (`lookup_sets`). At visible positions that is the token itself; at masked positions
  every input is [MASK], so the lookup can do no better than predicting the category everywhere;
- context lookup (no model): the same on the pair of input ids at the neighbouring positions (i − 1, i + 1,
  as the model saw them, [MASK] included): in templated text the words around a masked slot can name its
  category ("the capital of _ is"), and a feature earns credit at [MASK] only by doing better than that.
The model's own ceiling at masked positions uses the same kind of id sets, built from the clean tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Positions(NamedTuple):
    """Every scored position of one half at one noise level."""

    cats: torch.Tensor  # (N,) category index of the clean token, -1 for none
    masked: torch.Tensor  # (N,) bool: the input there is [MASK]
    clean: torch.Tensor  # (N,) clean token id
    inputs: torch.Tensor  # (N,) input id ([MASK] where masked)
    predicted: torch.Tensor  # (N,) the model's argmax token where masked, -1 where visible
    feats: torch.Tensor  # (N, S) global feature ids of the active TopK latents, every layer (S = Σ k)
    acts: torch.Tensor  # (N, S) their activations (a slot with activation 0 does not fire)
    context: torch.Tensor  # (N,) the input ids at i − 1 and i + 1 as one id (`context_ids`): the local context

    def view(self, masked: bool) -> "Positions":
        keep = self.masked == masked
        return Positions(*(x[keep] for x in self))

    def permuted(self, generator: torch.Generator) -> "Positions":
        """The same positions with the category labels shuffled among them (the shuffled-label control)."""
        order = torch.randperm(len(self.cats), generator=generator).to(self.cats.device)
        return self._replace(cats=self.cats[order])

    @staticmethod
    def cat(parts: list["Positions"]) -> "Positions":
        return Positions(*(torch.cat(xs) for xs in zip(*parts)))


class FeatureCounts(NamedTuple):
    """Sums over the positions of one view of one half, for every feature (F, all layers) and category (C)."""

    tp: torch.Tensor  # (F, C) positions of the category where the feature fires
    fired: torch.Tensor  # (F,) positions where it fires
    act_in: torch.Tensor  # (F, C) its summed activation at positions of the category
    act_all: torch.Tensor  # (F,) its summed activation at all positions
    in_cat: torch.Tensor  # (C,) positions of each category
    n: int  # positions in all

    def f1(self) -> torch.Tensor:  # (F, C)
        return f1_score(self.tp, self.fired[:, None], self.in_cat[None, :])


def f1_score(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """2·tp / (predicted + actual), 0 where both are 0."""
    return 2 * tp / (predicted + actual).clamp_min(1)


def feature_counts(p: Positions, n_features: int, n_categories: int) -> FeatureCounts:
    """Accumulated sparsely from the (position, TopK slot) pairs: no dense (positions × features) tensor."""
    dev = p.feats.device
    on = p.acts > 0  # (N, S)
    feats, acts = p.feats[on], p.acts[on].float()
    cats = p.cats[:, None].expand_as(on)[on]
    labelled = cats >= 0
    tp = torch.zeros(n_features, n_categories, device=dev)
    act_in = torch.zeros(n_features, n_categories, device=dev)
    tp.index_put_((feats[labelled], cats[labelled]), torch.ones(int(labelled.sum()), device=dev), accumulate=True)
    act_in.index_put_((feats[labelled], cats[labelled]), acts[labelled], accumulate=True)
    fired = torch.bincount(feats, minlength=n_features).float()
    act_all = torch.bincount(feats, weights=acts, minlength=n_features).float()
    in_cat = torch.bincount(p.cats[p.cats >= 0], minlength=n_categories).float()
    return FeatureCounts(tp, fired, act_in, act_all, in_cat, len(p.cats))


class BestFeature(NamedTuple):
    feature: torch.Tensor  # (C,) global id of each category's best feature on the choosing half
    f1_selection: torch.Tensor  # (C,)
    f1_heldout: torch.Tensor  # (C,)


def best_features(select: FeatureCounts, report: FeatureCounts) -> BestFeature:
    """Each category's feature with the highest F1 where it is chosen, and that feature's F1 held out."""
    value, feature = select.f1().max(dim=0)
    held = report.f1()[feature, torch.arange(len(feature), device=feature.device)]
    return BestFeature(feature, value, held)


class Distribution(NamedTuple):
    mean: torch.Tensor  # (C,)
    p95: torch.Tensor  # (C,)
    p99: torch.Tensor  # (C,)
    n: int  # how many features it is over


def random_live_features(select: FeatureCounts, report: FeatureCounts) -> Distribution:
    """The held-out F1 of a random live feature (one that fired in the choosing half; dead ones are left out,
    since nobody would pick one), over all of them: what a feature scores that nobody chose."""
    live = select.fired > 0
    f1 = report.f1()[live]  # (live, C)
    if not len(f1):
        zero = torch.zeros(report.tp.shape[1], device=f1.device)
        return Distribution(zero, zero, zero, 0)
    q = torch.quantile(f1, torch.tensor([0.95, 0.99], device=f1.device), dim=0)
    return Distribution(f1.mean(0), q[0], q[1], int(live.sum()))


class Shuffled(NamedTuple):
    mean: torch.Tensor  # (C,) held-out F1 of the feature chosen on shuffled labels, mean over repeats
    max: torch.Tensor  # (C,) its largest value over the repeats


def shuffled_label_control(select: Positions, report: Positions, n_features: int, n_categories: int,
                           repeats: int = 3, seed: int = 0) -> Shuffled:
    """Choose-then-score with the labels permuted among the positions of each half: the F1 that the
    choice alone buys when the labels carry no information."""
    g = torch.Generator().manual_seed(seed)
    runs = torch.stack([best_features(feature_counts(select.permuted(g), n_features, n_categories),
                                      feature_counts(report.permuted(g), n_features, n_categories)).f1_heldout
                        for _ in range(repeats)])
    return Shuffled(runs.mean(0), runs.max(0).values)


class IdCounts(NamedTuple):
    by_cat: torch.Tensor  # (V, C) positions of each category holding each id
    total: torch.Tensor  # (V,) positions holding each id
    in_cat: torch.Tensor  # (C,) positions of each category


def id_counts(ids: torch.Tensor, cats: torch.Tensor, vocab: int, n_categories: int) -> IdCounts:
    """How often each id occurs, by category, at the given positions (ids < 0, e.g. "no prediction", skipped)."""
    ok = ids >= 0
    ids, cats = ids[ok], cats[ok]
    by_cat = torch.zeros(vocab, n_categories, device=ids.device)
    lab = cats >= 0
    by_cat.index_put_((ids[lab], cats[lab]), torch.ones(int(lab.sum()), device=ids.device), accumulate=True)
    in_cat = torch.bincount(cats[lab], minlength=n_categories).float()
    return IdCounts(by_cat, torch.bincount(ids, minlength=vocab).float(), in_cat)


def lookup_sets(counts: IdCounts) -> torch.Tensor:
    """(V, C) bool: for each category, the ids seen with it on the choosing half, kept in order of their
    precision there (share of their occurrences that belong to the category) as far as the prefix that
    maximises the category's F1 on that half. So an id seen once in the category and a thousand times outside
    it is left out, and every id that is always in the category is kept."""
    V, C = counts.by_cat.shape
    precision = counts.by_cat / counts.total[:, None].clamp_min(1)
    precision = torch.where(counts.by_cat > 0, precision, torch.full_like(precision, -1.0))
    order = precision.argsort(dim=0, descending=True, stable=True)  # (V, C)
    tp = counts.by_cat.gather(0, order).cumsum(0)
    predicted = counts.total[order].cumsum(0)
    f1 = f1_score(tp, predicted, counts.in_cat[None, :])
    f1 = torch.where(precision.gather(0, order) >= 0, f1, torch.full_like(f1, -1.0))  # only ids seen with it
    best = f1.argmax(0)  # (C,) last index of the best prefix
    keep_sorted = torch.arange(V, device=f1.device)[:, None] <= best[None, :]
    keep_sorted &= f1.max(0).values[None, :] > 0
    sets = torch.zeros(V, C, dtype=torch.bool, device=f1.device)
    return sets.scatter(0, order, keep_sorted)


def set_f1(sets: torch.Tensor, counts: IdCounts) -> tuple[torch.Tensor, torch.Tensor]:
    """(F1, recall) per category of the classifier "the id at the position is in the category's set"."""
    tp = (counts.by_cat * sets).sum(0)
    predicted = (counts.total[:, None] * sets).sum(0)
    return f1_score(tp, predicted, counts.in_cat), tp / counts.in_cat.clamp_min(1)


def lookup_control(select: Positions, report: Positions, vocab: int, n_categories: int) -> torch.Tensor:
    """(C,) held-out F1 of the token-id lookup: ids chosen from the choosing half's *inputs*, scored on the
    other half's inputs (the same at visible and masked positions; at masked ones every input is [MASK])."""
    sets = lookup_sets(id_counts(select.inputs, select.cats, vocab, n_categories))
    return set_f1(sets, id_counts(report.inputs, report.cats, vocab, n_categories))[0]


def context_ids(inputs: torch.Tensor, edge: int) -> torch.Tensor:
    """(B, T) input ids → (B, T) one id per position for the pair (id at i − 1, id at i + 1); `edge` (an id
    no input has) stands for a neighbour outside the window."""
    prev = torch.full_like(inputs, edge)
    prev[:, 1:] = inputs[:, :-1]
    nxt = torch.full_like(inputs, edge)
    nxt[:, :-1] = inputs[:, 1:]
    return prev * (edge + 1) + nxt


def context_lookup_control(select: Positions, report: Positions, n_categories: int) -> torch.Tensor:
    """(C,) held-out F1 of the context lookup: `lookup_sets` over the neighbour pairs of the choosing half,
    scored on the other half (pairs are renumbered densely first: only those that occur get a row)."""
    ids, dense = torch.unique(torch.cat([select.context, report.context]), return_inverse=True)
    n = len(select.context)
    sets = lookup_sets(id_counts(dense[:n], select.cats, len(ids), n_categories))
    return set_f1(sets, id_counts(dense[n:], report.cats, len(ids), n_categories))[0]


def model_ceiling(select: Positions, report: Positions, vocab: int,
                  n_categories: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F1, recall) per category of the model's own prediction at the masked positions of `report`: the
    argmax token there "says" a category when it is in that category's set of *clean* ids, chosen by
    `lookup_sets` on every position of `select` (visible and masked: the clean tokens are known everywhere).
    Recall is how often the model's prediction at a masked position of the category falls in the category;
    F1 also charges it for predicting the category where it is not. A feature read at a masked position
    can carry no more about the hidden token than the model's own forward pass does, so a category the
    model itself does not infer is not one a feature can be asked to recover."""
    sets = lookup_sets(id_counts(select.clean, select.cats, vocab, n_categories))
    masked = report.view(masked=True)
    return set_f1(sets, id_counts(masked.predicted, masked.cats, vocab, n_categories))
