"""Fact completion on the synthetic corpus: does the model fill in " Paris" after "The capital of France is"?

Each fact is generated greedily (temperature 0, low-confidence remasking, one token per step) into as
many masked slots as its relation's longest candidate answer has tokens, plus one, the same for every
fact of the relation; it counts as right when the completion starts with the answer followed by a
non-letter. The number of slots therefore says nothing about which candidate is right.

Chance is the strongest of three guessers, each scored on the same facts (per relation, per phrasing,
overall, and as a mean over relations):
- uniform: 1 / (number of candidate answers), a uniform guess among the candidates;
- majority: always giving the most common answer of the relation and phrasing (21 of the 231 sums are
  "twenty"), which needs no knowledge of the fact;
- shuffled: the model's own completions scored against the answers shuffled among the facts of the same
  relation and phrasing (a permutation control, the mean over `shuffle_repeats` seeded shuffles). It
  credits a model that knows which answers a relation has and how often, but not which fact has which;
  a model that always answers the same thing scores exactly that answer's share here.
Each component is kept by name, and per relation the model's most common completion and its share
("Ottawa" to all 15 capitals is a majority guess, not knowledge). The overall and per-phrasing chance is
the best of the three guessers over those facts; the macro chance averages each relation's best, so it
is the bar for a guesser that picks its strategy per relation.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict

from model.sampler import SamplerConfig, generate


def is_right(completion: str, answer: str) -> bool:
    return completion.startswith(answer) and not completion[len(answer):len(answer) + 1].isalnum()


def slots(tok, fact: dict, extra_tokens: int = 1) -> int:
    """Masked slots for a fact: its relation's longest candidate, plus `extra_tokens`."""
    return max(len(tok.encode(c)) for c in fact["candidates"]) + extra_tokens


def answer_given(completion: str, candidates: list[str]) -> str:
    """The candidate a completion gives (the longest that is right for it), else its first word."""
    right = [c for c in candidates if is_right(completion, c)]
    if right:
        return max(right, key=len).strip()
    words = completion.split()
    return (words[0].strip(".,;:!?") or words[0]) if words else ""


def shuffled_hits(results: list[tuple[dict, str]], repeats: int = 20, seed: int = 0) -> list[list[bool]]:
    """For each of `repeats` seeded shuffles of the answers among the facts of one relation and phrasing:
    whether each completion is right for the answer it was shuffled onto. (repeats, facts)"""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (f, _) in enumerate(results):
        groups[(f["relation"], f["phrasing"])].append(i)
    out = []
    for r in range(repeats):
        rng = random.Random(seed * 100_003 + r)
        hits = [False] * len(results)
        for _, idx in sorted(groups.items()):
            answers = [results[i][0]["answer"] for i in idx]
            rng.shuffle(answers)
            for i, a in zip(idx, answers):
                hits[i] = is_right(results[i][1], a)
        out.append(hits)
    return out


def summary(results: list[tuple[dict, str]], idx: list[int], shuffled: list[list[bool]]) -> dict:
    """Accuracy of the facts `idx` of `results`, and its chance: the strongest of the three guessers."""
    n = len(idx)
    accuracy = sum(is_right(results[i][1], results[i][0]["answer"]) for i in idx) / n
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for i in idx:
        f = results[i][0]
        groups[(f["relation"], f["phrasing"])][f["answer"]] += 1
    per_shuffle = [sum(hits[i] for i in idx) / n for hits in shuffled]
    parts = {"chance_uniform": sum(1 / len(results[i][0]["candidates"]) for i in idx) / n,
             "chance_majority": sum(max(c.values()) for c in groups.values()) / n,
             "chance_shuffled": sum(per_shuffle) / len(per_shuffle) if per_shuffle else 0.0}
    given = Counter(answer_given(results[i][1], results[i][0]["candidates"]) for i in idx)
    top, count = given.most_common(1)[0]
    return {"n": n, "accuracy": accuracy, "chance": max(parts.values()), **parts,
            # how often a shuffle did at least as well as the real answers (1 / (repeats + 1) at best)
            "p_shuffled": (1 + sum(s >= accuracy for s in per_shuffle)) / (1 + len(per_shuffle)),
            "top_completion": top, "top_completion_share": count / n}


def complete(model, tok, facts: list[dict], batch_size: int = 64, extra_tokens: int = 1) -> list[tuple[dict, str]]:
    """(fact, completion) for every fact, generated into its relation's number of slots."""
    by_len: dict[int, list[dict]] = defaultdict(list)
    for f in facts:
        by_len[slots(tok, f, extra_tokens)].append(f)
    results = []
    for length, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            out = generate(model, [tok.encode(f["prompt"]) for f in chunk], SamplerConfig(length, length))
            for f, row in zip(chunk, out.states[-1].tolist()):
                results.append((f, tok.decode(row)))
    return results


def score(results: list[tuple[dict, str]], shuffle_repeats: int = 20, seed: int = 0) -> dict:
    """Accuracy and chance (with its components), overall, per phrasing ("seen" / "heldout") and relation,
    and per relation within each phrasing; per phrasing also the mean over relations (macro)."""
    shuffled = shuffled_hits(results, shuffle_repeats, seed)
    everything = list(range(len(results)))
    out = summary(results, everything, shuffled)
    for key in ("phrasing", "relation"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (f, _) in enumerate(results):
            groups[f[key]].append(i)
        out[f"by_{key}"] = {k: summary(results, v, shuffled) for k, v in sorted(groups.items())}
    for name, part in out["by_phrasing"].items():  # relations weigh equally (sums are over half of the facts)
        rel = {r: summary(results, [i for i in everything if results[i][0]["phrasing"] == name
                                    and results[i][0]["relation"] == r], shuffled)
               for r in out["by_relation"] if any(f["phrasing"] == name and f["relation"] == r for f, _ in results)}
        part["by_relation"] = rel
        for k in ("accuracy", "chance", "chance_uniform", "chance_majority", "chance_shuffled"):
            part[f"macro_{k}"] = sum(x[k] for x in rel.values()) / len(rel)
    out["examples"] = [{"prompt": f["prompt"], "answer": f["answer"], "completion": c}
                       for f, c in results[:: max(1, len(results) // 12)]]
    return out


def fact_accuracy(model, tok, facts: list[dict], batch_size: int = 64, extra_tokens: int = 1,
                  shuffle_repeats: int = 20, seed: int = 0) -> dict:
    """Accuracy and chance, overall and per phrasing ("seen" / "heldout") and relation (see `score`)."""
    return score(complete(model, tok, facts, batch_size, extra_tokens), shuffle_repeats, seed)
