"""The explanation's score, and its chance level measured on citations that explain nothing.

An explanation of a step cites, per layer, the features that push the committed tokens' values up
(and those that push them down). Its score asks two things of the top cited "for" features, ablated
together in the real model:

    carried   = the measured drop of each committed token's value (its demeaned pre-cap logit) as a share
                of that value, averaged over the tokens whose value is positive (reported as measured; the
                score clips each token's share to [0, 1], since features can carry more than a whole that
                other parts push down)
    agreement = how close the graph's predicted change of the value came to the measured one
                (interp/explanations/interventions.py, agreement), averaged over the tokens
    score     = 10 × clipped carried × agreement

The measured log-prob drop (nats) is reported beside it: a share of log p's lift above uniform would
clip at 1 on most easy steps (ablating ten features of a small model pushes log p below uniform).
The same procedure on citations chosen without the graph gives the measured chance level: random
features drawn the same way (as many per layer, active at the same step; `draws` sets), and, harder, the
most active features (as many per layer). Printed: the score, the random draws' mean and 95th percentile,
and the explanation's percentile among them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from interp.descriptions.scoring import pearson
from interp.explanations.graph import Graph
from interp.explanations.interventions import NOISE, Check, StepRun, ablate, agreement, random_like


def shares(check: Check, values: list[float], floor: float = NOISE) -> list[float]:
    """Each token's measured value drop as a share of its value (tokens whose value exceeds `floor` only: a
    value within the noise floor would make the share a ratio of rounding)."""
    return [-d / v for d, v in zip(check.measured, values) if v > floor]


def carried(check: Check, values: list[float], clip: bool = True, floor: float = NOISE) -> float | None:
    """The mean share (each clipped to [0, 1] with `clip`); None when no token's value exceeds `floor`."""
    xs = [min(1.0, max(0.0, x)) if clip else x for x in shares(check, values, floor)]
    return sum(xs) / len(xs) if xs else None


def mean_agreement(check: Check, floor: float = NOISE) -> float:
    """Per committed token, then averaged: errors of opposite sign on two tokens cannot cancel."""
    pairs = list(zip(check.measured, check.predicted))
    return sum(agreement(m, p, floor) for m, p in pairs) / len(pairs) if pairs else 1.0


@dataclass
class CitedSet:
    """One set of features ablated together, and its score."""
    name: str  # "explanation", "random", "most active"
    check: Check
    carried: float | None  # clipped per token: what the score uses
    carried_raw: float | None  # as measured
    agreement: float

    @property
    def score(self) -> float | None:
        return None if self.carried is None else 10 * self.carried * self.agreement

    @property
    def drop(self) -> float:
        """The measured log-prob drop (nats), averaged over the committed tokens."""
        return -sum(self.check.measured_logp) / max(1, len(self.check.measured_logp))

    def as_dict(self) -> dict:
        return {"n_ablated": len(self.check.nodes), "score": _round(self.score), "carried": _round(self.carried),
                "carried_measured": _round(self.carried_raw),
                "agreement": round(self.agreement, 4), "logp_drop": round(self.drop, 5),
                "predicted_dvalue": [round(x, 5) for x in self.check.predicted],
                "measured_dvalue": [round(x, 5) for x in self.check.measured]}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def most_active(g: Graph, nodes: list[int]) -> list[int]:
    """As many features per layer as `nodes` has, the most active ones of the step (the harder control:
    chosen by activation, not by effect on the token)."""
    chosen = []
    for layer in sorted({int(g.feature_nodes[i, 0]) for i in nodes}):
        want = sum(int(g.feature_nodes[i, 0]) == layer for i in nodes)
        pool = (g.feature_nodes[:, 0] == layer).nonzero()[:, 0]
        chosen += pool[g.activations[pool].argsort(descending=True)[:want]].tolist()
    return chosen


def percentile(x: float, dist: list[float]) -> float | None:
    """The share of `dist` below x, ties counting one half (50 = a typical draw)."""
    if not dist:
        return None
    return 100 * sum(1.0 if d < x else 0.5 if d == x else 0.0 for d in dist) / len(dist)


@dataclass
class ExplanationScore:
    explanation: CitedSet
    random: list[CitedSet]  # random citations drawn the same way; empty when no layer has enough others
    most_active: CitedSet

    def random_scores(self) -> list[float]:
        return [c.score for c in self.random if c.score is not None]

    def as_dict(self) -> dict:
        scores = sorted(self.random_scores())
        p95 = scores[min(len(scores) - 1, math.ceil(0.95 * len(scores)) - 1)] if scores else None
        mine = self.explanation.score
        return {"explanation": self.explanation.as_dict(), "most_active": self.most_active.as_dict(),
                "random": {"draws": len(scores), "mean": _round(sum(scores) / len(scores)) if scores else None,
                           "p95": _round(p95), "scores": [round(x, 4) for x in scores],
                           "logp_drop_mean": round(sum(c.drop for c in self.random) / len(self.random), 5)
                           if self.random else None},
                "percentile": None if mine is None else percentile(mine, scores)}


def score_explanation(model, transcoders, fz, g: Graph, effects: torch.Tensor, nodes: list[int], base: StepRun,
                      draws: int, seed: int = 0, floor: float = NOISE) -> ExplanationScore:
    """Ablate the cited `nodes` together, then `draws` random sets drawn like them and the most active set
    like them (one batch of forward passes): each set's score, by the same formula (agreement above the
    noise `floor`)."""
    rng = random.Random(seed)
    randoms = [o for o in (random_like(g, nodes, rng) for _ in range(draws)) if o]
    active = most_active(g, nodes)
    checks = ablate(model, transcoders, fz, g, effects, [nodes, active] + randoms, base, replacement=False)
    values = g.target_values.tolist()
    sets = [CitedSet(name, c, carried(c, values, floor=floor), carried(c, values, clip=False, floor=floor),
                     mean_agreement(c, floor))
            for name, c in zip(["explanation", "most active"] + ["random"] * len(randoms), checks)]
    return ExplanationScore(sets[0], sets[2:], sets[1])


def single_ablation_agreement(checks: list[Check], floor: float = NOISE) -> dict:
    """Over the single ablations of the cited features (every committed token a point): how the graph's
    predicted Δ value compares with the model's and the replacement model's measured ones. graph vs
    replacement isolates frozen attention and norms; replacement vs model, the transcoders' misses. Signs are
    compared where the change or its prediction exceeds the noise `floor`."""
    pred = [x for c in checks for x in c.predicted]
    real = [x for c in checks for x in c.measured]
    repl = [x for c in checks for x in c.replacement]
    signs = [(p > 0) == (m > 0) for p, m in zip(pred, real) if abs(m) > floor or abs(p) > floor]

    def r(x: list[float], y: list[float]) -> float | None:  # two points always correlate ±1: say nothing
        return _round(pearson(x, y)) if len(x) >= 3 else None
    return {"n": len(pred), "n_signed": len(signs), "pearson_graph_model": r(pred, real),
            "pearson_graph_replacement": r(pred, repl), "pearson_replacement_model": r(repl, real),
            "sign_agreement": _round(sum(signs) / len(signs)) if signs else None}
