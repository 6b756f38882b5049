"""The attribution graph of one denoising step, built on the local replacement model (replacement.py).

Nodes, in this order (circuit-tracer's): active features (layer, position, feature), error terms
(layer, position), input embeddings (position; a [MASK] input is a node of its own kind), and the
targets: the tokens committed at this step. The adjacency A[target, source] holds direct effects.
A target's value is the committed token's demeaned logit before any soft cap, in logit units
(interp/explanations/replacement.py, target_cotangents): the model's own number, which the direct effects into it plus
the bias terms (decoder biases, attention value biases) add up to exactly; an active feature's direct inputs plus its
biases add up to its activation. The token's real log-probability (nats, over the tokens a step can commit) and its
lift above the uniform choice are kept beside it.

Influence, pruning and the two graph scores follow circuit-tracer's definitions (row-normalised |A|,
influence = w·(Â + Â² + …), cumulative thresholds 0.8 for nodes and 0.98 for edges); total effects
(signed, exact in the frozen model) give the first-order change of each target when a node changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from interp.explanations.replacement import (
    FrozenStep,
    backward,
    encoder_cotangents,
    freeze,
    log_probs,
    target_cotangents,
)
from model.diffusion import DiffusionLM
from model.transcoder import Transcoder

NODE_THRESHOLD = 0.8  # circuit-tracer's defaults
EDGE_THRESHOLD = 0.98
FEATURE, ERROR, TOKEN, MASK, TARGET = "feature", "error", "token", "mask", "target"


@dataclass
class Graph:
    adjacency: torch.Tensor  # (N, N) direct effects, rows = targets of the edge, columns = sources
    feature_nodes: torch.Tensor  # (F, 3) layer, position, feature
    activations: torch.Tensor  # (F,)
    num_layers: int
    tokens: list[int]  # the step's input (T)
    mask_id: int
    positions: list[int]  # the committed tokens' positions
    targets: list[int]  # the committed tokens
    target_values: torch.Tensor  # (n,) each target's value: its demeaned pre-cap logit (g · r, logit units)
    logprobs: torch.Tensor  # (n,) each target's log-probability (nats) over the tokens a step can commit
    bias_inputs: torch.Tensor  # (N, L) each node's direct input from each layer's bias terms: the decoder bias
    # and the attention's value bias, written at every position (0 for inputs)
    encoder_bias: torch.Tensor  # (F,) each feature's encoder bias
    n_choices: int = 0  # tokens a step can commit (n_vocab less never_predicted()): uniform log p = −ln n_choices
    weights: torch.Tensor = field(init=False)  # (n,) the targets' weights in influence: equal, summing to 1

    def __post_init__(self) -> None:
        n = len(self.targets)
        self.weights = torch.full((n,), 1.0 / max(1, n), device=self.adjacency.device)

    @property
    def lift(self) -> torch.Tensor:
        """(n,) nats: each target's log-probability above the uniform choice, log p + ln n_choices."""
        return self.logprobs + math.log(self.n_choices)

    @property
    def n_features(self) -> int:
        return len(self.feature_nodes)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def embed_start(self) -> int:
        return self.n_features + self.num_layers * self.n_pos

    @property
    def target_start(self) -> int:
        return self.embed_start + self.n_pos

    def kind(self, i: int) -> str:
        if i < self.error_start:
            return FEATURE
        if i < self.embed_start:
            return ERROR
        if i < self.target_start:
            return MASK if self.tokens[i - self.embed_start] == self.mask_id else TOKEN
        return TARGET

    def where(self, i: int) -> tuple[int | None, int]:
        """(layer, position) of node i; layer None for inputs, num_layers for targets."""
        k = self.kind(i)
        if k == FEATURE:
            layer, pos, _ = self.feature_nodes[i].tolist()
            return layer, pos
        if k == ERROR:
            return divmod(i - self.error_start, self.n_pos)
        if k == TARGET:
            return self.num_layers, self.positions[i - self.target_start]
        return None, i - self.embed_start

    def values(self) -> torch.Tensor:
        """Each node's value as a source: a feature's activation, 1 for error terms and inputs (their edge
        is their whole vector's effect), and the target value for targets."""
        v = torch.ones(self.adjacency.shape[0], device=self.adjacency.device)
        v[:self.n_features] = self.activations
        v[self.target_start:] = self.target_values
        return v


