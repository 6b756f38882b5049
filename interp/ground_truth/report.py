"""The ground-truth benchmark's printed tables (the numbers themselves are in ground_truth.json)."""
from __future__ import annotations

from typing import Any, Callable


def _f(v, width: int = 6) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.3f}"


def _label(c: dict) -> str:
    return f"{'vis' if c['positions'] == 'visible' else 'msk'} t={c['t']:g}"


def _mark(r: dict) -> str:
    """* recovered and above every control; ~ recovered but a control does as well; blank otherwise."""
    return "*" if r["credited"] else "~" if r["recovered"] else " "


def _probe_heldout(k: int) -> Callable[[dict], Any]:
    return lambda c: (c.get("mean_probe_heldout") or {}).get(str(k))


def print_overview(result: dict) -> None:
    conds = result["conditions"]
    w = max(11, *(len(_label(c)) + 1 for c in conds))
    print("held-out F1 of each category's best single feature, by noise level t and view "
          "(* ≥ 0.8 and above every control; ~ ≥ 0.8 but a control does as well)")
    head = f"{'category':22s}" + "".join(f"{_label(c):>{w}s}" for c in conds)
    print(head)
    print("-" * len(head))
    for i, r0 in enumerate(conds[0]["categories"]):
        cells = []
        for c in conds:
            r = c["categories"][i]
            cells.append(f"{r['f1_heldout']:.3f}{_mark(r)}" if r["scored"] else "-")
        print(f"{r0['category']:22s}" + "".join(f"{x:>{w}s}" for x in cells))
    print("-" * len(head))
    ks = result["probe_k"]
    lines: list[tuple[str, Callable[[dict], Any]]] = [("mean F1, chosen half", lambda c: c.get("mean_f1_selection")),
             ("mean F1, held out", lambda c: c.get("mean_f1_heldout")),
             ("  random live feature", lambda c: c.get("mean_random_feature")),
             ("  random live, p99", lambda c: c.get("mean_random_feature_p99")),
             ("  shuffled labels", lambda c: c.get("mean_shuffled_labels")),
             ("  token-id lookup", lambda c: c.get("mean_lookup")),
             ("  context lookup (i±1)", lambda c: c.get("mean_context_lookup"))]
    lines += [(f"probe k={k}, held out", _probe_heldout(k)) for k in ks]
    lines += [(f"  probe k={ks[-1]}, shuffled", lambda c: (c.get("mean_probe_shuffled") or {}).get(str(ks[-1]))),
              ("model's ceiling, accuracy", lambda c: c.get("mean_ceiling_accuracy")),
              ("model's ceiling, F1", lambda c: c.get("mean_ceiling")),
              ("recovered (F1 ≥ 0.8)", lambda c: c.get("fraction_recovered")),
              ("credited, one feature", lambda c: c.get("fraction_credited")),
              ("credited, probe", lambda c: c.get("fraction_credited_probe"))]
    for name, get in lines:
        print(f"{name:22s}" + "".join(f"{_f(get(c), w - 1)} " for c in conds))


