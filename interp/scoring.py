"""Scoring a description on the held-out "score" half of a feature's examples.

- detection: a judge reads the description and one context and gives P(yes: the feature fires here);
  AUROC of activating against non-activating contexts, and balanced accuracy at 0.5.
- fuzzing: activating contexts with the right tokens marked against the same contexts with as many
  wrong tokens marked; the judge says whether the marks fit the description; balanced accuracy (and AUROC).
- token_match (no LLM; called "simulation" before, which it is not: the simulation of the literature
  has a model predict every token's activation from the description): predict activation 1 at tokens
  matching the words the description quotes (its content words when it quotes none), 0 elsewhere;
  Pearson correlation with the true activations. A keyword match, kept as the model-free score.
- simulation (with the judge, as in the literature's "all at once" simulation): the judge reads the
  description and a held-out window as the model saw it and predicts, for every token, how strongly
  the feature fires there on a 0–9 scale (the expected digit after each token's line, all of a
  window's lines in one forward pass); Pearson correlation with the true activations.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Sequence

from interp.describe import MASK_SHOWN, mark, plain

STOPWORDS = set("""a an the of in on at to for and or is are was were be by with as from that this these those it its
fires fire firing feature features word words token tokens mostly positions position visible masked typical context
on about which when where what often""".split())


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a random positive scores above a random negative), ties counting one half (Mann–Whitney): 0.5
    when every score ties. Undefined (None) only when a class is missing; see `missing_class`."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def missing_class(n_positive: int, n_negative: int) -> str | None:
    """Why a two-class score is undefined, or None when it is defined."""
    missing = [name for name, n in (("activating", n_positive), ("non-activating", n_negative)) if n == 0]
    return f"no {' and no '.join(missing)} contexts in the score half" if missing else None


def balanced_accuracy(positive: Sequence[float], negative: Sequence[float], threshold: float = 0.5) -> float | None:
    if not positive or not negative:
        return None
    tpr = sum(p >= threshold for p in positive) / len(positive)
    tnr = sum(n < threshold for n in negative) / len(negative)
    return (tpr + tnr) / 2


def detection_prompt(description: str, example: dict) -> str:
    return (f'A hidden feature of a language model is described as: "{description}".\n'
            f'Text: "{plain(example).strip()}"\n'
            "Does this feature fire anywhere in the text? Answer yes or no.")


def fuzzing_prompt(description: str, marked_text: str) -> str:
    return (f'A hidden feature of a language model is described as: "{description}".\n'
            f'In the text below some words are marked <<like this>>.\nText: "{marked_text.strip()}"\n'
            "Are the marked words exactly the ones this feature fires on? Answer yes or no.")


def wrongly_marked(example: dict, rng: random.Random) -> str:
    """The example with as many tokens marked as are active, all of them at inactive positions."""
    active = {i for i, a in enumerate(example["acts"]) if a > 0}
    others = [i for i, p in enumerate(example["pieces"]) if i not in active and p.strip()]
    chosen = set(rng.sample(others, min(len(others), max(1, len(active)))))
    return mark(example, chosen)


def score_sets(record: dict, n: int | None = None) -> tuple[list[dict], list[dict]]:
    """(activating, non-activating) held-out contexts: the "score" half only, at most n of each; the
    activating ones alternate between the top examples and those spread over the activation range."""
    top = [e for e in record["top"] if e["split"] == "score"]
    spread = [e for e in record["quantile"] if e["split"] == "score"]
    pos = [e for pair in zip(top, spread) for e in pair] + top[len(spread):] + spread[len(top):]
    neg = [e for e in record["random"] if e["split"] == "score"]
    return (pos, neg) if n is None else (pos[:n], neg[:n])


def quoted_words(description: str) -> set[str]:
    """The words a description quotes; inside a quoted passage with <<marks>>, only the marked words."""
    words: set[str] = set()
    for group in re.findall(r'"([^"]+)"|“([^”]+)”', description):
        part = "".join(group)
        marked = re.findall(r"<<([^>]+)>>", part)
        for chunk in marked or [part]:
            words.update(re.findall(r"\w+", chunk.lower()))
    words.update(w for chunk in re.findall(r"<<([^>]+)>>", description) for w in re.findall(r"\w+", chunk.lower()))
    if not words:
        words = {w for w in re.findall(r"\w+", description.lower()) if w not in STOPWORDS and len(w) > 2}
    return words


def token_match(description: str, contexts: list[dict]) -> dict:
    words = quoted_words(description)
    pred, true = [], []
    for ex in contexts:
        for piece, act in zip(ex["pieces"], ex["acts"]):
            token_words = re.findall(r"\w+", piece.lower())
            pred.append(1.0 if token_words and all(w in words for w in token_words) else 0.0)
            true.append(float(act))
    out = {"correlation": pearson(pred, true), "n_tokens": len(true), "words": sorted(words)[:20]}
    if out["correlation"] is None:
        out["undefined"] = ("fewer than two tokens" if len(true) < 2 else "no token matches the description's words"
                            if len(set(pred)) < 2 else "constant activations")
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None  # a constant prediction (no word matched) or constant activations: undefined
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sxx * syy) ** 0.5


def judge_prompts(description: str, record: dict, seed: int, n: int | None = None) -> tuple[list[str], int, int]:
    """Detection's and fuzzing's questions about one description, and the numbers of held-out activating and
    non-activating contexts they ask about."""
    pos, neg = score_sets(record, n)
    rng = random.Random(seed)
    prompts = [detection_prompt(description, e) for e in pos + neg]
    prompts += [fuzzing_prompt(description, mark(e)) for e in pos]
    prompts += [fuzzing_prompt(description, wrongly_marked(e, rng)) for e in pos]
    return prompts, len(pos), len(neg)


def scores_from_judgements(probs: Sequence[float], n_pos: int, n_neg: int) -> dict:
    """Detection and fuzzing from the judge's answers (P(yes)) to `judge_prompts`' questions, in order."""
    d_pos, d_neg = probs[:n_pos], probs[n_pos:n_pos + n_neg]
    f_right, f_wrong = probs[n_pos + n_neg:n_pos * 2 + n_neg], probs[n_pos * 2 + n_neg:]
    # each judgement kept, in score_sets' order, so the scores can be recomputed (and exported to delphi)
    detection = {"auroc": auroc(d_pos, d_neg), "balanced_accuracy": balanced_accuracy(d_pos, d_neg),
                 "n_activating": len(d_pos), "n_non_activating": len(d_neg),
                 "probabilities": {"activating": _floats(d_pos), "non_activating": _floats(d_neg)}}
    fuzzing = {"balanced_accuracy": balanced_accuracy(f_right, f_wrong), "auroc": auroc(f_right, f_wrong),
               "n": len(f_right), "probabilities": {"right": _floats(f_right), "wrong": _floats(f_wrong)}}
    # an undefined score is reported as such: never a number, never a crash
    if why := missing_class(len(d_pos), len(d_neg)):
        detection["undefined"] = why
    if not n_pos:
        fuzzing["undefined"] = "no activating contexts in the score half"
    return {"detection": detection, "fuzzing": fuzzing}


def judge_scores(description: str, record: dict, judge: Callable[[list[str]], list[float]], seed: int,
                 n: int | None = None) -> dict:
    """Detection and fuzzing with `judge` (prompts → P(yes)); both computed from one batched call."""
    return judge_many([(description, record, seed)], judge, n)[0]


def judge_many(items: Sequence[tuple[str, dict, int]], judge: Callable[[list[str]], list[float]],
               n: int | None = None) -> list[dict]:
    """`judge_scores` of many (description, record, seed) at once: every question of every description in
    one call to `judge`, so that its batches fill up (a feature has only about 4n questions) and group
    prompts of similar length from all of them."""
    asked = [judge_prompts(d, r, seed, n) for d, r, seed in items]
    flat = [p for prompts, _, _ in asked for p in prompts]
    probs = judge(flat) if flat else []
    out, at = [], 0
    for prompts, n_pos, n_neg in asked:
        out.append(scores_from_judgements(probs[at:at + len(prompts)], n_pos, n_neg))
        at += len(prompts)
    return out


def _floats(xs: Sequence[float]) -> list[float]:
    """Plain floats at full precision: the scores recomputed from them are the scores reported."""
    return [float(x) for x in xs]


def simulation_request(description: str, example: dict) -> tuple[str, list[str]]:
    """The prompt and one line per token to predict, all as the model saw them: a masked token's line
    reads [MASK]. (All lines go into one pass, so revealing a hidden word on its line would reveal it to
    every later prediction: a masked trigger in a non-activating window would be readable again.)"""
    hidden = set(example.get("masked_at", ()))
    lines = [f"{i + 1}. " + (MASK_SHOWN if i in hidden else piece.strip() or repr(piece))
             for i, piece in enumerate(example["pieces"])]
    prompt = (f'A hidden feature of a language model is described as: "{description}".\n'
              f'Text: "{plain(example).strip()}"\n'
              "For each token of the text, in order, how strongly does the feature fire on it, from 0 (not at "
              "all) to 9 (as strongly as it ever fires)? Answer with one digit per token.")
    return prompt, lines


def simulation(description: str, contexts: list[dict],
               predict: Callable[[list[str], list[list[str]]], list[list[float]]]) -> dict:
    """Correlation of the judge's predicted activations (`predict`: prompts and their token lines →
    expected 0–9 per line, all lines of a window in one pass) with the true ones, over every token of
    `contexts` (held-out activating and non-activating windows)."""
    requests = [simulation_request(description, e) for e in contexts]
    rows = predict([p for p, _ in requests], [lines for _, lines in requests]) if requests else []
    pred = [v for row in rows for v in row]
    true = [float(a) for e in contexts for a in e["acts"]]
    out = {"correlation": pearson(pred, true), "n_tokens": len(true), "n_windows": len(contexts)}
    if out["correlation"] is None:
        out["undefined"] = ("fewer than two tokens" if len(true) < 2 else "constant prediction"
                            if len(set(pred)) < 2 else "constant activations")
    return out
