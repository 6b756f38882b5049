"""The ground-truth benchmark on the synthetic corpus, where every token's concept is known.

    python -m interp.ground_truth --train_folder experiments/X [--checkpoint_name latest]

For every concept category: the single transcoder feature (any layer) whose firing best picks out
the category's tokens (F1 of "fires" against "belongs to the category"), chosen on half of the
validation tokens and scored on the other half (both F1s are reported, with the tokens of the category
in each half); the fraction of categories recovered at held-out F1 ≥ 0.8; whether each recovered
feature's description names the category (strictly: its name, or two of its members), beside the same
check on shuffled descriptions (the negative control); and the diffusion model's fact-completion
accuracy with its chance level. Printed as a table and saved as ground_truth.json in the run folder.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core import cli
from core.cli import arg
from core.files import UserError, write_json_atomic
from data.loader import ShardLoader
from experiment import RunFlags, StagePaths, load_run, load_transcoders, resolve_device, transcoder_layers
from experiment.paths import GROUND_TRUTH_FILE
from interp.descriptions_stage import TOKENS, read_records
from model.fact_eval import fact_accuracy
from model.hooks import capture_mlps
from model.objective import apply_noise, val_noise

RECOVERED_F1 = 0.8


@dataclass
class GroundTruthConfig(RunFlags):
    """Measure how well transcoder features and their descriptions recover the synthetic corpus's concepts."""

    val_tokens: int = arg(65_536, "validation tokens to measure F1 on")
    mask_ratio: float = arg(0.0, "noise on the inputs (0: clean text, where the concept tokens are visible)")

    def __post_init__(self) -> None:
        super().__post_init__()
        cli.require_positive(self, "val_tokens")
        if not 0 <= self.mask_ratio <= 1:
            raise ValueError(f"--mask_ratio must lie in [0, 1], got {self.mask_ratio}")


@dataclass
class Counts:
    """Firing counts of one half of the validation tokens, per layer."""

    tp: dict[int, torch.Tensor]  # layer → (features, categories): fires on a token of the category
    fired: dict[int, torch.Tensor]  # layer → (features,): fires at all
    in_cat: torch.Tensor  # (categories,) tokens of each category

    def f1(self, layer: int) -> torch.Tensor:
        return 2 * self.tp[layer] / (self.fired[layer][:, None] + self.in_cat[None, :]).clamp_min(1)


def count_firings(model, transcoders: dict, loader, max_tokens: int, category_of: torch.Tensor, n_categories: int,
                  mask_ratio: float, device) -> tuple[Counts, Counts]:
    """Firing counts on the validation tokens, in two disjoint halves: even batches (where each category's
    feature is chosen) and odd batches (where the chosen feature is scored)."""
    mc = model.cfg
    n_total = loader.n_sequential(max_tokens)

    def empty() -> Counts:
        return Counts({layer: torch.zeros(tc.cfg.num_latents, n_categories, device=device)
                       for layer, tc in transcoders.items()},
                      {layer: torch.zeros(tc.cfg.num_latents, device=device) for layer, tc in transcoders.items()},
                      torch.zeros(n_categories, device=device))

    halves = (empty(), empty())
    for b, batch in enumerate(loader.sequential(max_tokens)):
        c = halves[b % 2]
        _, u = val_noise(batch.index, n_total, 99, loader.seq_len)
        t = torch.full((len(batch.index),), mask_ratio)
        tokens = batch.tokens.to(device)
        noised = apply_noise(tokens, t.to(device), u.to(device), mc.mask_id, mc.bos_id, mc.pad_id)
        cats = category_of[batch.labels.to(device).reshape(-1)]  # (N,) category index, -1 for none
        c.in_cat += torch.bincount(cats[cats >= 0], minlength=n_categories)
        with torch.no_grad(), capture_mlps(model, list(transcoders)) as seen:
            model(noised.inputs, select=torch.zeros_like(noised.mask))
            for layer, tc in transcoders.items():
                enc = tc.encode(seen[layer][0].reshape(-1, mc.model_dim).float())
                on = enc.acts > 0
                feats = enc.indices[on]
                token = torch.arange(len(cats), device=device)[:, None].expand_as(on)[on]
                c.fired[layer] += torch.bincount(feats, minlength=len(c.fired[layer]))
                labelled = cats[token] >= 0
                c.tp[layer].index_put_((feats[labelled], cats[token][labelled]),
                                       torch.ones(int(labelled.sum()), device=device), accumulate=True)
    return halves


