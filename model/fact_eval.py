"""Fact completion on the synthetic corpus: does the model fill in " Paris" after "The capital of France is"?

Each fact is generated greedily (temperature 0, low-confidence remasking, one token per step) into as
many masked slots as its relation's longest candidate answer has tokens, plus one, the same for every
fact of the relation; it counts as right when the completion starts with the answer followed by a
non-letter. The number of slots therefore says nothing about which candidate is right (before, it was
the answer's own length plus one, which told the model how long the answer was: a guesser that knew the
candidates and the length was right far more often than 1 in |candidates|). Chance is 1 / (number of
candidate answers), per fact: a uniform guess among the candidates, which is what this protocol leaves.
"""
from __future__ import annotations

from collections import defaultdict

from model.sampler import SamplerConfig, generate


def is_right(completion: str, answer: str) -> bool:
    return completion.startswith(answer) and not completion[len(answer):len(answer) + 1].isalnum()


def slots(tok, fact: dict, extra_tokens: int = 1) -> int:
    """Masked slots for a fact: its relation's longest candidate, plus `extra_tokens`."""
    return max(len(tok.encode(c)) for c in fact["candidates"]) + extra_tokens


def fact_accuracy(model, tok, facts: list[dict], batch_size: int = 64, extra_tokens: int = 1) -> dict:
    """Accuracy and chance, overall and per phrasing ("seen" / "heldout") and relation."""
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

    def summary(items):
        return {"n": len(items), "accuracy": sum(is_right(c, f["answer"]) for f, c in items) / len(items),
                "chance": sum(1 / len(f["candidates"]) for f, _ in items) / len(items)}

    out = summary(results)
    for key in ("phrasing", "relation"):
        groups = defaultdict(list)
        for f, c in results:
            groups[f[key]].append((f, c))
        out[f"by_{key}"] = {k: summary(v) for k, v in sorted(groups.items())}
    for name, part in out["by_phrasing"].items():  # relations weigh equally (sums are over half of the facts)
        rel = [summary([(f, c) for f, c in results if f["phrasing"] == name and f["relation"] == r])
               for r in out["by_relation"]]
        part["macro_accuracy"] = sum(x["accuracy"] for x in rel) / len(rel)
        part["macro_chance"] = sum(x["chance"] for x in rel) / len(rel)
    out["examples"] = [{"prompt": f["prompt"], "answer": f["answer"], "completion": c}
                       for f, c in results[:: max(1, len(results) // 12)]]
    return out
