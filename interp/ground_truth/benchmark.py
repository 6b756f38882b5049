"""The ground-truth benchmark on the synthetic corpus, where every token's concept is known.

    python -m interp.ground_truth --train_folder experiments/X [--noise_levels 0 --noise_levels 0.5 ...]

The validation tokens are noised as in training at each noise level t (every non-BOS position masked with
probability t, fixed masks), and split into two halves with no position in both (even and odd batches).
At every t, visible and masked positions are scored separately; at a masked position the target is the
category of the hidden clean token, i.e. what the model must infer. For each category and each (t, view):
- the single transcoder feature (any layer) with the best F1 of "fires" against "belongs to the category",
  chosen on one half, its F1 on the other;
- beside it the controls (interp.ground_truth.counts): a random live feature's held-out F1 (mean, 95th, 99th
  percentile over all live features), the same choose-then-score on shuffled labels, a token-id lookup
  that uses no model (perfect-ish on visible text, no better than "everything" at [MASK]), and the same
  lookup on the neighbouring input ids (i − 1, i + 1), which a templated corpus can make strong at [MASK];
- k-sparse probes (k = 1, 2, 5) over the features (interp.ground_truth.probe), with their shuffled-label control;
- at masked positions, the model's own ceiling: how often its argmax token falls in the hidden token's category
  (its category accuracy, which decides the target's eligible categories), and that prediction's F1.
A category is recovered at held-out F1 ≥ 0.8, and credited where that also beats every control. The target
summary: at masked positions with t = 0.5, among categories the model itself infers (accuracy ≥ 0.5), the
share credited to one feature or to a probe. Also: how specifically recovered features' descriptions name the
category (naming.py's credit, with shuffled descriptions as the control) and the model's fact-completion
accuracy beside its chance level.
Printed as tables and saved as ground_truth.json in the run folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from core import checks, cli
from core.cli import arg
from core.files import UserError, read_jsonl, write_json_atomic
from core.locks import hold_output
from data.loader import ShardLoader
from experiment import (
    RunFlags,
    StagePaths,
    load_run,
    load_transcoders,
    resolve_device,
    resolve_run_folder,
    transcoder_layers,
)
from experiment.paths import BASE_MODEL_KEY, CONFIG_FILE, GROUND_TRUTH_FILE
from interp.descriptions.records import TOKENS, read_records
from interp.ground_truth.counts import (
    Positions,
    best_features,
    context_ids,
    context_lookup_control,
    feature_counts,
    lookup_control,
    model_ceiling,
    random_live_features,
    shuffled_label_control,
)
from interp.ground_truth.naming import category_credit, shuffled_naming_rate
from interp.ground_truth.probe import sparse_probes
from interp.ground_truth.report import print_table
from model.fact_eval import fact_accuracy
from model.hooks import capture_mlps
from model.objective import noise_for_model, val_noise

RECOVERED_F1 = 0.8
TARGET_T, TARGET_CEILING = 0.5, 0.5
DEFAULT_VAL_TOKENS = 65_536
NOISE_SEED = 99  # the benchmark's masks, the same for every run


@dataclass
class GroundTruthConfig(RunFlags):
    """Measure how well transcoder features and their descriptions recover the synthetic corpus's concepts,
    at visible and at masked positions, beside controls that use no feature or no model."""

    val_tokens: Optional[int] = arg(None, f"validation tokens to measure F1 on (half choose, half score); default: "
                                          f"{DEFAULT_VAL_TOKENS:,}, or the whole split if it holds fewer",
                                    checks.count(runs=("100_000_000",)))
    noise_levels: list[float] = arg([0.0, 0.25, 0.5, 0.75], "noise levels t to score at (repeat the flag for "
                                    "several); each masks every non-BOS position with probability t", checks.fraction())
    probe_k: list[int] = arg([1, 2, 5], "sizes k of the sparse probes (repeat the flag for several)",
                             checks.count(1, 1000))
    probe_steps: int = arg(15, "Newton iterations (at most) of each probe's logistic regression", checks.count(1, 1000))
    shuffle_repeats: int = arg(3, "label permutations for the shuffled-label control", checks.count(1, 1000))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.noise_levels or not self.probe_k:
            raise ValueError("--noise_levels and --probe_k need at least one value each")


def collect(model, transcoders: dict, loader: ShardLoader, max_tokens: int, t: float, category_of: torch.Tensor,
            offsets: dict[int, int], device) -> tuple[Positions, Positions]:
    """Every non-BOS, non-padding position of the first `max_tokens` validation tokens, noised at level t,
    in two disjoint halves: even batches (where features are chosen) and odd ones (where they are scored)."""
    mc = model.cfg
    n_total = loader.n_sequential(max_tokens)
    halves: tuple[list[Positions], list[Positions]] = ([], [])
    for b, batch in enumerate(loader.sequential(max_tokens)):
        _, u = val_noise(batch.index, n_total, NOISE_SEED, loader.seq_len)
        tokens = batch.tokens.to(device)
        noised = noise_for_model(tokens, torch.full((len(tokens),), t, device=device), u.to(device), mc)
        with torch.no_grad(), capture_mlps(model, list(transcoders)) as seen:
            logits = model(noised.inputs, select=noised.mask).logits  # (masked positions, n_vocab)
            predicted = torch.full_like(tokens, -1)
            predicted[noised.mask] = logits.argmax(-1)
            keep = noised.maskable.reshape(-1)
            feats, acts = [], []
            for layer, tc in transcoders.items():
                enc = tc.encode(seen[layer][0].reshape(-1, mc.model_dim).float())
                feats.append(enc.indices[keep] + offsets[layer])
                acts.append(enc.acts[keep])
        assert batch.labels is not None  # the synthetic corpus labels every token
        cats = category_of[batch.labels.to(device).reshape(-1)[keep]]
        context = context_ids(noised.inputs, mc.vocab_size).reshape(-1)[keep]
        halves[b % 2].append(Positions(cats, noised.mask.reshape(-1)[keep], tokens.reshape(-1)[keep],
                                       noised.inputs.reshape(-1)[keep], predicted.reshape(-1)[keep],
                                       torch.cat(feats, 1), torch.cat(acts, 1), context))
    return Positions.cat(halves[0]), Positions.cat(halves[1])


def score_view(select: Positions, report: Positions, full: tuple[Positions, Positions] | None, n_features: int,
               categories: list[str], vocab: int, cfg: GroundTruthConfig, locate) -> list[dict]:
    """Per category: the best single feature, its controls, the sparse probes and (masked view) the ceiling."""
    C = len(categories)
    sc, rc = feature_counts(select, n_features, C), feature_counts(report, n_features, C)
    best = best_features(sc, rc)
    rand = random_live_features(sc, rc)
    shuf = shuffled_label_control(select, report, n_features, C, cfg.shuffle_repeats)
    lookup = lookup_control(select, report, vocab, C)
    context = context_lookup_control(select, report, C)
    ks = tuple(sorted(set(cfg.probe_k)))
    probes = sparse_probes(select, report, n_features, C, ks, cfg.probe_steps)
    g = torch.Generator().manual_seed(1)
    probes_shuf = sparse_probes(select.permuted(g), report.permuted(g), n_features, C, ks, cfg.probe_steps)
    ceiling = model_ceiling(*full, vocab, C) if full is not None else None
    rows = []
    for c, cat in enumerate(categories):
        held = float(best.f1_heldout[c])
        controls = max(float(rand.p99[c]), float(shuf.max[c]), float(lookup[c]), float(context[c]))
        no_model = max(float(lookup[c]), float(context[c]))
        probe_rows: dict[str, dict] = {}
        for k in ks:
            p, ps = probes[k], probes_shuf[k]
            f1 = float(p.f1_heldout[c])
            probe_rows[str(k)] = {"features": [list(locate(int(f))) for f in p.features[c]],
                                  "f1_selection": float(p.f1_selection[c]), "f1_heldout": f1,
                                  "shuffled_labels": float(ps.f1_heldout[c]),
                                  "credited": f1 >= RECOVERED_F1 and f1 > max(float(ps.f1_heldout[c]), no_model)}
        chosen_k = max(ks, key=lambda k: (round(probe_rows[str(k)]["f1_selection"], 6), -k))
        layer, feature = locate(int(best.feature[c]))
        rows.append({
            "category": cat, "tokens_selection": int(sc.in_cat[c]), "tokens_heldout": int(rc.in_cat[c]),
            "scored": bool(sc.in_cat[c] > 0 and rc.in_cat[c] > 0),
            "layer": layer, "feature": feature, "f1_selection": float(best.f1_selection[c]), "f1_heldout": held,
            "random_feature": {"mean": float(rand.mean[c]), "p95": float(rand.p95[c]), "p99": float(rand.p99[c]),
                               "n_live": rand.n},
            "shuffled_labels": {"mean": float(shuf.mean[c]), "max": float(shuf.max[c])},
            "lookup": float(lookup[c]), "context_lookup": float(context[c]),
            "recovered": held >= RECOVERED_F1, "beats_controls": held > controls,
            "credited": held >= RECOVERED_F1 and held > controls,
            "probe": probe_rows, "probe_chosen_k": chosen_k,
            "ceiling": None if ceiling is None else {"f1": float(ceiling[0][c]), "recall": float(ceiling[1][c])},
        })
    return rows


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict], ks: list[int]) -> dict:
    s = [r for r in rows if r["scored"]]
    if not s:
        return {"categories_scored": 0}
    out = {"categories_scored": len(s),
           "mean_f1_selection": _mean([r["f1_selection"] for r in s]),
           "mean_f1_heldout": _mean([r["f1_heldout"] for r in s]),
           "mean_random_feature": _mean([r["random_feature"]["mean"] for r in s]),
           "mean_random_feature_p99": _mean([r["random_feature"]["p99"] for r in s]),
           "mean_shuffled_labels": _mean([r["shuffled_labels"]["mean"] for r in s]),
           "mean_lookup": _mean([r["lookup"] for r in s]),
           "mean_context_lookup": _mean([r.get("context_lookup") for r in s]),
           "mean_probe_heldout": {str(k): _mean([r["probe"][str(k)]["f1_heldout"] for r in s]) for k in ks},
           "mean_probe_shuffled": {str(k): _mean([r["probe"][str(k)]["shuffled_labels"] for r in s]) for k in ks},
           "mean_ceiling": _mean([r["ceiling"]["f1"] if r["ceiling"] else None for r in s]),
           "mean_ceiling_accuracy": _mean([r["ceiling"]["recall"] if r["ceiling"] else None for r in s]),
           "fraction_recovered": sum(r["recovered"] for r in s) / len(s),
           "fraction_credited": sum(r["credited"] for r in s) / len(s),
           "fraction_credited_probe": sum(r["probe"][str(r["probe_chosen_k"])]["credited"] for r in s) / len(s)}
    return out


def benchmark_target(conditions: list[dict]) -> dict | None:
    """At masked positions, t = 0.5: among categories whose ceiling is at least 0.5, the share recovered
    (held-out F1 ≥ 0.8 and above its controls) by one feature, by the probe (the k with the best F1 where it
    was fitted), by either."""
    cond = next((c for c in conditions if c["positions"] == "masked" and abs(c["t"] - TARGET_T) < 1e-9), None)
    if cond is None:
        return None
    # the model's own category accuracy at the category's masked positions (the ceiling's recall)
    eligible = [r for r in cond["categories"] if r["scored"] and r["ceiling"]["recall"] >= TARGET_CEILING]
    n = len(eligible)
    feat = [r["category"] for r in eligible if r["credited"]]
    probe = [r["category"] for r in eligible if r["probe"][str(r["probe_chosen_k"])]["credited"]]
    either = sorted(set(feat) | set(probe))
    return {"t": TARGET_T, "positions": "masked", "ceiling_at_least": TARGET_CEILING,
            "recovered_f1": RECOVERED_F1, "eligible": [r["category"] for r in eligible],
            "credited_feature": feat, "credited_probe": probe, "credited_either": either,
            "share_feature": len(feat) / n if n else None, "share_probe": len(probe) / n if n else None,
            "share_either": len(either) / n if n else None}


def name_check(rows: list[dict], by_feature: dict, explainers: list[str], members: dict, records: list[dict]) -> dict:
    """How specifically each recovered feature's description names its category (interp.ground_truth.naming's credit:
    0, or 1 / the number of categories it names), and the same credit for shuffled descriptions."""
    for r in rows:
        descs = by_feature.get((r["layer"], r["feature"]), {})
        r["descriptions"] = {ex: descs.get(ex) for ex in explainers}
        r["naming_credit"] = {ex: category_credit(descs.get(ex), r["category"], members) for ex in explainers}
    recovered = [r for r in rows if r["recovered"] and r["scored"]]
    pools = {ex: [r["description"] for r in records if r["explainer"] == ex and r["description"]] for ex in explainers}
    return {"named_among_recovered": {ex: (sum(r["naming_credit"][ex] for r in recovered) / len(recovered)
                                           if recovered else None) for ex in explainers},
            "named_shuffled_control": {ex: shuffled_naming_rate(recovered, pools[ex], members, ex)
                                       for ex in explainers}}


def window_length(config: dict, transcoders_dir: Path) -> int:
    """The validation windows' length: the run's training length, or for a run made from a released model
    (which states no training length of its own) the length its transcoders were trained on."""
    if BASE_MODEL_KEY not in config:
        return config["train"]["train_seq_len"]
    return json.loads((transcoders_dir / CONFIG_FILE).read_text())["train_seq_len"]


def run_ground_truth(cfg: GroundTruthConfig) -> dict:
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
    offsets, n_features = {}, 0
    for layer in layers:
        offsets[layer], n_features = n_features, n_features + transcoders[layer].cfg.num_latents
    starts = torch.tensor([offsets[layer] for layer in layers])

    def locate(g: int) -> tuple[int, int]:
        i = int(torch.searchsorted(starts, torch.tensor(g), right=True)) - 1
        return layers[i], g - int(starts[i])

    loader = ShardLoader(data_dir, "val", window_length(config, paths.transcoders), 8)
    have = loader.n_windows * loader.seq_len
    if cfg.val_tokens is not None and cfg.val_tokens > have:
        raise UserError(f"--val_tokens {cfg.val_tokens:,}: the validation split of {data_dir} holds {have:,} tokens "
                        f"({loader.n_windows:,} windows of {loader.seq_len}); give at most {have:,}")
    val_tokens = cfg.val_tokens or min(DEFAULT_VAL_TOKENS, have)
    if loader.n_sequential(val_tokens) <= loader.batch_size:
        raise UserError(f"--val_tokens {val_tokens} covers one batch of validation windows: the benchmark "
                        "chooses on one half and scores on another, so give at least two batches' worth")
    records = read_records(paths.records)
    by_feature: dict[tuple[int, int], dict[str, str | None]] = {}
    for r in records:
        by_feature.setdefault((r["layer"], r["feature"]), {})[r["explainer"]] = r["description"]
    explainers = sorted({r["explainer"] for r in records})
    vocab = max(model.cfg.vocab_size, model.cfg.mask_id + 1)
    ks = sorted(set(cfg.probe_k))
    conditions = []
    for t in sorted(set(cfg.noise_levels)):
        select, report = collect(model, transcoders, loader, val_tokens, t, category_of, offsets, device)
        for view in ("visible", "masked"):
            sel, rep = select.view(masked=view == "masked"), report.view(masked=view == "masked")
            if not len(sel.cats) or not len(rep.cats):
                continue  # t = 0 has no masked positions, t = 1 no visible ones
            rows = score_view(sel, rep, (select, report) if view == "masked" else None, n_features, categories,
                              vocab, cfg, locate)
            # naming only where the table prints it (the shuffled-description control costs ~50 checks a row)
            detailed = (t == 0 and view == "visible") or (view == "masked" and abs(t - TARGET_T) < 1e-9)
            naming = name_check(rows, by_feature, explainers, members, records) if detailed else {}
            conditions.append({"t": t, "positions": view, "positions_selection": len(sel.cats),
                               "positions_heldout": len(rep.cats), **summarise(rows, ks), **naming,
                               "categories": rows})
    facts = read_jsonl(data_dir / meta["facts"])
    with torch.no_grad():
        facts_result = fact_accuracy(model, tok, facts)
    fact_keys = ("accuracy", "chance", "chance_uniform", "chance_majority", "chance_shuffled", "by_phrasing")
    result = {"checkpoint": ckpt.name, "val_tokens": val_tokens, "noise_levels": sorted(set(cfg.noise_levels)),
              "probe_k": ks,
              "selection": "chosen on the even validation batches, scored on the odd ones (no position in both); "
                           "visible and masked positions scored separately at each noise level",
              "recovered_threshold": RECOVERED_F1,
              "credit": "recovered (held-out F1 ≥ threshold) and above every control: the random live feature's "
                        "99th percentile, the shuffled-label choice's largest held-out F1, the token-id lookup, the "
                        "context lookup (the input ids at i - 1 and i + 1)",
              "conditions": conditions, "benchmark_target": benchmark_target(conditions),
              "naming_not_evidence": [ex for ex in explainers if ex == TOKENS],
              "fact_completion": {k: facts_result[k] for k in fact_keys if k in facts_result}}
    write_json_atomic(folder / GROUND_TRUTH_FILE, result)
    print_table(result, explainers)
    print(f"saved {folder / GROUND_TRUTH_FILE}")
    return result


def main(cfg: GroundTruthConfig) -> dict:
    folder = resolve_run_folder(cfg.train_folder)
    with hold_output(folder / GROUND_TRUTH_FILE):  # two runs at once would each overwrite the other's result
        return run_ground_truth(cfg)


def command() -> None:
    """`python -m interp.ground_truth` (interp/ground_truth/__main__.py)."""
    cli.run(main, GroundTruthConfig, description=GroundTruthConfig.__doc__)


if __name__ == "__main__":
    command()
