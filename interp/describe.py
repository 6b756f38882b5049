"""Writing descriptions of features: prompts for an LLM explainer, cleaning its answer, and the
model-free `tokens` baseline.

The explainer only ever sees the "explain" half of a feature's examples; the "score" half is kept for
scoring (interp/scoring.py).
"""
from __future__ import annotations

import re

MARK_OPEN, MARK_CLOSE = "<<", ">>"
QUESTION = "\nIn a few words, what do the marked words have in common? Answer with one short description."


def mark(example: dict, marked: set[int] | None = None) -> str:
    """The example's text with chosen tokens (default: every token where the feature is active) marked
    <<like this>>; a token's leading spaces stay outside the marks."""
    chosen = {i for i, a in enumerate(example["acts"]) if a > 0} if marked is None else marked
    out = []
    for i, piece in enumerate(example["pieces"]):
        if i in chosen and piece.strip():
            lead = piece[:len(piece) - len(piece.lstrip())]
            out.append(f"{lead}{MARK_OPEN}{piece.strip()}{MARK_CLOSE}")
        else:
            out.append(piece)
    return "".join(out).replace("\n", " ")


def plain(example: dict) -> str:
    return "".join(example["pieces"]).replace("\n", " ")


def explain_examples(record: dict, n: int) -> list[dict]:
    """Up to n examples for the explainer: the explain half of the top examples first, then of the
    examples spread over the activation range."""
    chosen = [e for e in record["top"] if e["split"] == "explain"]
    chosen += [e for e in record["quantile"] if e["split"] == "explain"]
    return chosen[:n]


def where_it_fires(stats: dict) -> str:
    frac = stats.get("masked_fraction")
    if frac is None:
        return ""
    if frac >= 0.5:
        return (f"This feature fires mostly ({frac:.0%}) on words that are hidden from the model (masked), "
                "so it reflects what the model predicts there rather than what it reads. ")
    return f"This feature fires mostly ({1 - frac:.0%}) on words the model can see. "


def explain_prompt(examples: list[dict], stats: dict) -> str:
    header = ("Below are excerpts of text. In each, the words where one hidden feature of a language model is "
              f"active are marked {MARK_OPEN}like this{MARK_CLOSE}. " + where_it_fires(stats) + "\n\n")
    body = "".join(f"Excerpt {i + 1}: {mark(e)}\n" for i, e in enumerate(examples))
    return header + body + QUESTION


def fit_prompt(examples: list[dict], stats: dict, count_tokens, max_tokens: int) -> tuple[str, list[dict]]:
    """The longest prompt that fits: whole examples are dropped from the end, never cut."""
    while True:
        prompt = explain_prompt(examples, stats)
        if count_tokens(prompt) <= max_tokens or len(examples) <= 1:
            return prompt, examples
        examples = examples[:-1]


def clean(raw: str, prompt: str) -> tuple[str | None, str | None]:
    """(description, None), or (None, why) when the answer is empty or repeats the prompt."""
    text = raw.strip().splitlines()[0].strip() if raw.strip() else ""
    text = re.sub(r"^(description|answer|the feature|feature)\s*[:\-]\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    if not any(ch.isalnum() for ch in text):
        return None, "empty"
    lowered = text.lower()
    if MARK_OPEN in text or lowered.startswith("excerpt") or (len(lowered) >= 12 and lowered in prompt.lower()):
        return None, "echo"
    return text[:300], None


def tokens_description(stats: dict, record: dict) -> str:
    """The model-free baseline: the most frequent activating tokens and one typical context."""
    tops = [(t, c) for t, c in stats["top_tokens"] if t.strip()][:4]
    total = max(1, stats["fire_count"])
    words = ", ".join(f'"{t.strip()}" ({c / total:.0%})' for t, c in tops) or "no particular token"
    where = "masked" if (stats.get("masked_fraction") or 0) >= 0.5 else "visible"
    desc = f"fires on {words}, mostly at {where} positions"
    if record["top"]:
        ex = record["top"][0]
        c = ex["center"]
        snippet = dict(ex, pieces=ex["pieces"][max(0, c - 4):c + 3], acts=[0.0] * len(ex["acts"][max(0, c - 4):c + 3]))
        snippet["acts"][min(c, 4)] = 1.0
        desc += f'; typical context: "{mark(snippet).strip()}"'
    return desc
