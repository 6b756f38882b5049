"""What one denoising step's attribution graph says, in numbers: per-layer parts that partition the
committed tokens' values (logit units: each token's demeaned pre-cap logit), the features that push each
layer's part for and against the tokens, the strongest path and how much of the value it carries, the
intervention checks, and the explanation's score beside its measured chance level.

    explanation score = 10 × carried × agreement   (interp/explanations/score.py)

carried: the share of the committed tokens' value that the top cited features carry, measured by ablating
them together in the real model; agreement: how close the graph's predicted change came to the
measured one. Its chance level is measured: the same score of random citations drawn the same way, and
of the most active features. replacement and completeness (circuit-tracer's, interp/explanations/graph.py) describe
the graph, not the explanation, and are reported apart as the graph's quality.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interp.explanations.graph import MASK, Graph, Pruned, build_graph, graph_scores, prune, total_effects
from interp.explanations.interventions import Check, StepRun, ablate, intervene, noise_floor, run_step
from interp.explanations.score import ExplanationScore, score_explanation, single_ablation_agreement


@dataclass
class StepSettings:
    features_per_layer: int = 10  # cited per layer and direction (for and against the committed tokens)
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    faithfulness_features: int = 10  # top cited "for" features ablated together for the explanation's score
    random_draws: int = 20  # random citations scored the same way: the chance level
    graph_batch_size: int = 256
    seed: int = 0
    changes: list = field(default_factory=list)  # interventions.Change: the user's --intervene, at every step


EFFECT_FLOOR = 0.01  # logit units: a cited feature whose total effect is smaller is flagged as negligible
MI_FORMULA = ("10 × carried × agreement: carried = the drop of each committed token's demeaned logit when the top "
              "cited features are ablated together in the model, as a share of that logit (clipped to [0, 1]); "
              "agreement = how close the graph's predicted change came to the measured one; chance level = the "
              "same score of random citations (same number per layer, active at the step) and of the most active "
              "features (interp/explanations/score.py)")


@dataclass
class LayerPart:
    """One layer's direct part of each target's value (logit units, one number per target), by source."""

    features: list[float]
    error: list[float]
    bias: list[float]


@dataclass
class Parts:
    """Each target's value (`whole`) split by where its direct inputs come from: the input tokens, the
    [MASK] inputs, and per layer its features, error and bias. They add up to `whole` (tested)."""

    tokens: list[float]
    masks: list[float]
    layers: dict[int, LayerPart]  # every layer of the model, in order
    whole: list[float]


def layer_parts(g: Graph) -> Parts:
    """Each target's value split by where its direct inputs come from: per layer (features, error, bias)
    and the inputs (tokens, [MASK]s). The parts of each target add up to its value (tested)."""
    A = g.adjacency[g.target_start:]  # (n, N)
    layers_of = g.feature_nodes[:, 0]
    is_mask = torch.tensor([g.kind(i) == MASK for i in range(g.embed_start, g.target_start)], device=A.device)
    embeds = A[:, g.embed_start:g.target_start]
    layers = {lay: LayerPart(
        features=A[:, :g.n_features][:, layers_of == lay].sum(1).tolist(),
        error=A[:, g.error_start + lay * g.n_pos:g.error_start + (lay + 1) * g.n_pos].sum(1).tolist(),
        bias=g.bias_inputs[g.target_start:, lay].tolist()) for lay in range(g.num_layers)}
    return Parts(tokens=embeds[:, ~is_mask].sum(1).tolist(), masks=embeds[:, is_mask].sum(1).tolist(), layers=layers,
                 whole=g.target_values.tolist())


def strongest_path(g: Graph, pr: Pruned) -> list[int]:
    """The input → feature(s) → target path in the pruned graph whose product of row-normalised |edge|
    weights is largest (a longest-path search on the DAG). It passes through at least one feature: an
    input's direct edge to a target (a [MASK] input's prior, say) is in the parts, not in the path."""
    nodes = pr.nodes
    A = g.adjacency[nodes][:, nodes].abs() * pr.edges
    W = A / A.sum(1, keepdim=True).clamp_min(1e-30)
    K = len(nodes)
    best = torch.zeros(K, device=W.device)  # best product from this node to any target
    nxt = torch.full((K,), -1, dtype=torch.long, device=W.device)
    best[nodes >= g.target_start] = 1.0
    feature = (nodes < g.n_features) & pr.node_mask[nodes]
    # features in decreasing layer order: each one's successors are done before it
    for k in sorted(feature.nonzero()[:, 0].tolist(), key=lambda k: -int(g.feature_nodes[nodes[k], 0])):
        cand = W[:, k] * best
        j = int(cand.argmax())
        if cand[j] > 0:
            best[k], nxt[k] = cand[j], j
    inputs = ((nodes >= g.embed_start) & (nodes < g.target_start)).nonzero()[:, 0]
    feats = feature.nonzero()[:, 0]
    if not len(feats) or not len(inputs):
        return []
    via = W[feats][:, inputs] * best[feats, None]  # input → first feature → … → target
    if via.max() <= 0:
        return []
    f, i = divmod(int(via.argmax()), len(inputs))
    path = [int(inputs[i]), int(feats[f])]
    while nxt[path[-1]] >= 0:
        path.append(int(nxt[path[-1]]))
    return [int(nodes[k]) for k in path]


def path_value(g: Graph, path: list[int]) -> float | None:
    """What the path carries into its target (logit units): the first edge's direct effect, scaled along the
    path by each later edge's effect per unit of its source (exact in the frozen model)."""
    if len(path) < 2:
        return None
    values = g.values()
    carried = float(g.adjacency[path[1], path[0]])
    for src, dst in zip(path[1:], path[2:]):
        carried *= float(g.adjacency[dst, src] / values[src])
    return carried


