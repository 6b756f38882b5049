"""Interventions that check an attribution graph against the model.

An intervention sets features to new values at given positions (0 ablates; a multiple of the value, or
a value for a feature that was not active, steers) and re-runs the denoising step through the real
model: at each intervened layer the MLP's real output gets (new − recorded value) × the feature's
decoder row at that position, and everything downstream (attention, norms, later MLPs) is the model's
own. For a set spanning layers each feature is shifted by that amount, so a later one also keeps what
the earlier changes did to it: the same semantics as the graph's prediction, −Σ total effects. So the
measured change is the model's, and the graph's prediction (its total effects, computed with attention
and norms frozen) is checked against it, not against itself. The same intervention in the replacement
model (every MLP its transcoder plus the frozen error, attention and norms live) separates the two
ways a prediction can miss: frozen attention and norms (graph vs replacement model) and the
transcoders' imperfect imitation of the MLPs (replacement model vs model).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch

from interp.graph import Graph
from interp.replacement import FrozenStep
from model.diffusion import DiffusionLM
from model.sampler import exclude_bos
from model.transcoder import Transcoder

Setting = dict[tuple[int, int, int], float]  # (layer, position, feature) → new activation


def current_value(fz: FrozenStep, layer: int, pos: int, feature: int) -> float:
    hit = (fz.idx[layer][pos] == feature) & (fz.acts[layer][pos] > 0)
    return float(fz.acts[layer][pos][hit].sum())


def _check_layers(settings: list[Setting], transcoders: dict[int, Transcoder]) -> None:
    for setting in settings:
        for layer, _, _ in setting:
            if layer not in transcoders:
                raise ValueError(f"layer {layer} has no transcoder, so its features cannot be set")


def _model_hook(transcoders: dict[int, Transcoder], fz: FrozenStep, layer: int, settings: list[Setting]):
    """The real MLP output plus, in batch row b, (new − old) × decoder row at each position settings[b] changes."""
    delta = fz.embed.new_zeros(len(settings), *fz.embed.shape)
    for b, setting in enumerate(settings):
        for (lay, pos, feature), value in setting.items():
            if lay == layer:
                delta[b, pos] += (value - current_value(fz, layer, pos, feature)) * transcoders[layer].W_dec[feature]
    return lambda mod, args, out: out + delta.to(out.dtype)


def _replacement_hook(tc: Transcoder | None, fz: FrozenStep, layer: int, settings: list[Setting]):
    """The transcoder (its TopK recomputed on the live input) plus the frozen error, each changed feature
    shifted by (new − recorded value) as in the model's mode; a layer without a transcoder keeps its
    recorded output."""
    def hook(mod, args, out):
        B, T, D = out.shape
        if tc is None:
            return fz.error[layer].expand(B, T, D).to(out.dtype)
        m = args[0].reshape(B * T, D).float()
        enc = tc.encode(m)
        acts, extra = enc.acts.clone(), torch.zeros_like(m)
        for b, setting in enumerate(settings):
            for (lay, pos, feature), value in setting.items():
                if lay != layer:
                    continue
                row = b * T + pos
                shift = value - current_value(fz, layer, pos, feature)
                hit = enc.indices[row] == feature
                if hit.any():
                    acts[row][hit] += shift
                else:
                    extra[row] += shift * tc.W_dec[feature]
        y = tc.decode(acts, enc.indices, m) + extra
        return (y.view(B, T, D) + fz.error[layer]).to(out.dtype)
    return hook


@contextlib.contextmanager
def patched(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, settings: list[Setting],
            replacement: bool = False):
    """Inside: batch row b of a forward pass runs with intervention settings[b], on the model's own MLPs
    (default) or on the replacement model (transcoders plus frozen errors at every layer; attention and
    norms live in both)."""
    _check_layers(settings, transcoders)
    if replacement:
        hooks = {layer: _replacement_hook(transcoders.get(layer), fz, layer, settings)
                 for layer in range(fz.num_layers)}
    else:
        touched = {lay for setting in settings for lay, _, _ in setting}
        hooks = {layer: _model_hook(transcoders, fz, layer, settings) for layer in touched}
    handles = [model.blocks[layer].mlp.register_forward_hook(h) for layer, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_steps(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, positions: list[int],
              targets: list[int], settings: list[Setting], replacement: bool = False, batch_size: int = 64
              ) -> tuple[torch.Tensor, list[list[int]]]:
    """Re-run the step once per setting, `batch_size` at a time: the targets' log-probabilities (S, n) and
    the model's top token at each position (what a temperature-0 step would commit there)."""
    select = torch.zeros_like(fz.tokens, dtype=torch.bool)
    select[positions] = True  # the vocabulary projection only where it is read
    back = torch.tensor(positions).argsort().argsort()  # rows come in ascending position order
    wanted = torch.tensor(targets, device=fz.tokens.device)[None, :, None]
    logps, tops = [], []
    for i in range(0, len(settings), batch_size):
        part = settings[i:i + batch_size]
        B = len(part)
        with patched(model, transcoders, fz, part, replacement):
            logits = model(fz.tokens.expand(B, -1), select=select.expand(B, -1)).logits.float()
        logits = logits.view(B, len(positions), -1)[:, back]
        logp = torch.log_softmax(exclude_bos(logits, model.cfg.bos_id), -1)  # as the sampler saw them
        logps.append(logp.gather(-1, wanted.expand(B, -1, -1))[..., 0])
        tops += logp.argmax(-1).tolist()
    return torch.cat(logps), tops


