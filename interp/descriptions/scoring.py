"""Scoring a description on the held-out "score" half of a feature's examples.

- detection: a judge reads the description and one context and gives P(yes: the feature fires here);
  AUROC of activating against non-activating contexts, and balanced accuracy at 0.5.
- fuzzing: activating contexts with the right tokens marked against the same contexts with as many
  wrong tokens marked; the judge says whether the marks fit the description; balanced accuracy (and AUROC).
  A marked masked token shows its hidden word (<<[MASK=word]>>, a "reveal"), so a wrong marking reveals
  in the same share as the right one of its example (`fuzzing_positions`): the share of reveals is no
  cue to which marking is right.
- token_match, printed "token_match (visible words)" (no LLM, and not a simulation: the simulation of
  the literature has a model predict every token's activation from the description): predict
  activation 1 at tokens matching the words the description quotes (its content words when it quotes
  none), 0 elsewhere; Pearson correlation with the true activations. It reads the
  text as the model saw it: a masked token is [MASK] and never matches (a record without `"reads"`,
  whose match read hidden words too, is summarised apart). A keyword match, kept as the model-free score.
- simulation (with the judge, as in the literature's "all at once" simulation): the judge reads the
  description and a held-out window as the model saw it and predicts, for every token, how strongly
  the feature fires there on a 0–9 scale (the expected digit after each token's line, all of a
  window's lines in one forward pass); Pearson correlation with the true activations.

Held out means held out by token position, not by text: no position of a scored window was shown to the
explainer, and a window whose tokens equal an earlier one's is dropped (interp/contexts/store.py), but
templated text repeats itself, and about a fifth of the demo's held-out activating windows have the same
±3 tokens around their centre as some explain-half window. A description that quotes its examples'
words is therefore scored partly on text it has seen (in other positions).
"""
from __future__ import annotations

import random
import re
from typing import Any, Callable, Sequence

from interp.descriptions.prompts import MASK_SHOWN, mark, plain

STOPWORDS = set("""a an the of in on at to for and or is are was were be by with as from that this these those it its
fires fire firing feature features word words token tokens mostly positions position visible masked typical context
on about which when where what often""".split())
# how hidden words are shown ([MASK], [MASK=word]), never a word of the text: never a keyword
NOT_KEYWORDS = {"mask"}
TOKEN_MATCH_READS = "visible words"  # what token_match reads; its printed name says so
TOKEN_MATCH_LABEL = f"token_match ({TOKEN_MATCH_READS})"


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


def _shown_as(example: dict, i: int, hidden: set[int]) -> str:
    """How token i looks when marked: "reveal" (<<[MASK=word]>>), "mask" (a hidden blank: <<[MASK]>>),
    "word" (a visible word) or "blank" (visible whitespace: <<⏎>> or <<␣>>)."""
    blank = not example["pieces"][i].strip()
    return ("mask" if blank else "reveal") if i in hidden else ("blank" if blank else "word")


SHOWN_AS = ("reveal", "mask", "word", "blank")


def fuzzing_positions(example: dict, rng: random.Random) -> tuple[set[int], set[int]]:
    """(right, wrong) positions to mark in one activating example for fuzzing; neither is ever empty.

    right: the tokens where the feature is active (the centre when rounding left none). wrong: as many
    tokens where it is inactive, with as many of each look (`_shown_as`: reveals, hidden blanks, visible
    words, visible blanks) as the right marking has, so that no look, the share of reveals above all,
    tells the two apart. Where the example has too few inactive tokens of a look, the rest are drawn from
    its other inactive tokens, revealing ones for a reveal and others for the rest while there are any
    (the number of marks is kept: only then, in this example, can the share of reveals differ); where it
    has too few inactive tokens altogether, every one of them is marked. Where it has none (every token
    of the window active), the wrong marking is the right one without its strongest token, a strict
    subset, hence still not exactly the tokens it fires on; a window of one active token has no other
    marking, and both markings are the same (the pair then scores chance)."""
    acts, hidden = example["acts"], set(example.get("masked_at", ()))
    right = {i for i, a in enumerate(acts) if a > 0} or {example["center"]}
    inactive = [i for i in range(len(acts)) if i not in right]
    if not inactive:
        strongest = max(sorted(right), key=lambda i: acts[i])
        return right, (right - {strongest}) or right
    look = {i: _shown_as(example, i, hidden) for i in range(len(acts))}
    wrong: list[int] = []
    # as many of each look as the right marking; then of each class (revealing or not); then of any
    for key in (look.get, lambda i: look[i] == "reveal", lambda i: None):
        for group in sorted({key(i) for i in range(len(acts))}, key=str):  # sorted: the draws do not vary
            want = sum(key(i) == group for i in right) - sum(key(i) == group for i in wrong)
            pool = [i for i in inactive if key(i) == group and i not in wrong]
            wrong += rng.sample(pool, max(0, min(want, len(pool))))
    return right, set(wrong)


