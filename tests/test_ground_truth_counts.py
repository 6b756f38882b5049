"""The ground-truth benchmark's counting and its controls, on hand-made positions (no pipeline fixture)."""
import pytest
import torch

from interp.ground_truth.counts import (
    IdCounts,
    Positions,
    best_features,
    context_ids,
    context_lookup_control,
    feature_counts,
    id_counts,
    lookup_control,
    lookup_sets,
    model_ceiling,
    random_live_features,
    set_f1,
    shuffled_label_control,
)

MASK = 99


def make(cats, masked, fires: dict[int, list[int]] | None = None, clean=None, predicted=None, slots: int = 2,
         context=None):
    """Positions whose feature f fires (activation 1) at the positions in fires[f]."""
    n = len(cats)
    feats = torch.zeros(n, slots, dtype=torch.long)
    acts = torch.zeros(n, slots)
    used = [0] * n
    for f, where in (fires or {}).items():
        for i in where:
            feats[i, used[i]], acts[i, used[i]] = f, 1.0
            used[i] += 1
    masked = torch.tensor(masked, dtype=torch.bool)
    clean = torch.tensor(clean if clean is not None else [0] * n)
    inputs = torch.where(masked, torch.full_like(clean, MASK), clean)
    predicted = torch.tensor(predicted if predicted is not None else [-1] * n)
    context = torch.tensor(context if context is not None else [0] * n)
    return Positions(torch.tensor(cats), masked, clean, inputs, predicted, feats, acts, context)


# positions 0-3 visible, 4-7 masked; feature 1 fires on the visible tokens of category 0, feature 2 at the
# masked positions whose hidden token is of category 0 (and at one masked position of no category)
HAND = make(cats=[0, 0, 1, -1, 0, 0, 1, -1], masked=[0, 0, 0, 0, 1, 1, 1, 1], fires={1: [0, 1], 2: [4, 5, 7]})


@pytest.mark.parametrize("masked,expected", [
    (False, {1: 1.0, 2: 0.0, 3: 0.0}),  # on visible text only the token detector scores
    (True, {1: 0.0, 2: 2 * 2 / (3 + 2), 3: 0.0}),  # at [MASK], only what infers the hidden token
])
def test_f1_is_counted_separately_at_visible_and_masked_positions(masked, expected):
    view = HAND.view(masked=masked)
    counts = feature_counts(view, n_features=4, n_categories=2)
    assert counts.n == 4 and counts.in_cat.tolist() == [2.0, 1.0]
    for feature, f1 in expected.items():
        assert counts.f1()[feature, 0].item() == pytest.approx(f1)
    best = best_features(counts, counts)
    assert int(best.feature[0]) == max(expected, key=expected.get)