def run_step(model, transcoders, fz: FrozenStep, positions: list[int], targets: list[int],
             setting: Setting | None = None, replacement: bool = False) -> tuple[torch.Tensor, list[int]]:
    """One setting (none: the step as it ran): the targets' log-probabilities (n,) and top tokens."""
    logp, tops = run_steps(model, transcoders, fz, positions, targets, [setting or {}], replacement)
    return logp[0], tops[0]


def node_key(g: Graph, i: int) -> tuple[int, int, int]:
    layer, pos, feature = g.feature_nodes[i].tolist()
    return layer, pos, feature


@dataclass
class Check:
    """One intervention: the graph's predicted and the model's measured change of the targets' log-probability."""
    nodes: list[int]
    predicted: list[float]  # per target (first order, frozen attention and norms)
    measured: list[float]  # per target, in the model
    replacement: list[float]  # per target, in the replacement model (transcoders + frozen errors)
    flipped: list[bool]  # per target: the model's most likely token there changed (what temperature 0 commits)

    def as_dict(self) -> dict:
        return {"predicted_dlogp": [round(x, 5) for x in self.predicted],
                "measured_dlogp": [round(x, 5) for x in self.measured],
                "replacement_dlogp": [round(x, 5) for x in self.replacement], "top_token_changes": self.flipped}


def ablate(model, transcoders, fz: FrozenStep, g: Graph, effects: torch.Tensor, node_sets: list[list[int]],
           base: torch.Tensor, base_top: list[int], replacement: bool = True) -> list[Check]:
    """Ablate each set of feature nodes (a set's nodes together), all sets batched; predicted Δ log p =
    −Σ total effects (d log p = d value to first order). Measured in the model, and (with `replacement`)
    in the replacement model, whose base is the model's own (its errors make it exact)."""
    settings = [{node_key(g, i): 0.0 for i in nodes} for nodes in node_sets]
    logp, tops = run_steps(model, transcoders, fz, g.positions, g.targets, settings)
    in_replacement = (run_steps(model, transcoders, fz, g.positions, g.targets, settings, replacement=True)[0]
                      - base).tolist() if replacement else [[] for _ in node_sets]
    checks = []
    for k, nodes in enumerate(node_sets):
        predicted = (-effects[:, nodes].sum(1)).tolist()
        flipped = [a != b for a, b in zip(tops[k], base_top)]
        checks.append(Check(nodes, predicted, (logp[k] - base).tolist(), in_replacement[k], flipped))
    return checks


def random_like(g: Graph, nodes: list[int], rng: random.Random) -> list[int] | None:
    """As many random active feature nodes per layer as `nodes` has (none of `nodes` itself); None when a
    layer has too few others for a draw of the same size (a smaller draw would flatter the cited set)."""
    chosen = []
    for layer in sorted({int(g.feature_nodes[i, 0]) for i in nodes}):
        want = sum(int(g.feature_nodes[i, 0]) == layer for i in nodes)
        pool = [i for i in (g.feature_nodes[:, 0] == layer).nonzero()[:, 0].tolist() if i not in nodes]
        if len(pool) < want:
            return None
        chosen += rng.sample(pool, want)
    return chosen


NOISE = 1e-5  # nats: below this a log-probability change is float32 noise


def agreement(measured: float, predicted: float) -> float:
    """1 − |measured − predicted| / (|measured| + |predicted|): 1 when the graph predicted the change
    exactly, 0.5 when off by a factor of 3, 0 for opposite signs or a change it did not see at all; 1
    when both are below the noise floor."""
    size = abs(measured) + abs(predicted)
    return 1.0 - abs(measured - predicted) / size if size > NOISE else 1.0


