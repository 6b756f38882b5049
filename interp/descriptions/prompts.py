"""Writing descriptions of features: prompts for an LLM explainer, cleaning its answer, and the
model-free `tokens` baseline.

The explainer only ever sees the "explain" half of a feature's examples, and every input it gets, the
baseline's included, is built from that half alone; the "score" half is kept for scoring
(interp/descriptions/scoring.py). Examples are shown as the model saw them: a masked token is [MASK] (its hidden
text only where it is marked, see `mark`).
"""
from __future__ import annotations

import re
from collections import Counter

MARK_OPEN, MARK_CLOSE = "<<", ">>"
MASK_SHOWN = "[MASK]"
NEWLINE_SHOWN, SPACE_SHOWN = "⏎", "␣"  # a marked token that is only whitespace (no word characters: no keyword)
QUESTION = "\nIn a few words, what do the marked words have in common? Answer with one short description."


def mark(example: dict, marked: set[int] | None = None) -> str:
    """The example as the model saw it, with chosen tokens (default: every token where the feature is
    active) marked <<like this>>; a token's leading spaces stay outside the marks.

    A masked token reads " [MASK]" (its own spacing hidden too). Where a masked token is marked, the
    hidden text is given as <<[MASK=Paris]>>: a feature active at a masked position responds to what
    belongs there, which is the information the reader needs, and it is given at every marked position
    alike (right or wrong marks), so it cannot tell the two apart.

    Every chosen token shows a mark: a visible token that is only whitespace reads <<⏎>> (a line break)
    or <<␣>>, so a feature that fires on line breaks is not shown as no mark at all."""
    chosen = {i for i, a in enumerate(example["acts"]) if a > 0} if marked is None else marked
    hidden = set(example.get("masked_at", ()))
    out = []
    for i, piece in enumerate(example["pieces"]):
        if i in hidden:
            shown = f"[MASK={piece.strip()}]" if i in chosen and piece.strip() else MASK_SHOWN
            out.append(f" {MARK_OPEN}{shown}{MARK_CLOSE}" if i in chosen else f" {shown}")
        elif i in chosen and piece.strip():
            lead = piece[:len(piece) - len(piece.lstrip())]
            out.append(f"{lead}{MARK_OPEN}{piece.strip()}{MARK_CLOSE}")
        elif i in chosen:
            out.append(f" {MARK_OPEN}{NEWLINE_SHOWN if chr(10) in piece else SPACE_SHOWN}{MARK_CLOSE}")
        else:
            out.append(piece)
    return "".join(out).replace("\n", " ")


def plain(example: dict) -> str:
    """The example as the model saw it, without marks: masked tokens read " [MASK]"."""
    return mark(example, marked=set())


def explain_examples(record: dict, n: int) -> list[dict]:
    """Up to n examples for the explainer: the explain half of the top examples first, then of the
    examples spread over the activation range."""
    chosen = [e for e in record["top"] if e["split"] == "explain"]
    chosen += [e for e in record["quantile"] if e["split"] == "explain"]
    return chosen[:n]


def active_tokens(examples: list[dict]) -> tuple[Counter, float | None]:
    """Over the given examples' windows: how often the feature is active on each token text (the hidden
    text at masked positions), and the fraction of those activations at masked positions."""
    counts: Counter = Counter()
    n = n_masked = 0
    for e in examples:
        hidden = set(e.get("masked_at", ()))
        for i, (piece, a) in enumerate(zip(e["pieces"], e["acts"])):
            if a > 0:
                counts[piece] += 1
                n += 1
                n_masked += i in hidden
    return counts, (n_masked / n if n else None)


def where_it_fires(frac: float | None) -> str:
    if frac is None:
        return ""
    if frac >= 0.5:
        return (f"This feature fires mostly ({frac:.0%}) on words that are hidden from the model (masked), "
                "so it reflects what the model predicts there rather than what it reads. ")
    return f"This feature fires mostly ({1 - frac:.0%}) on words the model can see. "


def explain_prompt(examples: list[dict], stats: dict) -> str:
    """`stats` (the scan-wide statistics) is not used: it counts the score half too."""
    header = ("Below are excerpts of text as a language model saw them: words hidden from it read "
              f"{MASK_SHOWN}. In each, the words where one hidden feature of the model is active are marked "
              f"{MARK_OPEN}like this{MARK_CLOSE} (a marked hidden word shows what was hidden, as "
              f"{MARK_OPEN}[MASK=word]{MARK_CLOSE}). " + where_it_fires(active_tokens(examples)[1]) + "\n\n")
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


def tokens_description(stats: dict, record: dict, n: int) -> str:
    """The model-free baseline, from what an LLM explainer would be shown (`explain_examples(record, n)`)
    and nothing else: the tokens the feature is most often active on there, whether mostly at masked
    positions, and the first example's centre as a typical context. `stats` is not used: the scan-wide
    counts include the score half."""
    examples = explain_examples(record, n)
    counts, masked_fraction = active_tokens(examples)
    total = max(1, sum(counts.values()))
    tops = [(t, c) for t, c in counts.most_common() if t.strip()][:4]
    words = ", ".join(f'"{t.strip()}" ({c / total:.0%})' for t, c in tops) or "no particular token"
    where = "masked" if (masked_fraction or 0) >= 0.5 else "visible"
    desc = f"fires on {words}, mostly at {where} positions"
    if examples:
        ex, c = examples[0], examples[0]["center"]
        lo, hi = max(0, c - 4), c + 3
        pieces = ex["pieces"][lo:hi]
        snippet = {"pieces": pieces, "acts": [float(lo + i == c) for i in range(len(pieces))],
                   "masked_at": [i - lo for i in ex.get("masked_at", ()) if lo <= i < hi]}
        desc += f'; typical context: "{mark(snippet).strip()}"'
    return desc