def test_a_slot_with_activation_zero_does_not_fire():
    p = make([0, 0], [0, 0], fires={1: [0, 1]})
    p = p._replace(acts=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    counts = feature_counts(p, 2, 1)
    assert counts.fired.tolist() == [0.0, 1.0] and counts.tp[:, 0].tolist() == [0.0, 1.0]


def test_the_feature_is_chosen_on_one_half_and_scored_on_the_other():
    # feature 0 is perfect where features are chosen, useless where they are scored; feature 1 the reverse
    select = make([0, 0, -1, -1], [0] * 4, fires={0: [0, 1], 1: [0, 2]})
    report = make([0, 0, -1, -1], [0] * 4, fires={0: [2, 3], 1: [0, 1]})
    best = best_features(feature_counts(select, 2, 1), feature_counts(report, 2, 1))
    assert int(best.feature[0]) == 0
    assert float(best.f1_selection[0]) == pytest.approx(1.0) and float(best.f1_heldout[0]) == pytest.approx(0.0)


def _stream(n: int, n_categories: int, seed: int, masked_share: float = 0.0):
    """Positions whose clean token ids belong to one category each (ids 10·c … 10·c + 4), and -1 positions
    with ids 50 … 59; a `masked_share` of them masked."""
    g = torch.Generator().manual_seed(seed)
    cats = torch.randint(-1, n_categories, (n,), generator=g)
    clean = torch.where(cats >= 0, 10 * cats + torch.randint(0, 5, (n,), generator=g),
                        50 + torch.randint(0, 10, (n,), generator=g))
    masked = torch.rand(n, generator=g) < masked_share
    return make(cats.tolist(), masked.tolist(), clean=clean.tolist())


@pytest.mark.parametrize("seed,n_categories", [(0, 2), (1, 3), (2, 4)])
def test_the_lookup_is_perfect_on_visible_tokens_and_blind_at_masked_ones(seed, n_categories):
    select, report = _stream(2000, n_categories, seed, 0.5), _stream(2000, n_categories, seed + 100, 0.5)
    visible = lookup_control(select.view(False), report.view(False), vocab=100, n_categories=n_categories)
    assert visible.tolist() == pytest.approx([1.0] * n_categories)
    masked = lookup_control(select.view(True), report.view(True), vocab=100, n_categories=n_categories)
    # every input is [MASK]: the best the lookup can do is to predict the category everywhere
    share = report.view(True).cats.eq(torch.arange(n_categories)[:, None]).float().mean(1)
    assert masked.tolist() == pytest.approx((2 * share / (1 + share)).tolist(), rel=1e-5)


@pytest.mark.parametrize("by_cat,total,expected", [
    # id 0 always in the category, id 1 once in it among 1000: only id 0 is kept
    ([[10], [1], [0]], [10, 1000, 5], [True, False, False]),
    # two ids always in it: both kept
    ([[5], [5], [0]], [5, 5, 7], [True, True, False]),
    # an id mostly in the category is kept when it raises F1 (3 of 4 in the category)
    ([[5], [3], [0]], [5, 4, 7], [True, True, False]),
    # never seen with the category: nothing kept, even if it would raise F1 (no F1 to gain here)
    ([[0], [0], [0]], [5, 4, 7], [False, False, False]),
])
def test_lookup_sets_keep_the_ids_that_raise_f1(by_cat, total, expected):
    by_cat, total = torch.tensor(by_cat, dtype=torch.float), torch.tensor(total, dtype=torch.float)
    sets = lookup_sets(IdCounts(by_cat, total, by_cat.sum(0)))
    assert sets[:, 0].tolist() == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shuffled_label_choice_scores_near_chance(seed):
    # 40 random features firing at 10% of positions; feature 40 fires exactly on category 0 (10% of positions)
    g = torch.Generator().manual_seed(seed)
    n, F = 6000, 41

    def half():
        cats = torch.where(torch.rand(n, generator=g) < 0.1, 0, -1)
        feats = torch.stack([torch.randint(0, 40, (n,), generator=g), torch.full((n,), 40)], 1)
        acts = torch.stack([(torch.rand(n, generator=g) < 0.4).float(), (cats == 0).float()], 1)
        return Positions(cats, torch.zeros(n, dtype=torch.bool), cats, cats, cats, feats, acts, cats)

    select, report = half(), half()
    real = best_features(feature_counts(select, F, 1), feature_counts(report, F, 1))
    assert int(real.feature[0]) == 40 and float(real.f1_heldout[0]) == pytest.approx(1.0)
    shuffled = shuffled_label_control(select, report, F, 1, repeats=5, seed=seed)
    # with labels independent of firing, a feature firing at a share q of positions scores 2pq / (p + q) for a
    # category at a share p; the choice then goes to the feature that fires most (feature 40, q = p = 0.1)
    chance = 2 * 0.1 * 0.1 / (0.1 + 0.1)
    assert abs(float(shuffled.mean[0]) - chance) < 0.03 and float(shuffled.max[0]) < 0.2


@pytest.mark.parametrize("dead", [[3], [0, 3], []])
def test_the_random_live_feature_distribution_leaves_out_dead_features(dead):
    # feature f fires on the category at the chosen half unless dead; every feature is perfect where scored
    fires_select = {f: [0, 1] for f in range(4) if f not in dead}
    select = make([0, 0, -1, -1], [0] * 4, fires=fires_select, slots=4)
    report = make([0, 0, -1, -1], [0] * 4, fires={0: [0, 1], 1: [2, 3], 2: [2, 3], 3: [0, 1]}, slots=4)
    dist = random_live_features(feature_counts(select, 4, 1), feature_counts(report, 4, 1))
    live = [f for f in range(4) if f not in dead]
    held = {0: 1.0, 1: 0.0, 2: 0.0, 3: 1.0}
    assert dist.n == len(live)
    assert float(dist.mean[0]) == pytest.approx(sum(held[f] for f in live) / len(live))
    assert float(dist.p99[0]) <= 1.0 and float(dist.p95[0]) <= float(dist.p99[0]) + 1e-6


def test_the_ceiling_maps_the_models_argmax_to_categories_by_clean_ids():
    # choosing half: category 0 is spelled with ids 10 and 11, category 1 with id 20, no category with 30
    select = make([0, 0, 1, -1], [0] * 4, clean=[10, 11, 20, 30])
    # scored half, all masked: at category 0 the model predicts 10, 11, 20, 10; at category 1, 20 and 20; at the
    # position of no category, 10
    report = make([0, 0, 0, 0, 1, 1, -1], [1] * 7, clean=[10, 11, 10, 11, 20, 20, 30],
                  predicted=[10, 11, 20, 10, 20, 20, 10])
    f1, recall = model_ceiling(select, report, vocab=40, n_categories=2)
    assert recall.tolist() == pytest.approx([3 / 4, 1.0])
    assert f1.tolist() == pytest.approx([2 * 3 / (4 + 4), 2 * 2 / (3 + 2)])
    # visible positions never count: only the masked view is scored
    mixed = report._replace(masked=torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool))
    assert model_ceiling(select, mixed, 40, 2)[0][0].item() == pytest.approx(2 * 3 / (3 + 4))