@dataclass
class Faithfulness:
    cited: Check  # the top-n features ablated together
    random_drops: list[float]  # the mean log-prob drop for each random draw of n features of the same layers
    specificity: float | None  # the share of random draws whose drop the cited drop exceeds (ties ½; chance ½);
    # None when no layer had enough other active features for a draw of the same size

    @property
    def cited_drop(self) -> float:
        return -sum(self.cited.measured) / max(1, len(self.cited.measured))

    @property
    def predicted_drop(self) -> float:
        return -sum(self.cited.predicted) / max(1, len(self.cited.predicted))

    @property
    def agreement(self) -> float:
        """How well the graph predicted the cited features' joint ablation: `agreement` per committed token,
        averaged (so errors of opposite sign on two tokens cannot cancel)."""
        pairs = list(zip(self.cited.measured, self.cited.predicted))
        return sum(agreement(m, p) for m, p in pairs) / len(pairs) if pairs else 1.0

    @property
    def score(self) -> float | None:
        """Faithfulness = specificity × agreement: the cited features matter more than random ones, and as
        much as the graph says."""
        return None if self.specificity is None else self.specificity * self.agreement

    def as_dict(self) -> dict:
        r = self.random_drops
        return {"n_ablated": len(self.cited.nodes), "cited_drop": round(self.cited_drop, 5),
                "cited_predicted_drop": round(self.predicted_drop, 5),
                "random_drop_mean": round(sum(r) / len(r), 5) if r else None, "random_draws": len(r),
                "specificity": None if self.specificity is None else round(self.specificity, 4),
                "specificity_chance": 0.5, "agreement": round(self.agreement, 4),
                "faithfulness": None if self.score is None else round(self.score, 4),
                "top_token_changes": self.cited.flipped}


def faithfulness(model, transcoders, fz, g: Graph, effects: torch.Tensor, nodes: list[int], base: torch.Tensor,
                 base_top: list[int], draws: int, seed: int = 0) -> Faithfulness:
    """Ablate the cited nodes, then `draws` random sets like them: how often the cited drop is larger
    (specificity), and how close the graph's predicted drop came (agreement)."""
    rng = random.Random(seed)
    others = [o for o in (random_like(g, nodes, rng) for _ in range(draws)) if o]
    cited, *randoms = ablate(model, transcoders, fz, g, effects, [nodes] + others, base, base_top, replacement=False)
    drops = [-sum(c.measured) / len(c.measured) for c in randoms]
    mine = -sum(cited.measured) / max(1, len(cited.measured))
    score = sum(1.0 if mine > d else 0.5 if mine == d else 0.0 for d in drops) / len(drops) if drops else None
    return Faithfulness(cited, drops, score)


@dataclass
class Change:
    """One feature change asked for on the command line: `{layer}_{feature}_{position}=value`, the node id
    circuit-tracer's viewer shows; the value is an activation, or `Nx` for N × the current one."""
    layer: int
    feature: int
    position: int
    value: float
    relative: bool

    def target(self, fz: FrozenStep) -> float:
        return self.value * current_value(fz, self.layer, self.position, self.feature) if self.relative else self.value


def parse_changes(spec: str) -> list[Change]:
    """'1_329_9=0,0_44_3=2x' → changes (ValueError naming the bad part)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            node, value = part.split("=")
            layer, feature, position = (int(x) for x in node.split("_"))
            relative = value.strip().endswith("x")
            out.append(Change(layer, feature, position, float(value.strip().rstrip("x")), relative))
        except ValueError:
            raise ValueError(f"--intervene: {part!r} is not layer_feature_position=value (value: a number, or "
                             "Nx for N times the current activation)") from None
    return out


def intervene(model, transcoders, fz: FrozenStep, g: Graph, effects: torch.Tensor, changes: list[Change],
              base: torch.Tensor, base_top: list[int]) -> dict:
    """Apply the changes together: the measured Δ log p in the model, whether the committed tokens change,
    and the graph's first-order prediction (only when every changed feature is a node of the graph)."""
    keys = [(c.layer, c.feature, c.position) for c in changes]
    if len(set(keys)) < len(keys):
        raise ValueError("--intervene names the same layer_feature_position more than once")
    for c in changes:
        if c.layer not in transcoders or not 0 <= c.position < len(fz.tokens):
            raise ValueError(f"--intervene {c.layer}_{c.feature}_{c.position}: no transcoder at layer {c.layer}, or "
                             f"position {c.position} is outside the step's {len(fz.tokens)} positions")
    setting = {(c.layer, c.position, c.feature): c.target(fz) for c in changes}
    logp, top = run_step(model, transcoders, fz, g.positions, g.targets, setting)
    keys = {tuple(k): i for i, k in enumerate(g.feature_nodes.tolist())}
    nodes = [keys.get((c.layer, c.position, c.feature)) for c in changes]
    predicted = None
    if all(i is not None for i in nodes):
        scale = torch.tensor([(setting[(c.layer, c.position, c.feature)] - float(g.activations[i])) /
                              float(g.activations[i]) for c, i in zip(changes, nodes)], device=effects.device)
        predicted = [round(x, 5) for x in (effects[:, nodes] * scale).sum(1).tolist()]
    return {"changes": [f"{c.layer}_{c.feature}_{c.position}={setting[(c.layer, c.position, c.feature)]:.4g}"
                        for c in changes],
            "predicted_dlogp": predicted, "measured_dlogp": [round(x, 5) for x in (logp - base).tolist()],
            "top_token_changes": [a != b for a, b in zip(top, base_top)]}
