"""Features, examples and descriptions in Neuronpedia's import layout: `python -m interp.exports.neuronpedia`.

    python -m interp.exports.neuronpedia --train_folder experiments/X [--checkpoint_name latest] [--output DIR]
        [--model_id NAME] [--source_set NAME] [--creator_id ID] [--creator_name TEXT] [--overwrite True]

Writes (default `experiments/X/exports/neuronpedia/<checkpoint stem>/`) a folder laid out like the root (`v1/`)
of Neuronpedia's dataset bucket, which its admin import reads (hijohnnylin/neuronpedia at ebb8426f,
apps/webapp/app/api/admin/import/route.ts):

    config/explanation_model_type.jsonl        one row per explainer ("tokens-baseline": the model-free `tokens`)
    config/explanation_score_type.jsonl        one row per score this project computes
    config/explanation_score_model.jsonl       one row per judge ("model-free" for the keyword match)
    config/explanation_type.jsonl, eval_type.jsonl   empty (the importer reads them)
    <model_id>/<layer>-<source_set>/           one Neuronpedia "source" per layer's transcoder:
        release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one row each
        features/batch-N.jsonl.gz              table "Neuron": every feature with its statistics
        activations/batch-N.jsonl.gz           table "Activation": the scan's top and quantile examples
        explanations/batch-N.jsonl.gz          table "Explanation": every description, every explainer
        explanation_scores/batch-N.jsonl.gz    table "ExplanationScore": each description's scores (the admin
                                               import does not read these; they are rows of that table)

Every line is one row of the table, keyed by the column names of Neuronpedia's Prisma schema
(apps/webapp/prisma/schema.prisma); every line of a file has the same keys (the importer takes the columns from
the first line) and no null in a column that is not nullable. Batches hold 1,024 rows, like Neuronpedia's own
exports. Ids are made from the model, source, feature and example, so importing twice adds nothing.

What maps to what: a feature's `frequency` is `frac_nonzero`, its `max_activation` `maxActApprox`, its
histogram (bins over (0, max]) `freq_hist_data_bar_*` (bin centres, counts), the tokens its decoder promotes
and suppresses (when the scan wrote them) `pos_str`/`pos_values` and `neg_str`/`neg_values`. An example's
tokens are the window as the model saw it, a masked token as " [MASK]", with its per-token activations; its
scan position is `dataIndex` and its centre `qualifyingTokenIndex`. The non-activating (random) windows are
left out: every value is zero. A description's `scoreV1` (what Neuronpedia sorts a feature's explanations by)
is the first defined of detection AUROC, fuzzing balanced accuracy, simulation correlation and keyword-match
correlation; every score is an ExplanationScore row.

Nothing of Neuronpedia is imported: the rows are written from the field definitions alone.
"""
from __future__ import annotations

import datetime
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from core import checks as c, cli
from core.cli import arg
from core.files import UserError, read_json
from core.locks import Replacement, hold_output
from experiment import RunFlags, StagePaths, hookpoint, layer_name, resolve_checkpoint, resolve_run_folder
from experiment.paths import CONFIG_FILE, CONTEXTS_FILE, FEATURES_FILE, INDEX_FILE, export_folder, transcoder_dir
from interp.contexts.store import read_index, read_jsonl
from interp.descriptions.prompts import MASK_SHOWN
from interp.descriptions.records import OLDER_TOKEN_MATCH, TOKENS, all_records, measured_scores