def test_set_f1_counts_the_ids_in_each_set():
    counts = id_counts(torch.tensor([1, 1, 2, 3]), torch.tensor([0, -1, 0, 1]), vocab=4, n_categories=2)
    sets = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.bool)
    f1, recall = set_f1(sets, counts)
    assert f1.tolist() == pytest.approx([2 * 2 / (3 + 2), 1.0]) and recall.tolist() == pytest.approx([1.0, 1.0])


def test_context_ids_pair_the_neighbours_and_mark_the_window_edges():
    inputs = torch.tensor([[5, 6, 7], [1, 2, 3]])
    ids = context_ids(inputs, edge=10)
    assert ids.tolist() == [[10 * 11 + 6, 5 * 11 + 7, 6 * 11 + 10], [10 * 11 + 2, 1 * 11 + 3, 2 * 11 + 10]]
    assert len(set(ids.flatten().tolist())) == 6  # distinct pairs, distinct ids


@pytest.mark.parametrize("seed", [0, 1])
def test_the_context_lookup_finds_a_category_its_neighbours_name_where_the_token_lookup_is_blind(seed):
    """At masked positions the hidden token's category is named by its left neighbour (context 7 before category
    0, context 8 before category 1): the token-id lookup sees only [MASK], the context lookup is perfect."""
    g = torch.Generator().manual_seed(seed)

    def half():
        cats = torch.randint(0, 2, (200,), generator=g)
        return make(cats.tolist(), [True] * 200, clean=(cats + 20).tolist(), context=(cats + 7).tolist())
    select, report = half(), half()
    assert context_lookup_control(select, report, 2).tolist() == [1.0, 1.0]
    base = torch.stack([(report.cats == c).float().mean() for c in (0, 1)])  # "everything": 2p / (1 + p)
    torch.testing.assert_close(lookup_control(select, report, 100, 2), 2 * base / (1 + base))
