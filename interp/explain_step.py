"""Explaining one denoising step: which features drove the committed tokens, per-layer and total
descriptions, the explainer's two 1–10 ratings, and the grounded numbers beside them.

With the `tokens` explainer the descriptions are composed deterministically from the feature
descriptions and the two ratings are null (unavailable), never invented.
"""
from __future__ import annotations

import re
import statistics

from interp.attribution import LayerAttribution

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


def top_features(att: LayerAttribution, n: int) -> list[tuple[int, float, float]]:
    """(feature, attribution, activation) of the n features with the largest positive attribution."""
    values, idx = att.features.topk(min(n, len(att.features)))
    return [(int(f), float(v), float(att.activations[f])) for f, v in zip(idx, values) if v > 0]


def layer_prompt(layer: int, committed: str, cited: list[dict]) -> str:
    lines = "".join(f"{i + 1}. {c['description']} ({c['share']:.0%})\n" for i, c in enumerate(cited))
    return (f'A language model filled in "{committed}". In its layer {layer}, these features pushed for it most '
            f"(share of the layer's push):\n{lines}Summarise in one short phrase what this layer contributed.")


def total_prompt(committed: str, context: str, layer_texts: list[str]) -> str:
    lines = "".join(f"layer {i}: {t}\n" for i, t in enumerate(layer_texts))
    return (f'A language model read "{context}" and filled in "{committed}". What each of its layers contributed:\n'
            f"{lines}In one sentence, explain how the model arrived at its output.")


def short(description: str, limit: int = 80) -> str:
    """The head of a description (before its first ';'), at most `limit` characters."""
    head = description.split(";")[0].strip()
    return head if len(head) <= limit else head[:limit - 1].rstrip() + "…"


def compose_layer(cited: list[dict], n: int = 3) -> str:
    """The deterministic per-layer description: the strongest cited features, shortened, with shares."""
    if not cited:
        return "no feature pushed for the committed tokens"
    return "; ".join(f"{short(c['description'])} ({c['share']:.0%})" for c in cited[:n])


def compose_total(layer_texts: list[str], pushes: list[float], committed: str) -> str:
    order = sorted(range(len(pushes)), key=lambda i: -pushes[i])
    lead = ", ".join(f"layer {i} ({pushes[i] / max(1e-12, sum(pushes)):.0%})" for i in order[:2] if pushes[i] > 0)
    strongest = layer_texts[order[0]].split("; ")[0] if layer_texts else ""
    return f'"{committed}" was pushed mostly by {lead or "no layer"}; strongest feature: {strongest}'


def grounded(atts: list[dict[int, LayerAttribution]], cited_by_layer: dict[int, list[dict]],
             descriptions: dict[tuple[int, int], dict], probs: list[float]) -> dict:
    """Shares of |attribution| carried by described features, undescribed features and error terms;
    the mean held-out detection score of the cited features; the committed tokens' probabilities."""
    described = undescribed = error = other = 0.0
    for per_layer in atts:
        for layer, att in per_layer.items():
            mags = att.features.abs()
            known = sum(float(mags[f]) for (lay, f) in descriptions if lay == layer and f < len(mags))
            described += known
            undescribed += max(0.0, float(mags.sum()) - known)  # rounding can leave a tiny negative
            error += abs(att.error)
            other += abs(att.other)
    total = described + undescribed + error + other or 1.0
    aurocs = [c["detection_auroc"] for cs in cited_by_layer.values() for c in cs
              if c.get("detection_auroc") is not None]
    return {"described_feature_share": described / total, "undescribed_feature_share": undescribed / total,
            "error_share": error / total, "bias_share": other / total,
            "mean_detection_auroc_of_cited": statistics.fmean(aurocs) if aurocs else None,
            "committed_token_probs": [round(p, 4) for p in probs]}