EXPORT_NAME = "neuronpedia"
BATCH_ROWS = 1024  # rows per batch file, as in Neuronpedia's own exports
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the "bot" user a self-hosted instance's seed creates
TOKENS_BASELINE = "tokens-baseline"  # the model-free `tokens` explainer, as an explanation model name
MODEL_FREE = "model-free"  # the "judge" of the keyword match, which reads no model
SHOWN_MASK = f" {MASK_SHOWN}"
EXAMPLE_CATEGORIES = ("top", "quantile")  # "random": non-activating windows, every value zero
# (scorer, metric, display name, what it measures): each an ExplanationScore type; in this order for scoreV1
SCORES = (
    ("detection", "auroc", "Detection AUROC",
     "AUROC of the judge's P(yes) that the description fits a held-out window, activating vs non-activating"),
    ("fuzzing", "balanced_accuracy", "Fuzzing balanced accuracy",
     "balanced accuracy of the judge telling correctly marked activating tokens from wrongly marked ones"),
    ("simulation", "correlation", "Simulation correlation",
     "correlation of the judge's predicted per-token activations (0-9) with the true ones, held-out windows"),
    ("token_match", "correlation", "Keyword-match correlation",
     "correlation of 'a visible token is one of the description's quoted words' with the activations (model-free)"),
    ("detection", "balanced_accuracy", "Detection balanced accuracy",
     "balanced accuracy of the judge's yes/no (P(yes) >= 0.5) on held-out activating and non-activating windows"),
    ("fuzzing", "auroc", "Fuzzing AUROC",
     "AUROC of the judge's P(yes) on correctly vs wrongly marked activating windows"),
)
HEADLINE = SCORES[:4]
MODEL_ID_RE = re.compile(r"^[a-z0-9_-]{1,128}$")  # Neuronpedia's Model.id (lowercased)


def score_type_name(scorer: str, metric: str) -> str:
    return f"diffusion-interp-{scorer}-{metric}".replace("_", "-")


def explainer_model_name(explainer: str) -> str:
    """An explainer's name as a Neuronpedia explanation model: the `tokens` baseline named as one."""
    return TOKENS_BASELINE if explainer == TOKENS else explainer


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_model_id(folder: Path) -> str:
    return ("diffusionlm-" + re.sub(r"[^a-z0-9_-]+", "-", folder.name.lower()).strip("-"))[:128]


def source_id(layer: int, source_set: str) -> str:
    """Neuronpedia's source id: the layer first (its pages read the layer from it), then the set."""
    return f"{layer}-{source_set}"


def feature_row(stats: dict, model_id: str, source: str, source_set: str, creator_id: str, created: str) -> dict:
    """A "Neuron" row: one feature with its statistics."""
    hist = stats.get("histogram") or {}
    counts, top = hist.get("counts") or [], float(hist.get("bin_edges_max") or 0.0)
    width = top / len(counts) if counts else 0.0
    promotes, suppresses = stats.get("promotes") or [], stats.get("suppresses") or []
    return {"modelId": model_id, "layer": source, "index": str(stats["feature"]), "sourceSetName": source_set,
            "creatorId": creator_id, "createdAt": created, "maxActApprox": float(stats["max_activation"]),
            "hasVector": False, "frac_nonzero": float(stats["frequency"]),
            "freq_hist_data_bar_values": [round((i + 0.5) * width, 6) for i in range(len(counts))],
            "freq_hist_data_bar_heights": [float(n) for n in counts],
            "pos_str": [p for p, _ in promotes], "pos_values": [float(v) for _, v in promotes],
            "neg_str": [p for p, _ in suppresses], "neg_values": [float(v) for _, v in suppresses]}


def shown_tokens(example: dict) -> list[str]:
    """The window's tokens as the model saw them: a masked position is " [MASK]"."""
    hidden = set(example.get("masked_at", ()))
    return [SHOWN_MASK if i in hidden else piece for i, piece in enumerate(example["pieces"])]


def activation_rows(contexts: dict, model_id: str, source: str, creator_id: str, created: str) -> Iterator[dict]:
    """"Activation" rows: a feature's top and quantile examples, each with its per-token values."""
    feature = contexts["feature"]
    for category in EXAMPLE_CATEGORIES:
        for i, e in enumerate(contexts.get(category, ())):
            values = [float(a) for a in e["acts"]]
            if not values:
                continue
            top = max(values)
            yield {"id": f"{model_id}@{source}#{feature}:{category}{i}", "modelId": model_id, "layer": source,
                   "index": str(feature), "tokens": shown_tokens(e), "values": values, "maxValue": top,
                   "maxValueTokenIndex": values.index(top), "minValue": min(values),
                   "qualifyingTokenIndex": int(e["center"]), "dataIndex": str(e["position"]), "dataSource": None,
                   "creatorId": creator_id, "createdAt": created}


