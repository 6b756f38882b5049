"""The attribution graph on small random models (every code path: a skip connection, a layer without a
transcoder, [MASK] inputs, several targets), checked against references: the real model, autograd,
and ablations in the frozen and in the real model."""
import pytest
import torch

from interp.explanations.graph import (
    ERROR,
    FEATURE,
    MASK,
    TARGET,
    TOKEN,
    build_graph,
    graph_scores,
    node_influence,
    normalized,
    propagate,
    prune,
    total_effects,
)
from interp.explanations.interventions import (
    Change,
    ablate,
    agreement,
    intervene,
    parse_changes,
    run_step,
    run_step_settings,
)
from interp.explanations.replacement import _heads, _merge, demean, freeze, linear_forward, target_cotangents
from interp.explanations.score import carried, mean_agreement, most_active, percentile, score_explanation
from interp.explanations.step_analysis import StepSettings, analyse_step, cite, layer_parts, path_value
from model.diffusion import DiffusionLM, ModelConfig
from model.transcoder import Transcoder, TranscoderConfig

POSITIONS, TARGETS = [4, 5, 7], [11, 13, 2]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = ModelConfig(n_vocab=60, vocab_size=64, mask_id=60, pad_id=61, bos_id=0, num_layers=3, num_heads=2,
                      model_dim=32)
    model = DiffusionLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # the zero-initialised projections too: every path carries signal
    tcs = {0: Transcoder(TranscoderConfig(32, 128, 6)),
           2: Transcoder(TranscoderConfig(32, 128, 6, skip_connection=True))}
    with torch.no_grad():
        for tc in tcs.values():
            for p in tc.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.tensor([0, 5, 7, 9, 60, 60, 12, 60, 3])
    return model, tcs, tokens


def test_replacement_forward_equals_the_model(setup):
    model, tcs, tokens = setup
    fz = freeze(model, tcs, tokens)
    with torch.no_grad():
        real = model(tokens[None]).logits[0]
        torch.testing.assert_close(fz.logits, real, atol=1e-5, rtol=1e-5)
        r = linear_forward(model, tcs, fz)
        torch.testing.assert_close(model.logits(r * fz.final_inv), real, atol=1e-5, rtol=1e-5)


