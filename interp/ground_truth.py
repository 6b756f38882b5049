"""The ground-truth benchmark on the synthetic corpus, where every token's concept is known.

    python -m interp.ground_truth --train_folder experiments/X [--checkpoint_name latest]

For every concept category: the single transcoder feature (any layer) whose firing best picks out
the category's tokens (F1 of "fires" against "belongs to the category" over the validation tokens),
the fraction of categories recovered at F1 ≥ 0.8, whether each recovered feature's description names
the category or one of its members (for every explainer that described it), and the diffusion
model's fact-completion accuracy. Printed as a table and saved as ground_truth.json in the run folder.
"""
from __future__ import annotations

import json
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
from interp.descriptions_stage import read_records
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


def f1_table(model, transcoders: dict, loader, max_tokens: int, category_of: torch.Tensor, n_categories: int,
             mask_ratio: float, device) -> dict[int, torch.Tensor]:
    """Per layer, the (features × categories) F1 of "feature fires" against "token is in category"."""
    mc = model.cfg
    n_total = loader.n_sequential(max_tokens)
    tp = {layer: torch.zeros(tc.cfg.num_latents, n_categories, device=device) for layer, tc in transcoders.items()}
    fired = {layer: torch.zeros(tc.cfg.num_latents, device=device) for layer, tc in transcoders.items()}
    in_cat = torch.zeros(n_categories, device=device)
    for batch in loader.sequential(max_tokens):
        _, u = val_noise(batch.index, n_total, 99, loader.seq_len)
        t = torch.full((len(batch.index),), mask_ratio)
        tokens = batch.tokens.to(device)
        noised = apply_noise(tokens, t.to(device), u.to(device), mc.mask_id, mc.bos_id, mc.pad_id)
        cats = category_of[batch.labels.to(device).reshape(-1)]  # (N,) category index, -1 for none
        in_cat += torch.bincount(cats[cats >= 0], minlength=n_categories)
        with torch.no_grad(), capture_mlps(model, list(transcoders)) as seen:
            model(noised.inputs, select=torch.zeros_like(noised.mask))
            for layer, tc in transcoders.items():
                enc = tc.encode(seen[layer][0].reshape(-1, mc.model_dim).float())
                on = enc.acts > 0
                feats = enc.indices[on]
                token = torch.arange(len(cats), device=device)[:, None].expand_as(on)[on]
                fired[layer] += torch.bincount(feats, minlength=len(fired[layer]))
                labelled = cats[token] >= 0
                tp[layer].index_put_((feats[labelled], cats[token][labelled]), torch.ones(int(labelled.sum()),
                                     device=device), accumulate=True)
    return {layer: 2 * tp[layer] / (fired[layer][:, None] + in_cat[None, :]).clamp_min(1) for layer in tp}


def names_category(description: str | None, category: str, members: list[str]) -> bool:
    if not description:
        return False
    # quoted contexts ("… <<token>> …") are examples, not the description's own words
    text = re.sub(r'"[^"]*<<[^"]*"', " ", description).lower()
    words = {category.replace("_", " "), category.split("_")[-1], *(m.lower() for m in members)}
    forms = {f for w in words for f in (w, w + "s", w + "es", w[:-1] + "ies" if w.endswith("y") else w)}
    return any(re.search(rf"(?<![a-z]){re.escape(f)}(?![a-z])", text) for f in forms)


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
    f1 = f1_table(model, transcoders, loader, cfg.val_tokens, category_of, len(categories), cfg.mask_ratio, device)
    records = read_records(paths.records)
    by_feature: dict[tuple[int, int], dict[str, str | None]] = {}
    for r in records:
        by_feature.setdefault((r["layer"], r["feature"]), {})[r["explainer"]] = r["description"]
    explainers = sorted({r["explainer"] for r in records})
    rows = []
    for ci, cat in enumerate(categories):
        best = max(((float(f1[layer][:, ci].max()), layer, int(f1[layer][:, ci].argmax())) for layer in layers))
        value, layer, feature = best
        descs = by_feature.get((layer, feature), {})
        rows.append({"category": cat, "best_f1": value, "layer": layer, "feature": feature,
                     "recovered": value >= RECOVERED_F1,
                     "description_names_it": {ex: names_category(descs.get(ex), cat, members[cat])
                                              for ex in explainers},
                     "descriptions": {ex: descs.get(ex) for ex in explainers}})
    facts = [json.loads(line) for line in (data_dir / meta["facts"]).read_text().splitlines()]
    with torch.no_grad():
        facts_result = fact_accuracy(model, tok, facts)
    recovered = [r for r in rows if r["recovered"]]
    result = {"checkpoint": ckpt.name, "val_tokens": cfg.val_tokens, "mask_ratio": cfg.mask_ratio,
              "recovered_threshold": RECOVERED_F1, "fraction_recovered": len(recovered) / len(rows),
              "named_among_recovered": {ex: (sum(r["description_names_it"][ex] for r in recovered) / len(recovered)
                                             if recovered else None) for ex in explainers},
              "categories": rows,
              "fact_completion": {k: facts_result[k] for k in ("accuracy", "chance", "by_phrasing")}}
    write_json_atomic(folder / GROUND_TRUTH_FILE, result)
    print_table(result, explainers)
    print(f"saved {folder / GROUND_TRUTH_FILE}")
    return result


def print_table(result: dict, explainers: list[str]) -> None:
    head = (f"{'category':14s} {'best F1':>7s}  {'layer':>5s} {'feature':>7s}  "
            + "  ".join(f"named ({e})" for e in explainers))
    print(head)
    print("-" * len(head))
    for r in result["categories"]:
        named = "  ".join(f"{('yes' if r['description_names_it'][e] else 'no'):>{len(e) + 8}s}" if r["recovered"]
                          else f"{'-':>{len(e) + 8}s}" for e in explainers)
        print(f"{r['category']:14s} {r['best_f1']:7.3f}  {r['layer']:5d} {r['feature']:7d}  {named}")
    print(f"categories recovered at F1 ≥ {result['recovered_threshold']}: {result['fraction_recovered']:.0%}")
    for e, v in result["named_among_recovered"].items():
        print(f"  recovered features whose {e} description names the category or a member: "
              f"{'n/a' if v is None else f'{v:.0%}'}")
    for name, part in result["fact_completion"]["by_phrasing"].items():
        print(f"fact completion, {name} phrasing: {part['accuracy']:.1%} (chance {part['chance']:.1%}); "
              f"mean over relations {part['macro_accuracy']:.1%} (chance {part['macro_chance']:.1%})")


def main(cfg: GroundTruthConfig) -> dict:
    return run_ground_truth(cfg)


if __name__ == "__main__":
    cli.run(main, GroundTruthConfig, description=GroundTruthConfig.__doc__)