def defined(score: dict | None, metric: str) -> float | None:
    value = (score or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def explanation_rows(record: dict, model_id: str, source: str, creator_id: str,
                     created: str) -> tuple[dict, list[dict]]:
    """An "Explanation" row for one description, and its "ExplanationScore" rows."""
    scores = {k: v for k, v in measured_scores(record).items() if k != OLDER_TOKEN_MATCH}  # hidden words too: left out
    explainer = explainer_model_name(record["explainer"])
    eid = f"{model_id}@{source}#{record['feature']}:{slug(explainer)}"
    headline = next((v for s, m, *_ in HEADLINE if (v := defined(scores.get(s), m)) is not None), None)
    parts = [f"{name} {v:.3f}" for s, m, name, _ in SCORES if (v := defined(scores.get(s), m)) is not None]
    judge = record.get("judge")
    notes = f"explainer: {explainer}" + (f"; judge: {judge}" if judge else "") + (
        "; " + ", ".join(parts) if parts else "; no defined score")
    row = {"id": eid, "modelId": model_id, "layer": source, "index": str(record["feature"]),
           "description": record["description"], "authorId": creator_id, "explanationModelName": explainer,
           "typeName": None, "scoreV1": headline if headline is not None else 0.0, "scoreV2": None,
           "notes": notes, "createdAt": created, "updatedAt": created}
    score_rows = []
    for scorer, metric, _, _ in SCORES:
        value = defined(scores.get(scorer), metric)
        if value is None:
            continue
        score_rows.append({"id": f"{eid}:{score_type_name(scorer, metric)}", "explanationId": eid, "value": value,
                           "explanationScoreTypeName": score_type_name(scorer, metric),
                           "explanationScoreModelName": MODEL_FREE if scorer == "token_match" else
                           str(judge or MODEL_FREE),
                           "initiatedByUserId": creator_id, "jsonDetails": json.dumps(scores[scorer]),
                           "createdAt": created})
    return row, score_rows


def config_rows(records: list[dict], creator_id: str, creator_name: str, created: str) -> dict[str, list[dict]]:
    """The config rows the explanations refer to: their explanation models, score types and score models."""
    explainers = sorted({explainer_model_name(r["explainer"]) for r in records})
    models = [{"name": e, "displayName": e, "featured": True, "creatorName": creator_name, "url": None,
               "description": ("model-free baseline of diffusion-interp: lists the tokens a feature fires on "
                               "(no LLM)") if e == TOKENS_BASELINE else f"LLM explainer {e} (diffusion-interp)",
               "createdAt": created, "updatedAt": created} for e in explainers]
    score_types = [{"name": score_type_name(s, m), "displayName": name, "description": what, "featured": True,
                    "isAttention": False, "scoreDescription": what, "creatorName": creator_name,
                    "creatorId": creator_id, "createdAt": created, "updatedAt": created} for s, m, name, what in SCORES]
    judges = sorted({str(r["judge"]) for r in records if r.get("judge")} | {MODEL_FREE})
    score_models = [{"name": j, "displayName": j, "featured": True, "creatorName": creator_name,
                     "description": "no model: the keyword match reads the description's quoted words"
                     if j == MODEL_FREE else f"judge model {j} (diffusion-interp)",
                     "createdAt": created, "updatedAt": created} for j in judges]
    return {"explanation_model_type": models, "explanation_score_type": score_types,
            "explanation_score_model": score_models, "explanation_type": [], "eval_type": []}


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_batches(folder: Path, rows: Iterable[dict]) -> int:
    """`folder/batch-N.jsonl.gz`, BATCH_ROWS rows each (none written for no rows). Returns the rows written."""
    n, batch = 0, 0
    chunk: list[dict] = []

    def flush() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk).encode("utf-8")
        with open(folder / f"batch-{batch}.jsonl.gz", "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb",
                                                                                 mtime=0) as gz:
            gz.write(data)

    for row in rows:
        chunk.append(row)
        n += 1
        if len(chunk) == BATCH_ROWS:
            flush()
            batch, chunk = batch + 1, []
    if chunk:
        flush()
    return n