def test_target_values_are_the_models_own_demeaned_logits(setup):
    """A target's value is a real quantity: the committed token's pre-cap logit minus the mean over the tokens a
    step can commit, as the model computes it; its log-probability and lift above uniform are the model's too."""
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    with torch.no_grad():
        out = model(tokens[None])
        z = model.head(out.hidden[0, POSITIONS])[:, :model.cfg.n_vocab]  # the model's own pre-cap logits
        z_rest = torch.cat([z[:, :0], z[:, 1:]], 1)  # BOS (id 0) is never committed
        expected = z[torch.arange(3), TARGETS] - z_rest.mean(1)
        logp = torch.log_softmax(out.logits[0, POSITIONS].clone().index_fill_(1, torch.tensor([0]), -torch.inf), -1)
    torch.testing.assert_close(g.target_values, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(demean(z, 0)[torch.arange(3), TARGETS], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.logprobs, logp[torch.arange(3), TARGETS], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.lift, g.logprobs + torch.log(torch.tensor(59.0)), atol=1e-6, rtol=1e-6)
    # and the re-run of the step reports the same two numbers
    base = run_step(model, tcs, fz, POSITIONS, TARGETS)
    torch.testing.assert_close(base.value, g.target_values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.logp, g.logprobs, atol=1e-5, rtol=1e-5)


def frozen_features_forward(model, tcs, fz, embed, errors, factors):
    """The reference: the frozen model with every feature's value a constant (times `factors`), so
    autograd's gradients times the values are the direct effects."""
    r = embed
    for layer, block in enumerate(model.blocks):
        att = block.attn
        r = r + att.out(_merge(fz.probs[layer] @ _heads(att.v(r * fz.attn_inv[layer]), att.h)))
        out = errors[layer]
        if layer in tcs:
            out = out + tcs[layer].decode(fz.acts[layer] * factors[layer], fz.idx[layer], r * fz.mlp_inv[layer])
        r = r + out
    return r


def test_direct_and_total_effects_match_autograd(setup):
    """The batched hand-written backward against autograd through the frozen model."""
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS, batch_size=5)
    effects = total_effects(g)
    grads, _ = target_cotangents(model, fz, POSITIONS, TARGETS)
    embed = fz.embed.clone().requires_grad_(True)
    errors = [e.clone().requires_grad_(True) for e in fz.error]
    factors = {lay: torch.ones_like(fz.acts[lay]).requires_grad_(True) for lay in tcs}
    with torch.enable_grad():
        margin = (frozen_features_forward(model, tcs, fz, embed, errors, factors)[POSITIONS] * grads).sum(-1)
        total = (linear_forward(model, tcs, fz, factors)[POSITIONS] * grads).sum(-1)
        for t in range(len(TARGETS)):
            ge, *gerr = torch.autograd.grad(margin[t], [embed, *errors], retain_graph=True)
            gf = torch.autograd.grad(margin[t], list(factors.values()), retain_graph=True)
            gt = torch.autograd.grad(total[t], list(factors.values()), retain_graph=True)
            row = g.adjacency[g.target_start + t]
            torch.testing.assert_close(row[g.embed_start:g.target_start], (ge * fz.embed).sum(-1), atol=1e-5, rtol=1e-4)
            for lay in range(3):
                got = row[g.error_start + lay * g.n_pos:g.error_start + (lay + 1) * g.n_pos]
                torch.testing.assert_close(got, (gerr[lay] * fz.error[lay]).sum(-1), atol=1e-5, rtol=1e-4)
            for k, lay in enumerate(tcs):
                active = fz.acts[lay] > 0
                in_layer = g.feature_nodes[:, 0] == lay
                torch.testing.assert_close(row[:g.n_features][in_layer], gf[k][active], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(effects[t, :g.n_features][in_layer], gt[k][active], atol=1e-5, rtol=1e-4)
    # feature rows: a layer-2 feature's direct inputs from layer-0 features, against autograd on its pre-activation
    i = int((g.feature_nodes[:, 0] == 2).nonzero()[0, 0])
    _, pos, f = g.feature_nodes[i].tolist()
    with torch.enable_grad():
        sub = type(model)(model.cfg)
        sub.load_state_dict(model.state_dict())
        sub.blocks = sub.blocks[:2]
        fz2 = type(fz)(**{**fz.__dict__, "probs": fz.probs[:2], "attn_inv": fz.attn_inv[:2]})
        r2 = frozen_features_forward(sub, {0: tcs[0]}, fz2, embed, errors, factors)
        att = model.blocks[2].attn
        r2 = r2 + att.out(_merge(fz.probs[2] @ _heads(att.v(r2 * fz.attn_inv[2]), att.h)))
        pre = (r2[pos] * fz.mlp_inv[2][pos]) @ tcs[2].encoder.weight[f]
        (gf0,) = torch.autograd.grad(pre, [factors[0]])
    torch.testing.assert_close(g.adjacency[i, :g.n_features][g.feature_nodes[:, 0] == 0], gf0[fz.acts[0] > 0],
                               atol=1e-5, rtol=1e-4)


def assert_graph_adds_up(g) -> None:
    """Each target's value is the sum of its parts (inputs, and per layer features, error and bias), and an
    active feature's direct inputs plus its biases are its activation."""
    parts = layer_parts(g)
    assert list(parts.layers) == list(range(g.num_layers))
    for t, whole in enumerate(parts.whole):
        total = parts.tokens[t] + parts.masks[t] + sum(p.features[t] + p.error[t] + p.bias[t]
                                                       for p in parts.layers.values())
        assert abs(total - whole) < 1e-4 * max(1.0, abs(whole)), (total, whole)
    rows = g.adjacency[:g.n_features].sum(1) + g.bias_inputs[:g.n_features].sum(1) + g.encoder_bias
    torch.testing.assert_close(rows, g.activations, atol=1e-4, rtol=1e-4)


def test_parts_add_up_to_the_whole(setup):
    model, tcs, tokens = setup
    g, _ = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    assert_graph_adds_up(g)
    # node kinds: three [MASK] inputs, one error node per layer and position, one target per committed token
    kinds = [g.kind(i) for i in range(len(g.adjacency))]
    assert kinds.count(MASK) == 3 and kinds.count(TOKEN) == 6 and kinds.count(TARGET) == 3
    assert kinds.count(ERROR) == 3 * len(tokens) and kinds.count(FEATURE) == g.n_features > 0
    # layer 1 has no transcoder: no feature nodes, its whole MLP output is its error node
    assert not (g.feature_nodes[:, 0] == 1).any()


def test_predicted_ablations_match_measured(setup):
    """Ablating one feature: the frozen model moves exactly as the graph's total effect says; the real
    model (attention and norms live) agrees to first order for a small ablation."""
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    effects = total_effects(g)
    grads, _ = target_cotangents(model, fz, POSITIONS, TARGETS)
    base = run_step(model, tcs, fz, POSITIONS, TARGETS).value
    eps, pred, real = 0.02, [], []
    for i in range(g.n_features):
        layer, pos, f = g.feature_nodes[i].tolist()
        slot = int(((fz.idx[layer][pos] == f) & (fz.acts[layer][pos] > 0)).nonzero()[0, 0])
        factor = torch.ones_like(fz.acts[layer])
        factor[pos, slot] = 0
        r = linear_forward(model, tcs, fz, {layer: factor})
        frozen = ((r - fz.residual)[POSITIONS] * grads).sum(-1)
        torch.testing.assert_close(frozen, -effects[:, i], atol=1e-5, rtol=1e-4)
        setting = {(layer, pos, f): (1 - eps) * float(g.activations[i])}
        small = run_step(model, tcs, fz, POSITIONS, TARGETS, setting).value
        pred += (-eps * effects[:, i]).tolist()
        real += (small - base).tolist()
    pred, real = torch.tensor(pred), torch.tensor(real)
    print("corr", torch.corrcoef(torch.stack([pred, real]))[0, 1])


def full_matrix_prune(g, node_threshold, edge_threshold):
    """The reference: pruning on the full N × N matrix, the removed nodes' rows and columns zeroed."""
    w = torch.zeros(len(g.adjacency))
    w[g.target_start:] = 1 / len(g.targets)
    influence = node_influence(g)
    order = influence.sort(descending=True).values
    cut = order[min(int(torch.searchsorted(order.cumsum(0) / order.sum(), torch.tensor(node_threshold))),
                    len(order) - 1)]
    keep = influence >= cut
    keep[g.embed_start:] = True
    A = g.adjacency.clone()
    A[~keep] = 0
    A[:, ~keep] = 0
    Ahat = normalized(A)
    scores = Ahat * (propagate(Ahat, w) + w)[:, None]  # the series (tested against the inverse above)
    flat = scores[scores > 0].sort(descending=True).values
    edge_cut = flat[min(int(torch.searchsorted(flat.cumsum(0) / flat.sum(), torch.tensor(edge_threshold))),
                        len(flat) - 1)]
    edges = (scores >= edge_cut) & (scores > 0)
    while True:
        before = keep.clone()
        edges[~keep] = False
        edges[:, ~keep] = False
        keep[:g.embed_start] &= edges[:, :g.embed_start].any(0)
        keep[:g.n_features] &= edges[:g.n_features].any(1)
        if torch.equal(before, keep):
            return keep, set(zip(*(t.tolist() for t in edges.nonzero(as_tuple=True))))


def test_influence_and_pruning_follow_circuit_tracer(setup):
    model, tcs, tokens = setup
    g, _ = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    A = normalized(g.adjacency)
    w = torch.zeros(len(A))
    w[g.target_start:] = 1 / 3
    closed = w @ (torch.linalg.inv(torch.eye(len(A)) - A) - torch.eye(len(A)))  # the closed form of the series
    torch.testing.assert_close(node_influence(g), closed, atol=1e-5, rtol=1e-4)
    loose, tight = prune(g, 1.0, 1.0), prune(g, 0.5, 0.9)
    assert tight.node_mask.sum() < loose.node_mask.sum() and tight.node_mask[g.embed_start:].all()
    edge_set = lambda pr: set(zip(*(t.tolist() for t in pr.edge_index())))  # noqa: E731
    assert edge_set(tight) < edge_set(loose)
    for thresholds in ((0.8, 0.98), (0.5, 0.9), (0.95, 0.999)):  # the sub-matrix path against the full matrix
        nodes, edges = full_matrix_prune(g, *thresholds)
        ours = prune(g, *thresholds)
        assert torch.equal(ours.node_mask, nodes) and edge_set(ours) == edges, thresholds
    r, c = graph_scores(g)
    assert 0 < r < 1 and 0 < c < 1
    with pytest.raises(ValueError, match="node_threshold"):
        prune(g, 1.5, 0.9)


def test_the_explanation_score_and_its_measured_chance_level(setup):
    model, tcs, tokens = setup
    with torch.no_grad():  # the tokens a temperature-0 step commits: above the mean logit, so a share exists
        targets = model(tokens[None]).logits[0, POSITIONS, 1:].argmax(-1).add(1).tolist()
    g, fz = build_graph(model, tcs, tokens, POSITIONS, targets)
    assert (g.target_values > 0).all()
    effects = total_effects(g)
    base = run_step(model, tcs, fz, POSITIONS, targets)
    mean_effect = effects.mean(0)[:g.n_features]
    best = mean_effect.argsort(descending=True)[:3].tolist()
    worst = mean_effect.argsort()[:3].tolist()
    good = score_explanation(model, tcs, fz, g, effects, best, base, draws=12)
    bad = score_explanation(model, tcs, fz, g, effects, worst, base, draws=12)
    assert good.explanation.drop > 0 > bad.explanation.drop
    assert good.explanation.carried > bad.explanation.carried and good.explanation.score > bad.explanation.score
    values = g.target_values.tolist()
    for s in (good, bad):
        assert len(s.random) == 12
        for c in [s.explanation, s.most_active, *s.random]:  # every set scored by the same formula
            assert c.carried == pytest.approx(carried(c.check, values))
            shares = [-d / v for d, v in zip(c.check.measured, values) if v > 0]  # measured drop / value, per token
            assert c.carried_raw == pytest.approx(sum(shares) / len(shares))
            assert c.carried == pytest.approx(sum(min(1, max(0, x)) for x in shares) / len(shares))
            assert c.agreement == pytest.approx(mean_agreement(c.check))
            assert c.score == pytest.approx(10 * c.carried * c.agreement)
        d = s.as_dict()
        assert d["percentile"] == pytest.approx(percentile(s.explanation.score, s.random_scores()))
    # the noise floor reaches every set alike: below a floor larger than every change and value, every set's
    # agreement is 1 and no token has a share to carry (the controls never keep float32's floor)
    blind = score_explanation(model, tcs, fz, g, effects, best, base, draws=12, floor=1e6)
    for c in [blind.explanation, blind.most_active, *blind.random]:
        assert c.agreement == 1.0 and c.carried is None and c.score is None
        assert d["random"]["mean"] == pytest.approx(sum(s.random_scores()) / 12, abs=1e-4)
        assert min(s.random_scores()) - 1e-4 <= d["random"]["p95"] <= max(s.random_scores()) + 1e-4  # rounded
    assert good.as_dict()["percentile"] > 50 > bad.as_dict()["percentile"]
    # random citations are drawn the same way: as many per layer, active at the step, none of the cited ones
    layer_of = lambda nodes: sorted(int(g.feature_nodes[i, 0]) for i in nodes)  # noqa: E731
    for c in good.random:
        assert layer_of(c.check.nodes) == layer_of(best) and not set(c.check.nodes) & set(best)
        assert all(float(g.activations[i]) > 0 for i in c.check.nodes)
    active = most_active(g, best)
    assert layer_of(active) == layer_of(best)
    for i in active:  # the most active of its layer
        same = g.feature_nodes[:, 0] == g.feature_nodes[i, 0]
        assert float(g.activations[i]) >= sorted(g.activations[same].tolist())[-sum(
            int(g.feature_nodes[j, 0]) == int(g.feature_nodes[i, 0]) for j in best)]
    assert percentile(2.0, [1.0, 3.0]) == percentile(2.0, [2.0, 2.0]) == 50 and percentile(1.0, []) is None
    assert percentile(2.0, [1.0, 2.0, 3.0, 0.0]) == 62.5 and percentile(5.0, [1.0]) == 100
    assert agreement(1.0, 1.0) == 1 and agreement(1.0, -1.0) == 0 and agreement(3.0, 1.0) == 0.5
    assert agreement(2.0, 0.0) == 0 and agreement(0.0, 0.0) == 1 and agreement(2e-9, -2e-9) == 1  # noise floor
    # every feature of a layer cited: no random set of the same size exists, so no chance level (not NaN)
    layer0 = (g.feature_nodes[:, 0] == 0).nonzero()[:, 0].tolist()
    none = score_explanation(model, tcs, fz, g, effects, layer0, base, draws=3)
    assert none.random == [] and none.as_dict()["percentile"] is None and none.as_dict()["random"]["mean"] is None
    check = ablate(model, tcs, fz, g, effects, [best[:1]], base)[0]
    assert len(check.measured) == 3 and all(isinstance(x, bool) for x in check.flipped)
    assert carried(check, [-1.0, 0.0, -2.0]) is None  # no token with a positive value: no share to carry


def test_layers_cite_both_directions_and_the_path_says_what_it_carries(setup):
    model, tcs, tokens = setup
    g, _ = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    mean_effect = total_effects(g).mean(0)
    cited = cite(g, mean_effect, 4)
    for lay in (0, 2):
        in_layer = mean_effect[:g.n_features][g.feature_nodes[:, 0] == lay]
        assert len(cited[lay]["for"]) == min(4, int((in_layer > 0).sum()))
        assert len(cited[lay]["against"]) == min(4, int((in_layer < 0).sum())) > 0
        assert all(mean_effect[i] > 0 for i in cited[lay]["for"])
        assert all(mean_effect[i] < 0 for i in cited[lay]["against"])
        assert float(mean_effect[cited[lay]["against"][0]]) == float(in_layer.min())
    assert cited[1] == {"for": [], "against": []}  # no transcoder
    res = analyse_step(model, tcs, tokens, POSITIONS, TARGETS, StepSettings(features_per_layer=2, random_draws=4,
                                                                            node_threshold=1.0, edge_threshold=1.0))
    g, path = res.graph, res.path
    assert g.kind(path[0]) in (TOKEN, MASK) and g.kind(path[1]) == FEATURE and g.kind(path[-1]) == TARGET
    assert all(g.where(a)[0] is None or g.where(a)[0] < g.where(b)[0] for a, b in zip(path[1:], path[2:]))
    # what the path carries: its first edge, then each later edge per unit of its source
    expected = float(g.adjacency[path[1], path[0]])
    for src, dst in zip(path[1:], path[2:]):
        expected *= float(g.adjacency[dst, src]) / float(g.activations[src])
    assert res.path_value == pytest.approx(expected) and path_value(g, path[:1]) is None
    singles = res.single_ablations
    pred = [x for c in res.checks.values() for x in c.predicted]
    real = [x for c in res.checks.values() for x in c.measured]
    assert singles["n"] == len(pred) == 3 * len(res.checks)
    assert singles["pearson_graph_model"] == pytest.approx(float(torch.corrcoef(torch.tensor([pred, real]))[0, 1]),
                                                           abs=1e-4)


def test_steering_sets_values_in_the_model_and_in_the_replacement_model(setup):
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    base = run_step(model, tcs, fz, POSITIONS, TARGETS).logp
    layer, pos, f = g.feature_nodes[0].tolist()
    same = {(layer, pos, f): float(g.activations[0])}  # set to its own value: nothing changes
    for replacement in (False, True):
        torch.testing.assert_close(run_step(model, tcs, fz, POSITIONS, TARGETS, same, replacement).logp, base,
                                   atol=1e-5, rtol=1e-5)
    inactive = next(x for x in range(128) if not (fz.idx[0][2] == x).any())
    steered = run_step(model, tcs, fz, POSITIONS, TARGETS, {(0, 2, inactive): 3.0}).logp
    delta = torch.zeros_like(fz.embed)
    delta[2] = 3.0 * tcs[0].W_dec[inactive]  # the reference: add the decoder row by hand
    handle = model.blocks[0].mlp.register_forward_hook(lambda m, a, out: out + delta)
    try:
        with torch.no_grad():
            logits = model(tokens[None]).logits[0, POSITIONS]
    finally:
        handle.remove()
    logits[:, 0] = float("-inf")
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(TARGETS)[:, None])[:, 0]
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=1e-5)
    # batched settings give the same numbers as one at a time
    many = run_step_settings(model, tcs, fz, POSITIONS, TARGETS, [{}, same, {(0, 2, inactive): 3.0}],
                             batch_size=2).logp
    torch.testing.assert_close(many, torch.stack([base, base, steered]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer 1 has no transcoder"):
        run_step(model, tcs, fz, POSITIONS, TARGETS, {(1, 2, 3): 1.0})


def test_interventions_asked_for_on_the_command_line(setup):
    model, tcs, tokens = setup
    assert parse_changes("2_17_5=0, 0_3_1=2.5x") == [Change(2, 17, 5, 0.0, False), Change(0, 3, 1, 2.5, True)]
    for bad in ("2_17=0", "a_b_c=1", "2_17_5", "2_17_5=x"):
        with pytest.raises(ValueError, match="--intervene"):
            parse_changes(bad)
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    effects = total_effects(g)
    base = run_step(model, tcs, fz, POSITIONS, TARGETS)
    layer, pos, f = g.feature_nodes[3].tolist()
    asked = intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 0.0, False)], base)
    check = ablate(model, tcs, fz, g, effects, [[3]], base)[0]
    assert asked["measured_dvalue"] == pytest.approx(check.measured, abs=1e-5)
    assert asked["measured_dlogp"] == pytest.approx(check.measured_logp, abs=1e-5)
    assert asked["predicted_dvalue"] == pytest.approx(check.predicted, abs=1e-5)
    doubled = intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 2.0, True)], base)
    assert doubled["predicted_dvalue"] == pytest.approx([-x for x in check.predicted], abs=1e-5)  # +a vs −a
    assert doubled["changes"] == [f"{layer}_{f}_{pos}={2 * float(g.activations[3]):.4g}"]
    with pytest.raises(ValueError, match="no transcoder at layer 1"):
        intervene(model, tcs, fz, g, effects, [Change(1, 0, 0, 1.0, False)], base)
    with pytest.raises(ValueError, match="more than once"):
        intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 0.0, False)] * 2, base)