def choose_and_score(select: Counts, report: Counts, layers: list[int], category: int) -> dict:
    """The category's best feature (any layer) by F1 on the `select` half, and its F1 on both halves."""
    value, layer, feature = max((float(select.f1(layer)[:, category].max()), layer,
                                 int(select.f1(layer)[:, category].argmax())) for layer in layers)
    return {"layer": layer, "feature": feature, "f1_selection": value,
            "f1_heldout": float(report.f1(layer)[feature, category]),
            "tokens_selection": int(select.in_cat[category]), "tokens_heldout": int(report.in_cat[category])}


def _word(text: str, word: str, case_sensitive: bool) -> bool:
    flags = 0 if case_sensitive else re.IGNORECASE
    return re.search(rf"(?<![\w']){re.escape(word)}(?![\w'])", text, flags) is not None


def names_category(description: str | None, category: str, members: list[str]) -> bool:
    """Whether a description names a category: the category's name (or its plural) as a whole word, or
    at least two of its members as whole words, outside quoted example contexts ("… <<x>> …"). Members
    of one or two letters or in capitals (chemical symbols) match case-sensitively. One member alone
    does not count: "the first word" is not a description of ordinals, nor "one of several words" of
    numbers."""
    if not description:
        return False
    text = re.sub(r'"[^"]*<<[^"]*"', " ", description)
    name = category.replace("_", " ")
    plurals = {name, name + "s", name + "es", name[:-1] + "ies" if name.endswith("y") else name}
    if any(_word(text, form, False) for form in plurals):
        return True
    found = {m for m in members if _word(text, m.strip(), len(m.strip()) <= 2 or m.strip().isupper())}
    return len(found) >= 2


def shuffled_naming_rate(rows: list[dict], pool: list[str], members: dict[str, list[str]], explainer: str = "",
                         repeats: int = 50, seed: int = 0) -> float | None:
    """The negative control: the same check on descriptions of other, random features (drawn from all of
    an explainer's descriptions but the row's own), averaged over `repeats` draws. Near 0 unless the
    check is lenient."""
    rng = random.Random(seed)
    hits = n = 0
    for r in rows:
        own = r.get("descriptions", {}).get(explainer)
        others = [d for d in pool if d != own]
        for _ in range(repeats if others else 0):
            hits += names_category(rng.choice(others), r["category"], members[r["category"]])
            n += 1
    return hits / n if n else None