@torch.no_grad()
def build_graph(model: DiffusionLM, transcoders: dict[int, Transcoder], tokens: torch.Tensor, positions: list[int],
                targets: list[int], batch_size: int = 256) -> tuple[Graph, FrozenStep]:
    """The full (unpruned) graph of one step: `tokens` (T,) is the model's input before the step,
    `positions`/`targets` the tokens it committed. Feature rows are computed `batch_size` at a time."""
    model.requires_grad_(False)
    fz = freeze(model, transcoders, tokens)
    L, T = fz.num_layers, len(tokens)
    active = [fz.acts[layer] > 0 for layer in range(L)]  # TopK can pick zeros: those are not active
    feat_nodes = torch.cat([torch.stack([torch.full_like(fz.idx[layer][a], layer), a.nonzero()[:, 0],
                                         fz.idx[layer][a]], 1) for layer, a in enumerate(active)])
    acts = torch.cat([fz.acts[layer][a] for layer, a in enumerate(active)])
    F_, n = len(feat_nodes), len(targets)
    N = F_ + L * T + T + n
    A = torch.zeros(N, N, device=tokens.device)
    B = torch.zeros(N, L, device=tokens.device)
    starts = [0]
    for a in active:
        starts.append(starts[-1] + int(a.sum()))

    def columns(d) -> torch.Tensor:  # (R, N - n): one batch of rows, in the node order
        feats = [d.features[layer][:, a] for layer, a in enumerate(active)]
        return torch.cat(feats + [e for e in d.errors] + [d.embed], 1)

    D = fz.embed.shape[1]
    for layer in range(L):
        tc = transcoders.get(layer)
        if tc is None:
            continue
        rows = torch.arange(starts[layer], starts[layer + 1], device=tokens.device)
        for chunk in rows.split(batch_size):
            _, pos, feat = feat_nodes[chunk].T
            g = fz.embed.new_zeros(len(chunk), T, D)
            g[torch.arange(len(chunk)), pos] = encoder_cotangents(tc, fz, layer, pos, feat)
            d = backward(model, transcoders, fz, g, layer)
            A[chunk, :N - n], B[chunk] = columns(d), torch.stack(d.biases, 1)
    grads, target_values = target_cotangents(model, fz, positions, targets)
    g = fz.embed.new_zeros(n, T, D)
    g[torch.arange(n), model.readout_rows(torch.tensor(positions, device=tokens.device))] = grads  # the rows read
    d = backward(model, transcoders, fz, g, L)
    A[N - n:, :N - n], B[N - n:] = columns(d), torch.stack(d.biases, 1)
    enc_bias = torch.cat([A.new_zeros(0)] + [transcoders[layer].encoder.bias[fz.idx[layer][a]]
                                             for layer, a in enumerate(active) if layer in transcoders])
    never = model.cfg.never_predicted()
    logprobs = log_probs(fz.logits[positions], never)
    logprobs = logprobs.gather(-1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0]
    graph = Graph(A, feat_nodes, acts, L, tokens.tolist(), model.cfg.mask_id, list(positions), list(targets),
                  target_values, logprobs, B, enc_bias, model.cfg.n_vocab - len(never))
    return graph, fz


# ---- influence, pruning and scores (circuit-tracer's definitions) ----