def cite(g: Graph, mean_effect: torch.Tensor, n: int) -> dict[int, dict[str, list[int]]]:
    """Per layer, the n features with the largest positive and the n with the most negative total effect."""
    cited = {}
    for lay in range(g.num_layers):
        idx = (g.feature_nodes[:, 0] == lay).nonzero()[:, 0]
        vals = mean_effect[idx]
        up, down = vals.argsort(descending=True)[:n], vals.argsort()[:n]
        cited[lay] = {"for": [int(idx[o]) for o in up if vals[o] > 0],
                      "against": [int(idx[o]) for o in down if vals[o] < 0]}
    return cited


@dataclass
class StepAnalysis:
    """The graph of one step and everything measured on it (`analyse_step`); the dicts are JSON-ready."""

    graph: Graph
    pruned: Pruned
    effects: torch.Tensor  # (targets, nodes): each node's total effect on each target's value
    cited: dict[int, dict[str, list[int]]]  # per layer, the cited feature nodes "for" and "against" the tokens
    checks: dict[int, Check]  # each cited node's single ablation
    score: ExplanationScore | None  # None when no cited feature pushes for the tokens
    single_ablations: dict  # how the single ablations' predictions compare (score.single_ablation_agreement)
    graph_quality: dict  # the graph's replacement and completeness scores
    parts: Parts
    path: list[int]  # the strongest path's nodes, input to target (empty: none)
    path_value: float | None  # what it carries into its target
    base: StepRun  # the step as it ran
    intervention: dict | None  # the --intervene changes' measured and predicted effects (None: none asked)
    noise_floor: float  # the smallest change of a target value the model resolves (interventions.noise_floor)


def analyse_step(model, transcoders, tokens: torch.Tensor, positions: list[int], targets: list[int],
                 st: StepSettings) -> StepAnalysis:
    """The graph of one step and everything measured on it."""
    g, fz = build_graph(model, transcoders, tokens, positions, targets, st.graph_batch_size)
    pr = prune(g, st.node_threshold, st.edge_threshold)
    effects = total_effects(g)  # (n, N)
    mean_effect = effects.mean(0)
    replacement, completeness = graph_scores(g, pr.influence)
    base = run_step(model, transcoders, fz, positions, targets)
    floor = noise_floor(model, transcoders, fz, positions)
    cited = cite(g, mean_effect, st.features_per_layer)
    singles = [i for sides in cited.values() for side in sides.values() for i in side]
    checks = dict(zip(singles, ablate(model, transcoders, fz, g, effects, [[i] for i in singles], base)
                      if singles else []))
    pushing = sorted((i for sides in cited.values() for i in sides["for"]), key=lambda i: -float(mean_effect[i]))
    top = pushing[:st.faithfulness_features]
    score = (score_explanation(model, transcoders, fz, g, effects, top, base, st.random_draws, st.seed, floor)
             if top else None)
    asked = intervene(model, transcoders, fz, g, effects, st.changes, base) if st.changes else None
    path = strongest_path(g, pr)
    return StepAnalysis(graph=g, pruned=pr, effects=effects, cited=cited, checks=checks, score=score,
                        single_ablations=single_ablation_agreement(list(checks.values()), floor),
                        graph_quality={"replacement": replacement, "completeness": completeness},
                        parts=layer_parts(g), path=path, path_value=path_value(g, path), base=base,
                        intervention=asked, noise_floor=floor)
