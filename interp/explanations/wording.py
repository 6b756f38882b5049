"""Explaining one denoising step from its attribution graph: per-layer and total descriptions, the
explainer's two 1–10 ratings (labelled as its ratings), and the measured mechanistic-interpretability
score beside them (interp/explanations/step_analysis.py).

With the `tokens` explainer the descriptions are composed deterministically from the graph and the
feature descriptions, and the explainer's ratings are null (unavailable), never invented.
"""
from __future__ import annotations

import re

OUTPUT_RUBRIC = ("Rate the following text continuation from 1 to 10. 1 = gibberish; 4 = words but no sense; "
                 "7 = fluent with small errors; 10 = fluent, coherent and factually right.\n"
                 'Text: "{text}"\nAnswer with one number from 1 to 10.')
INTERPRETATION_RUBRIC = ("Rate from 1 to 10 how well the explanation accounts for how a language model produced "
                         "its output. 1 = unrelated to the output; 4 = mentions related topics only; 7 = explains most "
                         "of it; 10 = explains it fully and specifically.\n"
                         'Output: "{text}"\nExplanation: "{explanation}"\nAnswer with one number from 1 to 10.')


def parse_rating(raw: str | None) -> int | None:
    """The first whole number 1–10 in the answer; anything else is null (never a default)."""
    if not raw:
        return None
    for m in re.finditer(r"(?<![\d.])(\d{1,2})(?![\d.])", raw):
        value = int(m.group(1))
        if 1 <= value <= 10:
            return value
    return None


def short(description: str, limit: int = 80) -> str:
    """The head of a description (before its first ';'), at most `limit` characters."""
    head = description.split(";")[0].strip()
    return head if len(head) <= limit else head[:limit - 1].rstrip() + "…"


def _flags(c: dict) -> str:
    out = []
    if c.get("generic"):
        out.append(f"generic: fires on {c['frequency']:.0%} of tokens")
    if c.get("negligible"):
        out.append("negligible")
    return f" [{', '.join(out)}]" if out else ""


def _cited(c: dict, limit: int = 80) -> str:
    """`#feature@position description (total effect) [flags]`: a feature is a node per position, so the same
    feature can push for the token at one position and against it at another."""
    return f"#{c['feature']}@{c['position']} {short(c['description'], limit)} ({c['total_effect']:+.2f}){_flags(c)}"


def layer_prompt(layer: int, committed: str, info: dict) -> str:
    def lines(side):
        return "".join(f"- {_cited(c, 200)}\n" for c in info[side]) or "- none\n"
    return (f'A language model filled in "{committed}". In its layer {layer}, these features pushed for it most '
            f"(effect on the token's logit):\n{lines('for')}and these pushed against it:\n{lines('against')}"
            f"The layer's net effect was {info['part']:+.2f} (features {info['features']:+.2f}, reconstruction error "
            f"{info['error']:+.2f}, bias {info['bias']:+.2f}). Summarise in one short phrase what this layer "
            "contributed.")


def total_prompt(committed: str, context: str, layer_texts: list[str], path: str, numbers: str) -> str:
    """`numbers`: the composed total description (value, log p, what the path carries, the largest parts)."""
    lines = "".join(f"layer {i}: {t}\n" for i, t in enumerate(layer_texts))
    return (f'A language model read "{context}" and filled in "{committed}". What each of its layers contributed:\n'
            f"{lines}Its strongest path: {path}.\nIn numbers: {numbers}.\n"
            "In one sentence, explain how the model arrived at its output.")


def compose_layer(info: dict, n: int = 3) -> str:
    """The deterministic per-layer description: the layer's direct part of the target value (logit units)
    split into features, error and bias (the decoder bias and the attention's value bias), then its strongest
    cited features for and against the committed tokens, with their total effects; generic and negligible ones
    flagged."""
    head = (f"{info['part']:+.2f} logit ({info['share']:+.0%} of the gross flow) = features {info['features']:+.2f}"
            f" + error {info['error']:+.2f} + bias {info['bias']:+.2f}")
    sides = [f"{side}: " + "; ".join(_cited(c) for c in info[side][:n]) for side in ("for", "against") if info[side]]
    return head + ("; " + "; ".join(sides) if sides else "; no active feature pushed either way")


def compose_total(committed: str, target: dict, path: str, path_value: float | None, path_share: float | None,
                  parts: list[tuple[str, float]]) -> str:
    """The deterministic total description: the target value (the mean over the committed tokens when there
    are several) beside log p, the strongest path with what it carries into its own token (`path_share`: a
    share of that token's value), and the largest direct parts."""
    lead = ", ".join(f"{name} {share:+.0%}" for name, share in sorted(parts, key=lambda p: -abs(p[1]))[:3])
    carried = ("" if path_value is None else f", carrying {path_value:+.2f} logit"
               + ("" if path_share is None else f" ({path_share:+.0%} of its token's)"))
    several = len(target["per_token"]) > 1
    value = (f"{'mean ' if several else ''}demeaned logit {target['value']:+.2f}, {'mean ' if several else ''}"
             f"log p {target['logprob']:.2f} nats ({target['lift']:+.2f} above uniform)")
    return (f'"{committed}": {value}; strongest path {path or "(none kept)"}{carried}; '
            f"largest direct parts (share of the gross flow): {lead}")


def where(percentile: float | None, draws: int) -> str:
    """Where a score falls among `draws` random ones, at the resolution the draws allow."""
    if percentile is None:
        return "unranked"
    if percentile == 100:
        return f"above all {draws}"
    if percentile == 0:
        return f"below all {draws}"
    return f"at the {percentile:.0f}th percentile"


def chance_text(sc: dict) -> str:
    """The explanation's measured chance level in words, from a step's headline scores."""
    if sc["random_mean"] is None:
        return "no random citation of the same size (too few other active features)"
    return (f"random citations {sc['random_mean']:.1f} on average, 95th percentile {sc['random_p95']:.1f} "
            f"({sc['random_draws']} draws; this explanation {where(sc['percentile'], sc['random_draws'])})")
