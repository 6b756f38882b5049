"""The attribution graph on small random models (every code path: a skip connection, a layer without a
transcoder, [MASK] inputs, several targets), checked against references: the real model, autograd,
and ablations in the frozen and in the real model."""
import pytest
import torch

from interp.graph import (
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
from interp.interventions import (
    Change,
    ablate,
    agreement,
    faithfulness,
    intervene,
    parse_changes,
    run_step,
    run_steps,
)
from interp.replacement import _heads, _merge, freeze, linear_forward, target_cotangents
from interp.step_analysis import StepSettings, analyse_step, layer_parts, mi_score
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


def test_parts_add_up_to_the_whole(setup):
    model, tcs, tokens = setup
    g, _ = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    parts = layer_parts(g)
    for t, whole in enumerate(parts["whole"]):
        total = parts["inputs"]["tokens"][t] + parts["inputs"]["masks"][t] + sum(
            sum(p[k][t] for k in ("features", "error", "bias")) for p in parts["layers"].values())
        assert abs(total - whole) < 1e-4 * max(1.0, abs(whole)), (total, whole)
    # an active feature's direct inputs, plus its biases, are its activation
    rows = g.adjacency[:g.n_features].sum(1) + g.bias_inputs[:g.n_features].sum(1) + g.encoder_bias
    torch.testing.assert_close(rows, g.activations, atol=1e-4, rtol=1e-4)
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
    base, _ = run_step(model, tcs, fz, POSITIONS, TARGETS)
    eps, pred, real = 0.02, [], []
    for i in range(g.n_features):
        layer, pos, f = g.feature_nodes[i].tolist()
        slot = int(((fz.idx[layer][pos] == f) & (fz.acts[layer][pos] > 0)).nonzero()[0, 0])
        factor = torch.ones_like(fz.acts[layer])
        factor[pos, slot] = 0
        r = linear_forward(model, tcs, fz, {layer: factor})
        frozen = ((r - fz.residual)[POSITIONS] * grads).sum(-1)
        torch.testing.assert_close(frozen, -effects[:, i], atol=1e-5, rtol=1e-4)
        small, _ = run_step(model, tcs, fz, POSITIONS, TARGETS, {(layer, pos, f): (1 - eps) * float(g.activations[i])})
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


def test_faithfulness_and_the_measured_score(setup):
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    effects = total_effects(g)
    base, top = run_step(model, tcs, fz, POSITIONS, TARGETS)
    best = effects.mean(0)[:g.n_features].argsort(descending=True)[:3].tolist()
    worst = effects.mean(0)[:g.n_features].argsort()[:3].tolist()
    good = faithfulness(model, tcs, fz, g, effects, best, base, top, draws=10)
    bad = faithfulness(model, tcs, fz, g, effects, worst, base, top, draws=10)
    assert good.cited_drop > 0 > bad.cited_drop and good.specificity > 0.5 > bad.specificity
    assert len(good.random_drops) == 10 and good.as_dict()["specificity_chance"] == 0.5
    per_token = [agreement(m, p) for m, p in zip(good.cited.measured, good.cited.predicted)]
    assert good.score == pytest.approx(good.specificity * sum(per_token) / len(per_token))
    assert agreement(1.0, 1.0) == 1 and agreement(1.0, -1.0) == 0 and agreement(3.0, 1.0) == 0.5
    assert agreement(2.0, 0.0) == 0 and agreement(0.0, 0.0) == 1 and agreement(2e-9, -2e-9) == 1  # noise floor
    # every feature of a layer cited: no random set of the same size exists, so no specificity (not NaN)
    layer0 = (g.feature_nodes[:, 0] == 0).nonzero()[:, 0].tolist()
    none = faithfulness(model, tcs, fz, g, effects, layer0, base, top, draws=3)
    assert none.specificity is None and none.score is None and none.as_dict()["faithfulness"] is None
    assert mi_score(0.9, 0.9, None) is None
    check = ablate(model, tcs, fz, g, effects, [best[:1]], base, top)[0]
    assert len(check.measured) == 3 and all(isinstance(x, bool) for x in check.flipped)
    assert mi_score(1.0, 1.0, 1.0) == 10 and mi_score(0.5, 0.5, 0.0) == 0 and mi_score(float("nan"), 1, 1) is None
    res = analyse_step(model, tcs, tokens, POSITIONS, TARGETS, StepSettings(features_per_layer=2, random_draws=4,
                                                                            node_threshold=1.0, edge_threshold=1.0))
    g, path = res["graph"], res["path"]
    assert g.kind(path[0]) in (TOKEN, MASK) and g.kind(path[1]) == FEATURE and g.kind(path[-1]) == TARGET
    assert all(g.where(a)[0] is None or g.where(a)[0] < g.where(b)[0] for a, b in zip(path[1:], path[2:]))
    assert res["scores"]["mi_score"] == pytest.approx(mi_score(res["scores"]["replacement"],
                                                               res["scores"]["completeness"],
                                                               res["scores"]["faithfulness"]))


def test_steering_sets_values_in_the_model_and_in_the_replacement_model(setup):
    model, tcs, tokens = setup
    g, fz = build_graph(model, tcs, tokens, POSITIONS, TARGETS)
    base, _ = run_step(model, tcs, fz, POSITIONS, TARGETS)
    layer, pos, f = g.feature_nodes[0].tolist()
    same = {(layer, pos, f): float(g.activations[0])}  # set to its own value: nothing changes
    for replacement in (False, True):
        torch.testing.assert_close(run_step(model, tcs, fz, POSITIONS, TARGETS, same, replacement)[0], base,
                                   atol=1e-5, rtol=1e-5)
    inactive = next(x for x in range(128) if not (fz.idx[0][2] == x).any())
    steered, _ = run_step(model, tcs, fz, POSITIONS, TARGETS, {(0, 2, inactive): 3.0})
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
    many, _ = run_steps(model, tcs, fz, POSITIONS, TARGETS, [{}, same, {(0, 2, inactive): 3.0}], batch_size=2)
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
    base, top = run_step(model, tcs, fz, POSITIONS, TARGETS)
    layer, pos, f = g.feature_nodes[3].tolist()
    asked = intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 0.0, False)], base, top)
    check = ablate(model, tcs, fz, g, effects, [[3]], base, top)[0]
    assert asked["measured_dlogp"] == pytest.approx(check.measured, abs=1e-5)
    assert asked["predicted_dlogp"] == pytest.approx(check.predicted, abs=1e-5)
    doubled = intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 2.0, True)], base, top)
    assert doubled["predicted_dlogp"] == pytest.approx([-x for x in check.predicted], abs=1e-5)  # +a vs −a
    assert doubled["changes"] == [f"{layer}_{f}_{pos}={2 * float(g.activations[3]):.4g}"]
    with pytest.raises(ValueError, match="no transcoder at layer 1"):
        intervene(model, tcs, fz, g, effects, [Change(1, 0, 0, 1.0, False)], base, top)
    with pytest.raises(ValueError, match="more than once"):
        intervene(model, tcs, fz, g, effects, [Change(layer, f, pos, 0.0, False)] * 2, base, top)


def test_unsorted_positions_and_a_set_across_layers(setup):
    """Targets in any order get their own rows; a change is a shift by (new − recorded value): naming a
    later feature at its recorded value beside an earlier ablation leaves it where that ablation moved it,
    in both modes (a clamp would pin it back)."""
    model, tcs, tokens = setup
    positions, targets = [7, 4, 5], [2, 11, 13]
    g, fz = build_graph(model, tcs, tokens, positions, targets)
    base, _ = run_step(model, tcs, fz, positions, targets)
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
        a, _ = run_step(model, tcs, fz, positions, targets, alone, replacement)
        b, _ = run_step(model, tcs, fz, positions, targets, both, replacement)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert (a - base).abs().max() > 1e-4  # the earlier ablation does move the targets