def wrongly_marked(example: dict, rng: random.Random) -> str:
    """The example with its wrong marking (`fuzzing_positions`)."""
    return mark(example, fuzzing_positions(example, rng)[1])


def score_sets(record: dict, n: int | None = None) -> tuple[list[dict], list[dict]]:
    """(activating, non-activating) held-out contexts: the "score" half only, at most n of each; the
    activating ones alternate between the top examples and those spread over the activation range."""
    top = [e for e in record["top"] if e["split"] == "score"]
    spread = [e for e in record["quantile"] if e["split"] == "score"]
    pos = [e for pair in zip(top, spread) for e in pair] + top[len(spread):] + spread[len(top):]
    neg = [e for e in record["random"] if e["split"] == "score"]
    return (pos, neg) if n is None else (pos[:n], neg[:n])


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in NOT_KEYWORDS}


def quoted_passages(description: str) -> list[str]:
    """What a description quotes: its quoted passages (of a quoted passage with <<marks>>, only the marked
    words) and its <<marked>> words."""
    passages: list[str] = []
    for group in re.findall(r'"([^"]+)"|“([^”]+)”', description):
        part = "".join(group)
        passages += re.findall(r"<<([^>]+)>>", part) or [part]
    return passages + re.findall(r"<<([^>]+)>>", description)


def quoted_words(description: str) -> set[str]:
    """The words a description quotes (`quoted_passages`); its content words when it quotes nothing. Empty
    when what it quotes has no word (punctuation, [MASK]): unrelated words never stand in for it. "mask"
    is never a keyword: it is how hidden words are shown, not a word of the text."""
    passages = quoted_passages(description)
    if passages:
        return set().union(*map(_words, passages))
    return {w for w in _words(description) if w not in STOPWORDS and len(w) > 2}


def token_match(description: str, contexts: list[dict]) -> dict:
    """Correlation of "this token is one of the quoted words" with the activations, the text read as the
    model saw it: a masked token is [MASK] and matches no keyword."""
    words = quoted_words(description)
    pred, true, n_hidden = [], [], 0
    for ex in contexts:
        hidden = set(ex.get("masked_at", ()))
        for i, (piece, act) in enumerate(zip(ex["pieces"], ex["acts"])):
            token_words = [] if i in hidden else re.findall(r"\w+", piece.lower())
            n_hidden += i in hidden
            pred.append(1.0 if token_words and all(w in words for w in token_words) else 0.0)
            true.append(float(act))
    out = {"correlation": pearson(pred, true), "n_tokens": len(true), "n_hidden": n_hidden,
           "reads": TOKEN_MATCH_READS, "words": sorted(words)[:20]}
    if out["correlation"] is None:
        out["undefined"] = ("the description quotes no word (only punctuation or [MASK])"
                            if not words and quoted_passages(description) else "fewer than two tokens"
                            if len(true) < 2 else "no token matches the description's words"
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
    marked = [fuzzing_positions(e, rng) for e in pos]
    prompts += [fuzzing_prompt(description, mark(e, right)) for e, (right, _) in zip(pos, marked)]
    prompts += [fuzzing_prompt(description, mark(e, wrong)) for e, (_, wrong) in zip(pos, marked)]
    return prompts, len(pos), len(neg)


def scores_from_judgements(probs: Sequence[float], n_pos: int, n_neg: int) -> dict:
    """Detection and fuzzing from the judge's answers (P(yes)) to `judge_prompts`' questions, in order."""
    d_pos, d_neg = probs[:n_pos], probs[n_pos:n_pos + n_neg]
    f_right, f_wrong = probs[n_pos + n_neg:n_pos * 2 + n_neg], probs[n_pos * 2 + n_neg:]
    # each judgement kept, in score_sets' order, so the scores can be recomputed (and exported to delphi)
    detection: dict[str, Any] = {"auroc": auroc(d_pos, d_neg), "balanced_accuracy": balanced_accuracy(d_pos, d_neg),
                                 "n_activating": len(d_pos), "n_non_activating": len(d_neg),
                                 "probabilities": {"activating": _floats(d_pos), "non_activating": _floats(d_neg)}}
    fuzzing: dict[str, Any] = {"balanced_accuracy": balanced_accuracy(f_right, f_wrong),
                               "auroc": auroc(f_right, f_wrong), "n": len(f_right),
                               "probabilities": {"right": _floats(f_right), "wrong": _floats(f_wrong)}}
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
    out: dict[str, Any] = {"correlation": pearson(pred, true), "n_tokens": len(true), "n_windows": len(contexts)}
    if out["correlation"] is None:
        out["undefined"] = ("fewer than two tokens" if len(true) < 2 else "constant prediction"
                            if len(set(pred)) < 2 else "constant activations")
    return out
