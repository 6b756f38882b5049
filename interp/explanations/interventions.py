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
transcoders' imperfect imitation of the MLPs (replacement model vs model). A model held in bf16 is re-run
in bf16, its own numbers (the hooks cast their float32 writes to the MLP's dtype), so its measured changes
carry bf16's rounding, about 1% of the largest logit (tests/test_bf16_model.py).
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from core.files import UserError
from interp.explanations.graph import Graph
from interp.explanations.replacement import FrozenStep, committable, demean, head_logits, log_probs
from model.diffusion import DiffusionLM
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
    handles = [model.block(layer).mlp.register_forward_hook(h) for layer, h in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StepRun(NamedTuple):
    """A step re-run under interventions, one row per setting."""
    logp: torch.Tensor  # (S, n) nats: the targets' log-probabilities over the tokens a step can commit
    value: torch.Tensor  # (S, n) logit units: the targets' demeaned pre-cap logits (the graph's target values)
    top: list  # (S, n) the model's top token at each position (what a temperature-0 step commits); (n,) for one


@torch.no_grad()
def step_logits(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, positions: list[int],
                settings: list[Setting], replacement: bool = False) -> torch.Tensor:
    """(S, n, n_vocab) float32 pre-cap logits the model reads at `positions`, one forward of all `settings`."""
    rows = model.readout_rows(torch.tensor(positions, device=fz.tokens.device))  # where each prediction is read
    no_vocab = torch.zeros(0, dtype=torch.long, device=fz.tokens.device)  # the head only where it is read (below)
    with patched(model, transcoders, fz, settings, replacement):
        hidden = model(fz.tokens.expand(len(settings), -1), select=no_vocab).hidden
    return model.raw_logits(hidden[:, rows])


@torch.no_grad()
def run_step_settings(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, positions: list[int],
                      targets: list[int], settings: list[Setting], replacement: bool = False, batch_size: int = 64
                      ) -> StepRun:
    """Re-run the step once per setting, `batch_size` settings at a time (one forward each)."""
    never = model.cfg.never_predicted()
    wanted = torch.tensor(targets, device=fz.tokens.device)[None, :, None]
    logps, values, tops = [], [], []
    for i in range(0, len(settings), batch_size):
        part = settings[i:i + batch_size]
        B = len(part)
        z = step_logits(model, transcoders, fz, positions, part, replacement)  # (B, n, n_vocab)
        logp = log_probs(model.soft_cap(z), never)
        logps.append(logp.gather(-1, wanted.expand(B, -1, -1))[..., 0])
        values.append(demean(z, never).gather(-1, wanted.expand(B, -1, -1))[..., 0])
        tops += logp.argmax(-1).tolist()
    return StepRun(torch.cat(logps), torch.cat(values), tops)


def run_step(model, transcoders, fz: FrozenStep, positions: list[int], targets: list[int],
             setting: Setting | None = None, replacement: bool = False) -> StepRun:
    """One setting (none: the step as it ran): a StepRun whose rows are (n,) and (n,) top tokens."""
    run = run_step_settings(model, transcoders, fz, positions, targets, [setting or {}], replacement)
    return StepRun(run.logp[0], run.value[0], run.top[0])


def node_key(g: Graph, i: int) -> tuple[int, int, int]:
    layer, pos, feature = g.feature_nodes[i].tolist()
    return layer, pos, feature


@dataclass
class Check:
    """One intervention: the graph's predicted and the model's measured change of each target's value
    (its demeaned pre-cap logit, logit units), and the measured change of its log-probability (nats)."""
    nodes: list[int]
    predicted: list[float]  # per target: Δ value, first order with attention and norms frozen (−Σ total effects)
    measured: list[float]  # per target: Δ value in the model
    measured_logp: list[float]  # per target: Δ log p in the model (nats)
    replacement: list[float]  # per target: Δ value in the replacement model (transcoders + frozen errors)
    flipped: list[bool]  # per target: the model's most likely token there changed (what temperature 0 commits)

    def as_dict(self) -> dict:
        r5 = lambda xs: [round(x, 5) for x in xs]  # noqa: E731
        return {"predicted_dvalue": r5(self.predicted), "measured_dvalue": r5(self.measured),
                "measured_dlogp": r5(self.measured_logp), "replacement_dvalue": r5(self.replacement),
                "top_token_changes": self.flipped}


def ablate(model, transcoders, fz: FrozenStep, g: Graph, effects: torch.Tensor, node_sets: list[list[int]],
           base: StepRun, replacement: bool = True) -> list[Check]:
    """Ablate each set of feature nodes (a set's nodes together), all sets batched; predicted Δ value =
    −Σ total effects. Measured in the model, and (with `replacement`) in the replacement model, whose base
    is the model's own (its errors make it exact)."""
    settings = [{node_key(g, i): 0.0 for i in nodes} for nodes in node_sets]
    run = run_step_settings(model, transcoders, fz, g.positions, g.targets, settings)
    in_replacement = ((run_step_settings(model, transcoders, fz, g.positions, g.targets, settings,
                                         replacement=True).value - base.value).tolist()
                      if replacement else [[] for _ in node_sets])
    checks = []
    for k, nodes in enumerate(node_sets):
        predicted = (-effects[:, nodes].sum(1)).tolist()
        flipped = [a != b for a, b in zip(run.top[k], base.top)]
        checks.append(Check(nodes, predicted, (run.value[k] - base.value).tolist(),
                            (run.logp[k] - base.logp).tolist(), in_replacement[k], flipped))
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


NOISE = 1e-5  # below this a change of a target value (logit units) is float32 noise


@torch.no_grad()
def noise_floor(model: DiffusionLM, transcoders: dict[int, Transcoder], fz: FrozenStep, positions: list[int]) -> float:
    """The smallest change of a target value the model resolves: NOISE, or the model's own rounding where it is
    larger, measured at the step as it ran as the largest |demeaned pre-cap logit in the model − in the float32
    frozen step| over every token a step can commit at every position the step reads (a model held in bf16
    rounds its residual at every layer: about 1% of the logits). Over the whole vocabulary, not the few
    committed tokens only: their handful of values can miss the rounding's reach."""
    never = model.cfg.never_predicted()
    rows = model.readout_rows(torch.tensor(positions, device=fz.tokens.device))
    own = step_logits(model, transcoders, fz, positions, [{}])[0]
    frozen = head_logits(model, fz.residual[rows] * fz.final_inv[rows] * fz.final_gain)
    keep = committable(own.shape[-1], never, own.device)
    return max(NOISE, float((demean(own, never) - demean(frozen.to(own.device), never))[:, keep].abs().max()))


def agreement(measured: float, predicted: float, floor: float = NOISE) -> float:
    """1 − |measured − predicted| / (|measured| + |predicted|): 1 when the graph predicted the change
    exactly, 0.5 when off by a factor of 3, 0 for opposite signs or a change it did not see at all; 1
    when both together stay within the noise `floor` (`noise_floor`)."""
    size = abs(measured) + abs(predicted)
    return 1.0 - abs(measured - predicted) / size if size > floor else 1.0


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
    """'1_329_9=0,0_44_3=2x' → changes (ValueError naming the bad part): indices are whole numbers ≥ 0 and
    the value a finite number. Whether the nodes exist is `check_changes`'s business (it needs the run)."""
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
        if min(layer, feature, position) < 0:
            raise ValueError(f"--intervene: {part!r}: layer, feature and position are indices, 0 or more")
        if not math.isfinite(out[-1].value):
            raise ValueError(f"--intervene: {part!r}: the value must be a finite number")
    return out


def check_changes(changes: list[Change], transcoders: dict[int, Transcoder], length: int) -> None:
    """Every --intervene node against what the run has, before any work (UserError naming the node and the
    valid range): a layer with a loaded transcoder, a feature below its number of latents, a position
    below `length`, the shortest row a step reads (BOS at 0, the prompt, the continuation), and no node
    twice."""
    seen = set()
    for c in changes:
        node = f"{c.layer}_{c.feature}_{c.position}"
        if c.layer not in transcoders:
            raise UserError(f"--intervene {node}: no transcoder at layer {c.layer} (transcoders at layers "
                            f"{', '.join(map(str, sorted(transcoders)))})")
        n = transcoders[c.layer].cfg.num_latents
        if c.feature >= n:
            raise UserError(f"--intervene {node}: layer {c.layer}'s transcoder has features 0..{n - 1}")
        if c.position >= length:
            raise UserError(f"--intervene {node}: positions run 0..{length - 1} (BOS at 0, then the prompt and the "
                            f"continuation; the shortest prompt's row has {length} positions)")
        if (c.layer, c.feature, c.position) in seen:
            raise UserError(f"--intervene names {node} more than once")
        seen.add((c.layer, c.feature, c.position))


def intervene(model, transcoders, fz: FrozenStep, g: Graph, effects: torch.Tensor, changes: list[Change],
              base: StepRun) -> dict:
    """Apply the changes together: the measured Δ value (logit units) and Δ log p (nats) in the model, whether
    the committed tokens change, and the graph's first-order Δ value (only when every changed feature is a
    node of the graph)."""
    keys = [(c.layer, c.feature, c.position) for c in changes]
    if len(set(keys)) < len(keys):
        raise ValueError("--intervene names the same layer_feature_position more than once")
    for c in changes:
        if c.layer not in transcoders or not 0 <= c.position < len(fz.tokens):
            raise ValueError(f"--intervene {c.layer}_{c.feature}_{c.position}: no transcoder at layer {c.layer}, or "
                             f"position {c.position} is outside the step's {len(fz.tokens)} positions")
    setting = {(c.layer, c.position, c.feature): c.target(fz) for c in changes}
    run = run_step(model, transcoders, fz, g.positions, g.targets, setting)
    node_of = {tuple(k): i for i, k in enumerate(g.feature_nodes.tolist())}
    nodes = [node_of.get((c.layer, c.position, c.feature)) for c in changes]
    predicted = None
    if all(i is not None for i in nodes):
        scale = torch.tensor([(setting[(c.layer, c.position, c.feature)] - float(g.activations[i])) /
                              float(g.activations[i]) for c, i in zip(changes, nodes)], device=effects.device)
        predicted = [round(x, 5) for x in (effects[:, nodes] * scale).sum(1).tolist()]
    return {"changes": [f"{c.layer}_{c.feature}_{c.position}={setting[(c.layer, c.position, c.feature)]:.4g}"
                        for c in changes],
            "predicted_dvalue": predicted, "measured_dvalue": [round(x, 5) for x in (run.value - base.value).tolist()],
            "measured_dlogp": [round(x, 5) for x in (run.logp - base.logp).tolist()],
            "top_token_changes": [a != b for a, b in zip(run.top, base.top)]}