@dataclass
class NeuronpediaExportConfig(RunFlags):
    """Export a checkpoint's features, examples and descriptions in Neuronpedia's import layout."""

    output: str = arg("", "the folder to write (default: experiments/X/exports/neuronpedia/<checkpoint stem>/)",
                      c.OUT_FOLDER)
    model_id: str = arg("", "the Neuronpedia model id: lowercase letters, digits, '_' or '-' (default: "
                            "diffusionlm-<run folder name>)", c.Kind("name or nothing", lambda flag, v:
                                                                     c.NAME.test(flag, v) if v else None,
                                                                     c.NAME.bad[1:]))
    source_set: str = arg("topk-tc", "the Neuronpedia source set: layer N's transcoder is source N-<source_set>",
                          c.NAME)
    creator_id: str = arg(DEFAULT_CREATOR_ID, "the Neuronpedia user id every row is created by (default: the bot "
                                              "user a self-hosted instance's seed creates)", c.NAME)
    creator_name: str = arg("diffusion-interp", "the creator's name shown on the release and source set", c.TEXT)
    overwrite: bool = arg(False, "replace an existing export")


def main(cfg: NeuronpediaExportConfig) -> Path:
    """The export, under its sibling lock `.<name>.lock`."""
    folder = resolve_run_folder(cfg.train_folder)
    with hold_output(export_folder(folder, EXPORT_NAME, resolve_checkpoint(folder, cfg.checkpoint_name), cfg.output)):
        return export(cfg)


def _transcoder_note(tc_dir: Path, layer: int) -> str:
    path = transcoder_dir(tc_dir, layer) / "cfg.json"
    tc = read_json(path) if path.is_file() else {}
    return (f"TopK transcoder of {hookpoint(layer)} (k={tc.get('k', '?')}, {tc.get('num_latents', '?')} features) "
            "of a masked-diffusion LM (diffusion-interp); examples are windows as the model saw them, "
            "masked tokens shown as [MASK]")