def test_unsorted_positions_and_a_set_across_layers(setup):
    """Targets in any order get their own rows; a change is a shift by (new − recorded value): naming a
    later feature at its recorded value beside an earlier ablation leaves it where that ablation moved it,
    in both modes (a clamp would pin it back)."""
    model, tcs, tokens = setup
    positions, targets = [7, 4, 5], [2, 11, 13]
    g, fz = build_graph(model, tcs, tokens, positions, targets)
    base = run_step(model, tcs, fz, positions, targets).logp
    sorted_g, _ = build_graph(model, tcs, tokens, sorted(positions), [11, 13, 2])
    torch.testing.assert_close(base, sorted_g.logprobs[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, g.logprobs, atol=1e-5, rtol=1e-5)
    effects = total_effects(g)
    first = int(effects[:, :g.n_features][:, g.feature_nodes[:, 0] == 0].abs().sum(0).argmax())
    later = [i for i in range(g.n_features) if g.feature_nodes[i, 0] == 2]
    last = max(later, key=lambda i: float(g.adjacency[i, first].abs()))  # the layer-2 feature it moves most
    (l0, p0, f0), (l2, p2, f2) = g.feature_nodes[first].tolist(), g.feature_nodes[last].tolist()
    alone = {(l0, p0, f0): 0.0}
    both = {(l0, p0, f0): 0.0, (l2, p2, f2): float(g.activations[last])}  # a shift of 0 for the later one
    for replacement in (False, True):
        a = run_step(model, tcs, fz, positions, targets, alone, replacement).logp
        b = run_step(model, tcs, fz, positions, targets, both, replacement).logp
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert (a - base).abs().max() > 1e-4  # the earlier ablation does move the targets
