"""What one denoising step's attribution graph says, in numbers: per-layer parts that partition the
committed tokens' values, the features on the strongest paths, the strongest path itself, the
intervention checks, and the measured mechanistic-interpretability score.

    MI score = 10 × (replacement × completeness × faithfulness)^(1/3)
    faithfulness = specificity × agreement

replacement and completeness as circuit-tracer defines them (interp/graph.py); specificity the share of
random same-layer feature sets whose joint ablation hurts the committed tokens less than ablating the
top cited features (chance 0.5); agreement how close the graph's predicted drop for that ablation came
to the measured one (interp/interventions.py). Any factor near 0 pulls the score to 0; with random
cited features (specificity 0.5) the score would be about 10 × (r × c × 0.5 × agreement)^(1/3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from interp.graph import MASK, Graph, Pruned, build_graph, graph_scores, prune, total_effects
from interp.interventions import ablate, faithfulness, intervene, run_step


@dataclass
class StepSettings:
    features_per_layer: int = 10
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    faithfulness_features: int = 10  # top cited features ablated together
    random_draws: int = 10  # random same-layer sets to compare with
    graph_batch_size: int = 256
    seed: int = 0
    changes: list = field(default_factory=list)  # interventions.Change: the user's --intervene, at every step


MI_FORMULA = ("10 × (replacement × completeness × faithfulness)^(1/3), faithfulness = specificity × agreement "
              "(interp/step_analysis.py)")


def mi_score(replacement: float, completeness: float, faith: float | None) -> float | None:
    if faith is None or any(math.isnan(x) for x in (replacement, completeness, faith)):
        return None
    return 10 * max(0.0, replacement * completeness * faith) ** (1 / 3)


def layer_parts(g: Graph) -> dict:
    """Each target's value split by where its direct inputs come from: per layer (features, error, bias)
    and the inputs (tokens, [MASK]s). The parts of each target add up to its value (tested)."""
    A = g.adjacency[g.target_start:]  # (n, N)
    n_layers, layers_of = g.num_layers, g.feature_nodes[:, 0]
    parts = {"inputs": {"tokens": [], "masks": []}, "layers": {str(lay): {"features": [], "error": [], "bias": []}
                                                               for lay in range(n_layers)}}
    is_mask = torch.tensor([g.kind(i) == MASK for i in range(g.embed_start, g.target_start)], device=A.device)
    embeds = A[:, g.embed_start:g.target_start]
    parts["inputs"]["masks"] = embeds[:, is_mask].sum(1).tolist()
    parts["inputs"]["tokens"] = embeds[:, ~is_mask].sum(1).tolist()
    for lay in range(n_layers):
        p = parts["layers"][str(lay)]
        p["features"] = A[:, :g.n_features][:, layers_of == lay].sum(1).tolist()
        p["error"] = A[:, g.error_start + lay * g.n_pos:g.error_start + (lay + 1) * g.n_pos].sum(1).tolist()
        p["bias"] = g.bias_inputs[g.target_start:, lay].tolist()
    parts["whole"] = g.target_values.tolist()
    return parts


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


def analyse_step(model, transcoders, tokens: torch.Tensor, positions: list[int], targets: list[int],
                 st: StepSettings) -> dict:
    """The graph of one step and everything measured on it (JSON-ready, plus the graph objects)."""
    g, fz = build_graph(model, transcoders, tokens, positions, targets, st.graph_batch_size)
    pr = prune(g, st.node_threshold, st.edge_threshold)
    effects = total_effects(g)  # (n, N)
    mean_effect = effects.mean(0)
    replacement, completeness = graph_scores(g, pr.influence)
    base, base_top = run_step(model, transcoders, fz, positions, targets)
    cited: dict[int, list[int]] = {}
    for lay in range(g.num_layers):
        idx = (g.feature_nodes[:, 0] == lay).nonzero()[:, 0]
        vals = mean_effect[idx]
        order = vals.argsort(descending=True)[:st.features_per_layer]
        cited[lay] = [int(idx[o]) for o in order if vals[o] > 0]
    singles = [i for nodes in cited.values() for i in nodes]
    checks = dict(zip(singles, ablate(model, transcoders, fz, g, effects, [[i] for i in singles], base, base_top)
                      if singles else []))
    everything = sorted((i for nodes in cited.values() for i in nodes), key=lambda i: -float(mean_effect[i]))
    top = everything[:st.faithfulness_features]
    faith = (faithfulness(model, transcoders, fz, g, effects, top, base, base_top, st.random_draws, st.seed)
             if top else None)
    score = mi_score(replacement, completeness, faith.score) if faith else None
    asked = intervene(model, transcoders, fz, g, effects, st.changes, base, base_top) if st.changes else None
    return {"graph": g, "pruned": pr, "effects": effects, "cited": cited, "checks": checks, "faith": faith,
            "scores": {"replacement": replacement, "completeness": completeness,
                       "specificity": faith.specificity if faith else None,
                       "agreement": faith.agreement if faith else None,
                       "faithfulness": faith.score if faith else None, "mi_score": score,
                       "mi_score_if_random": mi_score(replacement, completeness, 0.5 * faith.agreement)
                       if faith else None},
            "parts": layer_parts(g), "path": strongest_path(g, pr), "base_logprobs": base.tolist(),
            "intervention": asked}