def export(cfg: NeuronpediaExportConfig) -> Path:
    folder = resolve_run_folder(cfg.train_folder)
    ckpt = resolve_checkpoint(folder, cfg.checkpoint_name)
    paths = StagePaths(folder, ckpt.name)
    if not (paths.topk / INDEX_FILE).is_file():
        raise UserError(f"no finished scan in {paths.topk}: run get_topk_activations.py for this checkpoint first")
    model_id = cfg.model_id or default_model_id(folder)
    if not MODEL_ID_RE.match(model_id):
        raise UserError(f"--model_id {model_id!r}: Neuronpedia's model ids are lowercase letters, digits, '_' or "
                        "'-' (at most 128)")
    out = export_folder(folder, EXPORT_NAME, ckpt, cfg.output)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists; --overwrite True replaces it")
    index = read_index(paths.topk)
    settings, layers = index.get("settings") or {}, index["layers"]
    model_cfg = read_json(folder / CONFIG_FILE).get("model", {})
    run_cfg = read_json(folder / CONFIG_FILE)
    dataset = str(run_cfg.get("data", {}).get("params", {}).get("dataset", "?"))
    # everything read (a damaged file is one UserError) before anything is written
    stats = {layer: read_jsonl(paths.topk / layer_name(layer) / FEATURES_FILE) for layer in layers}
    records = [r for r in all_records(paths.records) if r["layer"] in layers and r.get("description") is not None]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    creator = cfg.creator_id
    widths = {len(s) for s in stats.values()}
    model_row = {"id": model_id, "displayName": f"DiffusionLM {folder.name}", "displayNameShort": model_id,
                 "creatorId": creator, "owner": cfg.creator_name, "visibility": "PUBLIC", "instruct": False,
                 "inferenceEnabled": False, "tlensId": None, "dimension": model_cfg.get("model_dim"),
                 "layers": int(model_cfg.get("num_layers", len(layers))),
                 "neuronsPerLayer": int(model_cfg.get("model_dim", 0) * model_cfg.get("mlp_ratio", 4.0)),
                 "website": None, "createdAt": created, "updatedAt": created}
    release_row = {"name": model_id, "description": f"TopK transcoders of the masked-diffusion LM {folder.name} "
                   f"(checkpoint {ckpt.name}), described by diffusion-interp", "descriptionShort": model_id,
                   "urls": [], "creatorName": cfg.creator_name, "creatorNameShort": cfg.creator_name,
                   "creatorId": creator, "visibility": "PUBLIC", "createdAt": created}
    set_row = {"modelId": model_id, "name": cfg.source_set, "creatorId": creator, "creatorName": cfg.creator_name,
               "description": "MLP transcoders (TopK" + (f", {widths.pop()} features" if len(widths) == 1 else "")
               + ")", "type": "", "urls": [], "releaseName": model_id, "visibility": "PUBLIC",
               "hasDashboards": True, "createdAt": created}
    written: dict[int, dict[str, int]] = {}
    with Replacement(out) as rep:
        for name, rows in config_rows(records, creator, cfg.creator_name, created).items():
            write_jsonl(rep.work / "config" / f"{name}.jsonl", rows)
        for layer in layers:
            source = source_id(layer, cfg.source_set)
            d = rep.work / model_id / source
            write_jsonl(d / "release.jsonl", [release_row])
            write_jsonl(d / "model.jsonl", [model_row])
            write_jsonl(d / "sourceset.jsonl", [set_row])
            write_jsonl(d / "source.jsonl", [{
                "id": source, "modelId": model_id, "setName": cfg.source_set, "creatorId": creator,
                "visibility": "PUBLIC", "hasDashboards": True, "inferenceEnabled": False, "dataset": dataset,
                "num_prompts": int(settings.get("scan_batches", 0)) * int(settings.get("batch_size", 0)) or None,
                "num_tokens_in_prompt": settings.get("train_seq_len"), "hfRepoId": None, "hfFolderId": None,
                "notes": _transcoder_note(paths.transcoders, layer), "createdAt": created}])
            w = written[layer] = {}
            w["features"] = write_batches(d / "features", (feature_row(s, model_id, source, cfg.source_set,
                                                                       creator, created) for s in stats[layer]))
            w["activations"] = write_batches(d / "activations", (
                row for ctx in read_jsonl(paths.topk / layer_name(layer) / CONTEXTS_FILE)
                for row in activation_rows(ctx, model_id, source, creator, created)))
            pairs = [explanation_rows(r, model_id, source, creator, created) for r in records if r["layer"] == layer]
            w["explanations"] = write_batches(d / "explanations", (e for e, _ in pairs))
            w["explanation scores"] = write_batches(d / "explanation_scores", (s for _, ss in pairs for s in ss))
        rep.commit()
    for layer, w in written.items():
        print(f"{model_id}/{source_id(layer, cfg.source_set)}: " + ", ".join(f"{v:,} {k}" for k, v in w.items()))
    if not records:
        print(f"no descriptions in {paths.records} yet: features and examples alone were exported")
    print(f"neuronpedia export: {out}")
    return out


if __name__ == "__main__":
    cli.run(main, NeuronpediaExportConfig, description=NeuronpediaExportConfig.__doc__)