def run_ground_truth(cfg) -> dict:
    device = resolve_device(cfg.cuda, cfg.device)
    config, model, tok, ckpt = load_run(cfg.train_folder, cfg.checkpoint_name, device)
    folder = Path(cfg.train_folder)
    data_dir = Path(config["data"]["folder"])
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").exists() else {}
    if not meta.get("labels"):
        raise UserError(f"{folder} was not trained on the synthetic corpus (its data has no concept labels)")
    concepts = json.loads((data_dir / meta["concepts"]).read_text())
    categories = sorted({c["category"] for c in concepts})
    members = {cat: [c["entity"] for c in concepts if c["category"] == cat] for cat in categories}
    category_of = torch.full((len(concepts) + 1,), -1, dtype=torch.long, device=device)
    for c in concepts:
        category_of[c["id"]] = categories.index(c["category"])
    paths = StagePaths(folder, ckpt.name)
    layers = transcoder_layers(paths.transcoders, "all", model.cfg.num_layers)
    transcoders = load_transcoders(paths.transcoders, layers, device, model.cfg.model_dim)
    loader = ShardLoader(data_dir, "val", config["train"]["train_seq_len"], 8)
    select, report = count_firings(model, transcoders, loader, cfg.val_tokens, category_of, len(categories),
                                   cfg.mask_ratio, device)
    if not report.in_cat.sum():
        raise UserError(f"--val_tokens {cfg.val_tokens} covers one batch of validation windows: the benchmark "
                        "chooses on one half and scores on another, so give at least two batches' worth")
    records = read_records(paths.records)
    by_feature: dict[tuple[int, int], dict[str, str | None]] = {}
    for r in records:
        by_feature.setdefault((r["layer"], r["feature"]), {})[r["explainer"]] = r["description"]
    explainers = sorted({r["explainer"] for r in records})
    rows = []
    for ci, cat in enumerate(categories):
        row = {"category": cat, **choose_and_score(select, report, layers, ci)}
        descs = by_feature.get((row["layer"], row["feature"]), {})
        row.update(recovered=row["f1_heldout"] >= RECOVERED_F1,
                   description_names_it={ex: names_category(descs.get(ex), cat, members[cat]) for ex in explainers},
                   descriptions={ex: descs.get(ex) for ex in explainers})
        rows.append(row)
    facts = [json.loads(line) for line in (data_dir / meta["facts"]).read_text().splitlines()]
    with torch.no_grad():
        facts_result = fact_accuracy(model, tok, facts)
    recovered = [r for r in rows if r["recovered"]]
    pools = {ex: [r["description"] for r in records if r["explainer"] == ex and r["description"]] for ex in explainers}
    result = {"checkpoint": ckpt.name, "val_tokens": cfg.val_tokens, "mask_ratio": cfg.mask_ratio,
              "selection": "best feature by F1 on the even validation batches, scored on the odd ones",
              "recovered_threshold": RECOVERED_F1, "fraction_recovered": len(recovered) / len(rows),
              "mean_f1_selection": sum(r["f1_selection"] for r in rows) / len(rows),
              "mean_f1_heldout": sum(r["f1_heldout"] for r in rows) / len(rows),
              "named_among_recovered": {ex: (sum(r["description_names_it"][ex] for r in recovered) / len(recovered)
                                             if recovered else None) for ex in explainers},
              "named_shuffled_control": {ex: shuffled_naming_rate(recovered, pools[ex], members, ex)
                                         for ex in explainers},
              "naming_not_evidence": [ex for ex in explainers if ex == TOKENS],
              "categories": rows,
              "fact_completion": {k: facts_result[k] for k in ("accuracy", "chance", "by_phrasing")}}
    write_json_atomic(folder / GROUND_TRUTH_FILE, result)
    print_table(result, explainers)
    print(f"saved {folder / GROUND_TRUTH_FILE}")
    return result


def print_table(result: dict, explainers: list[str]) -> None:
    head = (f"{'category':14s} {'tokens sel/held':>15s} {'F1 sel':>6s} {'F1 held':>7s} {'layer':>5s} {'feature':>7s}  "
            + "  ".join(f"named ({e})" for e in explainers))
    print(head)
    print("-" * len(head))
    for r in result["categories"]:
        named = "  ".join(f"{('yes' if r['description_names_it'][e] else 'no'):>{len(e) + 8}s}" if r["recovered"]
                          else f"{'-':>{len(e) + 8}s}" for e in explainers)
        counts = f"{r['tokens_selection']}/{r['tokens_heldout']}"
        print(f"{r['category']:14s} {counts:>15s} {r['f1_selection']:6.3f} {r['f1_heldout']:7.3f} {r['layer']:5d} "
              f"{r['feature']:7d}  {named}")
    print(f"mean F1 of the chosen features: {result['mean_f1_selection']:.3f} where they were chosen, "
          f"{result['mean_f1_heldout']:.3f} held out")
    print(f"categories recovered at held-out F1 ≥ {result['recovered_threshold']}: {result['fraction_recovered']:.0%}")
    for e, v in result["named_among_recovered"].items():
        control = result["named_shuffled_control"][e]
        note = (" (not evidence: this baseline's descriptions list the tokens it fires on)"
                if e in result["naming_not_evidence"] else "")
        print(f"  recovered features whose {e} description names the category (its name, or two members): "
              f"{'n/a' if v is None else f'{v:.0%}'}; shuffled descriptions: "
              f"{'n/a' if control is None else f'{control:.0%}'}{note}")
    for name, part in result["fact_completion"]["by_phrasing"].items():
        print(f"fact completion, {name} phrasing: {part['accuracy']:.1%} (chance {part['chance']:.1%}); "
              f"mean over relations {part['macro_accuracy']:.1%} (chance {part['macro_chance']:.1%})")


def main(cfg: GroundTruthConfig) -> dict:
    return run_ground_truth(cfg)


if __name__ == "__main__":
    cli.run(main, GroundTruthConfig, description=GroundTruthConfig.__doc__)