def normalized(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum to 1 (rows without inputs stay 0)."""
    mag = A.abs()
    return mag / mag.sum(1, keepdim=True).clamp_min(1e-10)


def propagate(M: torch.Tensor, w: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """w·(M + M² + …) for a nilpotent M (a DAG's adjacency): stops when the term vanishes."""
    term = w @ M
    total = term.clone()
    for _ in range(max_iter):
        if not term.any():
            return total
        term = term @ M
        total += term
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def target_weights(g: Graph) -> torch.Tensor:
    w = torch.zeros(g.adjacency.shape[0], device=g.adjacency.device)
    w[g.target_start:] = g.weights
    return w


def node_influence(g: Graph) -> torch.Tensor:
    return propagate(normalized(g.adjacency), target_weights(g))


def cumulative_cut(scores: torch.Tensor, keep: float, positive_only: bool = False) -> torch.Tensor:
    """The score at which the highest scores first reach the fraction `keep` of their total. With
    `positive_only`, zeros (most of an adjacency) are left out of the sort, so a zero never passes."""
    flat = scores.flatten()
    if positive_only:
        flat = flat[flat > 0]
        if not len(flat):
            return scores.new_tensor(float("inf"))
    ordered = flat.sort(descending=True).values
    if keep >= 1.0:  # everything: the smallest score (not wherever rounding lets the cumulative sum reach 1)
        return ordered[-1]
    frac = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return ordered[min(int(torch.searchsorted(frac, torch.tensor(keep, device=frac.device))), len(ordered) - 1)]


@dataclass
class Pruned:
    node_mask: torch.Tensor  # (N,) bool: the nodes of the pruned graph
    nodes: torch.Tensor  # (K,) the nodes that passed the node threshold; `edges` is indexed by position here
    edges: torch.Tensor  # (K, K) bool: the kept edges among them (rows: the edge's target)
    influence: torch.Tensor  # (N,) node influence on the targets (unpruned graph)

    def edge_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, source) graph indices of the kept edges."""
        d, s = self.edges.nonzero(as_tuple=True)
        return self.nodes[d], self.nodes[s]

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())


def prune(g: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD) -> Pruned:
    """Keep the nodes carrying `node_threshold` of the influence (inputs and targets always), then the edges
    carrying `edge_threshold` of the edge influence; drop features left without inputs or outputs. The edge
    stage works on the kept nodes' sub-matrix (the same numbers as circuit-tracer's zeroed full matrix)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"--{name} must lie in [0, 1], got {v}")
    influence = node_influence(g)
    keep = influence >= cumulative_cut(influence, node_threshold)
    keep[g.embed_start:] = True
    nodes = keep.nonzero()[:, 0]
    w = target_weights(g)[nodes]
    Ahat = normalized(g.adjacency[nodes][:, nodes])
    edge_scores = Ahat * (propagate(Ahat, w) + w)[:, None]
    edges = (edge_scores >= cumulative_cut(edge_scores, edge_threshold, positive_only=True)) & (edge_scores > 0)
    inner = nodes < g.embed_start  # features and errors need an output; features an input too
    feature = nodes < g.n_features
    alive = torch.ones_like(inner)
    while True:
        before = alive.clone()
        edges[~alive] = False
        edges[:, ~alive] = False
        alive &= ~inner | edges.any(0)
        alive &= ~feature | edges.any(1)
        if torch.equal(before, alive):
            mask = torch.zeros_like(keep)
            mask[nodes[alive]] = True
            return Pruned(mask, nodes, edges, influence)


def graph_scores(g: Graph, influence: torch.Tensor | None = None) -> tuple[float, float]:
    """circuit-tracer's replacement score (share of the inputs' influence on the targets that starts at an
    input node rather than an error node) and completeness score (influence-weighted share of every node's
    inputs that do not come from error nodes). `influence`: `node_influence(g)` when already computed
    (`prune` keeps it)."""
    w = target_weights(g)
    influence = node_influence(g) if influence is None else influence
    inputs = float(influence[g.embed_start:g.target_start].sum())
    errors = float(influence[g.error_start:g.embed_start].sum())
    replacement = inputs / max(inputs + errors, 1e-30)
    mag = g.adjacency.abs()  # the share of each row of normalized() that comes from error nodes:
    not_error = 1 - mag[:, g.error_start:g.embed_start].sum(1) / mag.sum(1).clamp_min(1e-10)
    weight = influence + w
    return replacement, float((not_error * weight).sum() / weight.sum())


def total_effects(g: Graph) -> torch.Tensor:
    """(n, N) signed: how much of each target's value flows from each node along all paths in the frozen
    model. Scaling node s by (1 + ε) changes target t's value by ε × effects[t, s] (exactly, while no
    feature switches on or off); the direct parts are the one-edge paths."""
    values = g.values()
    unit = g.adjacency / torch.where(values == 0, torch.ones_like(values), values)[None, :]
    n = len(g.targets)
    rows = torch.zeros(n, len(unit), device=unit.device)
    rows[torch.arange(n), g.target_start + torch.arange(n)] = 1.0  # one row per target, propagated together
    return propagate(unit, rows) * values