def print_condition(cond: dict, ks: list[int], explainers: list[str]) -> None:
    print(f"\n{_label(cond)}: {cond['positions_selection']} positions choose, {cond['positions_heldout']} score")
    probe_head = " ".join(f"{'k=' + str(k):>5s}" for k in ks)
    head = (f"{'category':22s} {'tok sel/held':>12s} {'F1 sel':>6s} {'held':>6s} {'layer:feat':>10s} "
            f"{'rnd':>5s} {'p99':>5s} {'shuf':>5s} {'look':>5s} {'ctx':>5s} | probe {probe_head} {'shuf':>5s} | "
            f"{'ceil':>5s}  "
            + "  ".join(f"named ({e})" for e in explainers))
    print(head)
    print("-" * len(head))
    for r in cond["categories"]:
        probes = " ".join(f"{r['probe'][str(k)]['f1_heldout']:5.2f}" for k in ks)
        ceiling = f"{r['ceiling']['recall']:5.2f}" if r["ceiling"] else f"{'-':>5s}"
        named = "  ".join(f"{r['naming_credit'][e]:>{len(e) + 8}.2f}" if r["recovered"] and "naming_credit" in r
                          else f"{'-':>{len(e) + 8}s}" for e in explainers)
        counts = f"{r['tokens_selection']}/{r['tokens_heldout']}"
        where = f"{r['layer']}:{r['feature']}"
        print(f"{r['category']:22s} {counts:>12s} {r['f1_selection']:6.3f} {r['f1_heldout']:6.3f}{_mark(r)}"
              f"{where:>10s} {r['random_feature']['mean']:5.2f} {r['random_feature']['p99']:5.2f} "
              f"{r['shuffled_labels']['max']:5.2f} {r['lookup']:5.2f} {r.get('context_lookup', float('nan')):5.2f} "
              f"| probe {probes} "
              f"{r['probe'][str(ks[-1])]['shuffled_labels']:5.2f} | {ceiling}  {named}")
    for e, v in cond.get("named_among_recovered", {}).items():
        control = cond["named_shuffled_control"][e]
        print(f"  naming credit of the recovered features' {e} descriptions (1 / categories named, 0 if not "
              f"this one): {'n/a' if v is None else f'{v:.2f}'}; shuffled descriptions: "
              f"{'n/a' if control is None else f'{control:.2f}'}")


def print_table(result: dict, explainers: list[str]) -> None:
    print_overview(result)
    ks = result["probe_k"]
    target = result["benchmark_target"]
    for c in result["conditions"]:
        if (c["t"] == 0 and c["positions"] == "visible") or (
                target and c["positions"] == "masked" and c["t"] == target["t"]):
            print_condition(c, ks, explainers)
    print("columns: rnd/p99 = a random live feature's held-out F1 (mean, 99th percentile); shuf = the same choice "
          "on shuffled labels (largest over repeats); look = token-id lookup, no model; ctx = the same lookup on the "
          "input ids at i − 1 and i + 1; ceil = the model's own "
          "category accuracy (its argmax, mapped to categories; masked positions). The per-category controls of "
          "the other conditions are in ground_truth.json")
    if result["naming_not_evidence"]:
        print(f"  ({', '.join(result['naming_not_evidence'])}: not evidence, these descriptions list the tokens "
              "a feature fires on)")
    if target:
        share = target["share_either"]
        print(f"\nbenchmark target — masked positions at t={target['t']:g}, categories the model itself infers "
              f"(its category accuracy ≥ {target['ceiling_at_least']}): {len(target['eligible'])}; recovered at "
              f"held-out F1 ≥ {target['recovered_f1']} above the controls: "
              + ("n/a" if share is None else
                 f"{share:.0%} ({target['share_feature']:.0%} by one feature, {target['share_probe']:.0%} by a "
                 f"k ≤ {ks[-1]} probe)"))
    facts = result["fact_completion"]
    for name, part in facts["by_phrasing"].items():
        parts = [f"{key.removeprefix('chance_')} {part[key]:.1%}" for key in
                 ("chance_uniform", "chance_majority", "chance_shuffled") if key in part]
        detail = f" = strongest of {', '.join(parts)}" if parts else ""
        print(f"fact completion, {name} phrasing: {part['accuracy']:.1%} (chance {part['chance']:.1%}{detail}); "
              f"mean over relations {part['macro_accuracy']:.1%} (chance {part['macro_chance']:.1%})")
        for relation, r in (part.get("by_relation") or {}).items():
            print(f"  {relation:24s} {r['accuracy']:6.1%}  chance {r['chance']:6.1%} (uniform "
                  f"{r['chance_uniform']:.1%}, majority {r['chance_majority']:.1%}, shuffled "
                  f"{r['chance_shuffled']:.1%}); most common answer "
                  f"{r['top_completion']!r} {r['top_completion_share']:.0%}")
