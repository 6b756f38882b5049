"""Explaining one denoising step from its attribution graph: per-layer and total descriptions, the
explainer's two 1–10 ratings (labelled as its ratings), and the measured mechanistic-interpretability
score beside them (interp/step_analysis.py).

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


def layer_prompt(layer: int, committed: str, info: dict) -> str:
    lines = "".join(f"{i + 1}. {c['description']} (effect {c['total_effect']:+.2f})\n"
                    for i, c in enumerate(info["cited"]))
    return (f'A language model filled in "{committed}". In its layer {layer}, these features pushed for it most '
            f"(effect on the token's log-probability):\n{lines}Summarise in one short phrase what this layer "
            "contributed.")


def total_prompt(committed: str, context: str, layer_texts: list[str], path: str) -> str:
    lines = "".join(f"layer {i}: {t}\n" for i, t in enumerate(layer_texts))
    return (f'A language model read "{context}" and filled in "{committed}". What each of its layers contributed:\n'
            f"{lines}Its strongest path: {path}.\nIn one sentence, explain how the model arrived at its output.")


def compose_layer(info: dict, n: int = 3) -> str:
    """The deterministic per-layer description: the layer's direct part of the target value (and its share
    of the gross flow), then its strongest cited features, shortened, with their total effects."""
    head = f"{info['part']:+.2f} nats ({info['share']:+.0%} of the flow)"
    if not info["cited"]:
        return f"{head}; no feature pushed for the committed tokens"
    return head + ": " + "; ".join(f"{short(c['description'])} ({c['total_effect']:+.2f})" for c in info["cited"][:n])


def compose_total(committed: str, path: str, parts: list[tuple[str, float]]) -> str:
    lead = ", ".join(f"{name} {share:+.0%}" for name, share in sorted(parts, key=lambda p: -abs(p[1]))[:3])
    return f'"{committed}": strongest path {path or "(none kept)"}; largest direct parts: {lead}'
