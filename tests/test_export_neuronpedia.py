"""Features, examples and descriptions as Neuronpedia's admin import reads them.

Neuronpedia publishes no JSON schema or Python loader for its import files: its importer
(apps/webapp/app/api/admin/import/route.ts, apps/webapp/lib/db/import.ts) inserts each gunzipped JSON line as
a row of the Postgres table its Prisma schema defines (apps/webapp/prisma/schema.prisma), the line's keys
taken as column names (those of the first line, for the whole file). So the test reads the export the way the
importer does and checks every row against the columns of that schema, written out below from
github.com/hijohnnylin/neuronpedia at commit ebb8426fc550ad5d1f76d52c271a624af3c08a57: each column's type,
whether it may be null, and whether a row must give it (not nullable, no default). The values must be this
project's features.jsonl, contexts.jsonl and descriptions.jsonl.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error, run_cli

S, N, F, B = "str", "int", "float", "bool"  # DateTime and enums travel as JSON strings
LS, LN, LF = "list[str]", "list[int]", "list[float]"
# table → column → (type, nullable, required); relation fields (not columns) and the pgvector column left out
SCHEMA: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "Neuron": {
        "modelId": (S, False, True), "layer": (S, False, True), "index": (S, False, True),
        "sourceSetName": (S, True, False), "creatorId": (S, True, False), "createdAt": (S, False, False),
        "maxActApprox": (F, True, False), "hasVector": (B, False, False), "vector": (LF, False, False),
        "vectorLabel": (S, True, False), "vectorDefaultSteerStrength": (F, True, False), "hookName": (S, True, False),
        "topkCosSimIndices": (LN, False, False), "topkCosSimValues": (LF, False, False),
        "neuron_alignment_indices": (LN, False, False), "neuron_alignment_values": (LF, False, False),
        "neuron_alignment_l1": (LF, False, False), "correlated_neurons_indices": (LN, False, False),
        "correlated_neurons_pearson": (LF, False, False), "correlated_neurons_l1": (LF, False, False),
        "correlated_features_indices": (LN, False, False), "correlated_features_pearson": (LF, False, False),
        "correlated_features_l1": (LF, False, False), "neg_str": (LS, False, False), "neg_values": (LF, False, False),
        "pos_str": (LS, False, False), "pos_values": (LF, False, False), "frac_nonzero": (F, False, False),
        "freq_hist_data_bar_heights": (LF, False, False), "freq_hist_data_bar_values": (LF, False, False),
        "logits_hist_data_bar_heights": (LF, False, False), "logits_hist_data_bar_values": (LF, False, False),
        "decoder_weights_dist": (LF, False, False), "umap_cluster": (N, True, False),
        "umap_log_feature_sparsity": (F, True, False), "umap_x": (F, True, False), "umap_y": (F, True, False)},
    "Activation": {
        "id": (S, False, False), "tokens": (LS, False, True), "dataIndex": (S, True, False), "index": (S, False, True),
        "layer": (S, False, True), "modelId": (S, False, True), "dataSource": (S, True, False),
        "maxValue": (F, False, True), "maxValueTokenIndex": (N, False, True), "minValue": (F, False, True),
        "values": (LF, False, True), "dfaValues": (LF, False, False), "dfaTargetIndex": (N, True, False),
        "dfaMaxValue": (F, True, False), "zQIndices": (LN, False, False), "zKIndices": (LN, False, False),
        "zValues": (LF, False, False), "creatorId": (S, False, True), "createdAt": (S, False, False),
        "lossValues": (LF, False, False), "logitContributions": (S, True, False), "binMin": (F, True, False),
        "binMax": (F, True, False), "binContains": (F, True, False), "qualifyingTokenIndex": (N, True, False)},
    "Explanation": {
        "id": (S, False, False), "modelId": (S, False, True), "layer": (S, False, True), "index": (S, False, True),
        "description": (S, False, True), "authorId": (S, False, True), "triggeredByUserId": (S, True, False),
        "notes": (S, True, False), "scoreV1": (F, False, False), "scoreV2": (F, True, False),
        "umap_x": (F, True, False), "umap_y": (F, True, False), "umap_cluster": (N, True, False),
        "umap_log_feature_sparsity": (F, True, False), "typeName": (S, True, False),
        "explanationModelName": (S, True, False), "createdAt": (S, False, False), "updatedAt": (S, False, False)},
    "ExplanationScore": {
        "id": (S, False, False), "initiatedByUserId": (S, False, True), "value": (F, False, True),
        "explanationId": (S, False, True), "explanationScoreTypeName": (S, False, True),
        "explanationScoreModelName": (S, False, True), "jsonDetails": (S, False, False),
        "createdAt": (S, False, False)},
    "Model": {
        "id": (S, False, True), "displayNameShort": (S, False, False), "displayName": (S, False, False),
        "creatorId": (S, False, True), "tlensId": (S, True, False), "openRouterId": (S, True, False),
        "dimension": (N, True, False), "thinking": (B, False, False), "visibility": (S, False, False),
        "defaultSourceSetName": (S, True, False), "defaultSourceId": (S, True, False),
        "defaultGraphSourceSetName": (S, True, False), "inferenceEnabled": (B, False, False),
        "instruct": (B, False, False), "layers": (N, False, True), "neuronsPerLayer": (N, False, True),
        "createdAt": (S, False, False), "owner": (S, False, True), "updatedAt": (S, False, False),
        "website": (S, True, False)},
    "Source": {
        "id": (S, False, True), "modelId": (S, False, True), "hasDashboards": (B, False, False),
        "inferenceEnabled": (B, False, False), "saelensConfig": ("json", True, False),
        "saelensRelease": (S, True, False), "saelensSaeId": (S, True, False), "hfRepoId": (S, True, False),
        "hfFolderId": (S, True, False), "visibility": (S, False, False), "defaultOfModelId": (S, True, False),
        "setName": (S, False, True), "creatorId": (S, False, True), "hasUmap": (B, False, False),
        "hasUmapLogSparsity": (B, False, False), "hasUmapClusters": (B, False, False), "num_prompts": (N, True, False),
        "num_tokens_in_prompt": (N, True, False), "dataset": (S, True, False), "notes": (S, True, False),
        "cosSimMatchModelId": (S, True, False), "cosSimMatchSourceId": (S, True, False),
        "createdAt": (S, False, False)},
    "SourceSet": {
        "modelId": (S, False, True), "name": (S, False, True), "hasDashboards": (B, False, False),
        "allowInferenceSearch": (B, False, False), "visibility": (S, False, False), "description": (S, False, True),
        "type": (S, False, False), "creatorName": (S, False, True), "urls": (LS, False, True),
        "creatorEmail": (S, True, False), "creatorId": (S, False, True), "releaseName": (S, True, False),
        "hasGraphs": (B, False, False), "graphEnabled": (B, False, False), "similarityMatrixEnabled": (B, False, False),
        "defaultOfModelId": (S, True, False), "defaultGraphModelId": (S, True, False),
        "defaultRange": (N, False, False),
        "defaultShowBreaks": (B, False, False), "showDfa": (B, False, False), "showCorrelated": (B, False, False),
        "showHeadAttribution": (B, False, False), "showUmap": (B, False, False), "createdAt": (S, False, False)},
    "SourceRelease": {
        "name": (S, False, True), "visibility": (S, False, False), "isNewUi": (B, False, False),
        "featured": (B, False, False), "description": (S, False, True), "descriptionShort": (S, True, False),
        "urls": (LS, False, True), "creatorEmail": (S, True, False), "creatorName": (S, False, True),
        "creatorNameShort": (S, True, False), "creatorId": (S, False, True), "defaultSourceSetName": (S, True, False),
        "defaultSourceId": (S, True, False), "defaultUmapSourceIds": (LS, False, False),
        "createdAt": (S, False, False)},
    "ExplanationModelType": {
        "name": (S, False, True), "displayName": (S, False, True), "description": (S, False, True),
        "featured": (B, False, False), "openRouterModelId": (S, True, False), "url": (S, True, False),
        "creatorName": (S, False, True), "createdAt": (S, False, False), "updatedAt": (S, False, False)},
    "ExplanationScoreType": {
        "name": (S, False, True), "displayName": (S, False, True), "description": (S, False, True),
        "featured": (B, False, False), "isAttention": (B, False, False), "scoreDescription": (S, True, False),
        "scorerModel": (S, True, False), "settings": (S, True, False), "url": (S, True, False),
        "creatorName": (S, False, True), "creatorId": (S, False, True), "createdAt": (S, False, False),
        "updatedAt": (S, False, False)},
    "ExplanationScoreModel": {
        "name": (S, False, True), "displayName": (S, False, True), "description": (S, False, True),
        "featured": (B, False, False), "openRouterModelId": (S, True, False), "url": (S, True, False),
        "creatorName": (S, False, True), "createdAt": (S, False, False), "updatedAt": (S, False, False)},
}
VISIBILITY = {"PUBLIC", "UNLISTED", "PRIVATE"}  # the schema's enum Visibility
# where the importer reads each table (route.ts: a source folder's files and batch folders; config/ at the root)
SOURCE_FILES = {"release.jsonl": "SourceRelease", "model.jsonl": "Model", "sourceset.jsonl": "SourceSet",
                "source.jsonl": "Source"}
BATCHES = {"features": "Neuron", "activations": "Activation", "explanations": "Explanation",
           "explanation_scores": "ExplanationScore"}
CONFIG = {"explanation_model_type.jsonl": "ExplanationModelType", "explanation_score_type.jsonl":
          "ExplanationScoreType", "explanation_score_model.jsonl": "ExplanationScoreModel",
          "explanation_type.jsonl": None, "eval_type.jsonl": None}
BATCH_NAME = re.compile(r"^batch-(\d+)\.jsonl\.gz$")  # the file names route.ts matches


def _is(value, kind: str) -> bool:
    if kind.startswith("list["):
        return isinstance(value, list) and all(_is(v, kind[5:-1]) for v in value)
    if kind in (F, N):
        return isinstance(value, int if kind == N else (int, float)) and not isinstance(value, bool)
    return isinstance(value, {S: str, B: bool}.get(kind, object))


def check_rows(table: str, lines: list[str], where: str) -> list[dict]:
    """Parse every line; every key a column of `table`, the same keys on every line (the importer takes the first
    line's), required columns given, each value of its column's type, null only where the column allows it."""
    rows = [json.loads(line) for line in lines if line.strip()]
    columns = SCHEMA[table]
    for i, row in enumerate(rows):
        assert set(row) <= set(columns), f"{where}:{i}: not columns of {table}: {set(row) - set(columns)}"
        assert set(row) == set(rows[0]), f"{where}:{i}: other keys than the first line's"
        missing = [c for c, (_, _, required) in columns.items() if required and c not in row]
        assert not missing, f"{where}:{i}: required columns missing: {missing}"
        for key, value in row.items():
            kind, nullable, _ = columns[key]
            if value is None:
                assert nullable, f"{where}:{i}: null in the non-nullable {table}.{key}"
            else:
                assert _is(value, kind), f"{where}:{i}: {table}.{key} = {value!r:.80} is not {kind}"
        if "visibility" in row:
            assert row["visibility"] in VISIBILITY
    return rows


def read_export(root: Path) -> dict:
    """The export read as the admin import reads it: {table: rows} per source folder, plus the config."""
    out: dict = {"config": {}, "sources": {}}
    for name, table in CONFIG.items():
        lines = (root / "config" / name).read_text().splitlines()
        out["config"][name] = check_rows(table, lines, name) if table else [json.loads(x) for x in lines if x]
    for model_dir in [p for p in root.iterdir() if p.name != "config"]:
        for source_dir in model_dir.iterdir():
            tables: dict = {}
            for name, table in SOURCE_FILES.items():
                tables[table] = check_rows(table, (source_dir / name).read_text().splitlines(), str(source_dir / name))
            for folder, table in BATCHES.items():
                files = sorted((source_dir / folder).glob("*"), key=lambda p: int(BATCH_NAME.match(p.name)[1]))
                assert [int(BATCH_NAME.match(p.name)[1]) for p in files] == list(range(len(files)))
                tables[table] = [r for p in files for r in check_rows(
                    table, gzip.decompress(p.read_bytes()).decode("utf-8").splitlines(), str(p))]
            out["sources"][(model_dir.name, source_dir.name)] = tables
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_export_is_neuronpedias_rows_of_our_features_examples_and_descriptions(tiny_descriptions, tiny_run,
                                                                                   tmp_path, monkeypatch):
    from interp.exports import neuronpedia as np_export

    monkeypatch.setattr(np_export, "BATCH_ROWS", 64)  # several batch files per table
    out = np_export.main(np_export.NeuronpediaExportConfig(train_folder=str(tiny_run), output=str(tmp_path / "np"),
                                                           model_id="tiny-dlm", source_set="tc"))
    topk = next((tiny_run / "topk").iterdir())
    index = json.loads((topk / "index.json").read_text())
    records = _jsonl(next((tiny_run / "descriptions").iterdir()) / "descriptions.jsonl")
    got = read_export(out)
    assert set(got["sources"]) == {("tiny-dlm", f"{layer}-tc") for layer in index["layers"]}
    model_types = {r["name"] for r in got["config"]["explanation_model_type.jsonl"]}
    score_types = {r["name"] for r in got["config"]["explanation_score_type.jsonl"]}
    score_models = {r["name"] for r in got["config"]["explanation_score_model.jsonl"]}
    assert "tokens-baseline" in model_types
    n_activations = 0
    for layer in index["layers"]:
        t = got["sources"][("tiny-dlm", f"{layer}-tc")]
        layer_dir = topk / f"layer_{layer:02d}"
        stats = _jsonl(layer_dir / "features.jsonl")
        contexts = {c["feature"]: c for c in _jsonl(layer_dir / "contexts.jsonl")}
        # metadata: the model, set and source every row refers to
        (model,), (source,), (sset,), (release,) = (t[k] for k in ("Model", "Source", "SourceSet", "SourceRelease"))
        assert model["id"] == "tiny-dlm" and source["id"] == f"{layer}-tc" and source["setName"] == sset["name"] == "tc"
        assert sset["releaseName"] == release["name"]
        # features: every feature, with the scan's statistics
        assert [int(r["index"]) for r in t["Neuron"]] == [s["feature"] for s in stats]
        for r, s in zip(t["Neuron"], stats):
            assert (r["modelId"], r["layer"], r["sourceSetName"]) == ("tiny-dlm", f"{layer}-tc", "tc")
            assert r["frac_nonzero"] == s["frequency"] and r["maxActApprox"] == s["max_activation"]
            assert r["freq_hist_data_bar_heights"] == s["histogram"]["counts"]
            assert r["pos_str"] == [p for p, _ in s.get("promotes", [])]
            assert r["neg_values"] == [v for _, v in s.get("suppresses", [])]
        assert any(r["pos_str"] for r in t["Neuron"]), "no promoted tokens exported"
        # activations: the top and quantile examples as the model saw them, with their per-token values
        by_feature: dict = {}
        for a in t["Activation"]:
            by_feature.setdefault(int(a["index"]), []).append(a)
        assert len({a["id"] for a in t["Activation"]}) == len(t["Activation"])
        for f, ctx in contexts.items():
            examples = ctx["top"] + ctx["quantile"]
            rows = by_feature.get(f, [])
            assert len(rows) == len(examples)
            for a, e in zip(rows, examples):
                hidden = set(e["masked_at"])
                assert a["tokens"] == [" [MASK]" if i in hidden else p for i, p in enumerate(e["pieces"])]
                assert a["values"] == e["acts"] and a["maxValue"] == max(e["acts"])
                assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
                assert a["values"][a["qualifyingTokenIndex"]] == e["activation"]
                assert a["dataIndex"] == str(e["position"])
        n_activations += len(t["Activation"])
        assert any("[MASK]" in tok for a in t["Activation"] for tok in a["tokens"])
        # explanations: every description of the layer, the tokens baseline named as such, with its scores
        described = [r for r in records if r["layer"] == layer and r["description"] is not None]
        assert [(int(e["index"]), e["description"]) for e in t["Explanation"]] == \
               [(r["feature"], r["description"]) for r in described]
        ids = {e["id"] for e in t["Explanation"]}
        assert len(ids) == len(t["Explanation"])
        for e, r in zip(t["Explanation"], described):
            assert e["explanationModelName"] == ("tokens-baseline" if r["explainer"] == "tokens" else r["explainer"])
            assert e["explanationModelName"] in model_types
            corr = r["scores"].get("token_match", {}).get("correlation")
            assert e["scoreV1"] == (corr if corr is not None else 0.0)
        for s in t["ExplanationScore"]:
            assert s["explanationId"] in ids
            assert s["explanationScoreTypeName"] in score_types and s["explanationScoreModelName"] in score_models
        scored = {s["explanationId"]: s["value"] for s in t["ExplanationScore"]}
        for e, r in zip(t["Explanation"], described):
            corr = r["scores"].get("token_match", {}).get("correlation")
            assert scored.get(e["id"]) == corr
    assert n_activations > 64 * len(index["layers"])  # so batches were split


def test_judged_scores_become_explanation_scores():
    """A judged description's detection and fuzzing scores (judged descriptions come from an LLM run, which the
    tiny fixtures do not make): each one an ExplanationScore row naming its judge; scoreV1 the detection AUROC."""
    from interp.exports.neuronpedia import config_rows, explanation_rows

    record = {"explainer": "google/flan-t5-xxl", "judge": "google/flan-t5-xxl", "layer": 1, "feature": 7,
              "description": "fires on capitals", "failure": None,
              "scores": {"detection": {"auroc": 0.75, "balanced_accuracy": 0.6, "undefined": None},
                         "fuzzing": {"balanced_accuracy": 0.55, "auroc": None},
                         "token_match": {"correlation": 0.3, "reads": "visible words", "words": ["paris"]}}}
    row, scores = explanation_rows(record, "m", "1-tc", "u", "2026-01-01T00:00:00+00:00")
    check_rows("Explanation", [json.dumps(row)], "explanation")
    check_rows("ExplanationScore", [json.dumps(s) for s in scores], "scores")
    assert row["scoreV1"] == 0.75 and row["explanationModelName"] == "google/flan-t5-xxl"
    got = {s["explanationScoreTypeName"]: (s["value"], s["explanationScoreModelName"]) for s in scores}
    assert got == {"diffusion-interp-detection-auroc": (0.75, "google/flan-t5-xxl"),
                   "diffusion-interp-detection-balanced-accuracy": (0.6, "google/flan-t5-xxl"),
                   "diffusion-interp-fuzzing-balanced-accuracy": (0.55, "google/flan-t5-xxl"),
                   "diffusion-interp-token-match-correlation": (0.3, "model-free")}
    # older records: the keyword match was called "simulation" (it has "words"); one that read hidden words too
    # (no "reads") measured something else and is left out
    older = dict(record, scores={"simulation": {"correlation": 0.4, "words": ["paris"], "reads": "visible words"}})
    assert [(s["explanationScoreTypeName"], s["value"]) for s in explanation_rows(older, "m", "1-tc", "u", "t")[1]] \
        == [("diffusion-interp-token-match-correlation", 0.4)]
    oldest = dict(record, scores={"token_match": {"correlation": 0.4, "words": ["paris"]}})
    assert explanation_rows(oldest, "m", "1-tc", "u", "t")[1] == []
    config = config_rows([record], "u", "me", "2026-01-01T00:00:00+00:00")
    assert {r["name"] for r in config["explanation_score_model"]} == {"google/flan-t5-xxl", "model-free"}
    assert set(got) <= {r["name"] for r in config["explanation_score_type"]}


def test_an_existing_export_is_kept_and_a_bad_model_id_is_refused(tiny_descriptions, tiny_run, tmp_path):
    from core.files import UserError
    from interp.exports.neuronpedia import NeuronpediaExportConfig, main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exports", "explanations", "hub"))
    with pytest.raises(UserError, match="model_id"):
        main(NeuronpediaExportConfig(train_folder=str(run), model_id="Has.Dots"))
    out = main(NeuronpediaExportConfig(train_folder=str(run)))
    stem = next((run / "topk").iterdir()).name
    assert out == run / "exports" / "neuronpedia" / stem
    assert [p.name for p in out.iterdir() if p.name != "config"] == [f"diffusionlm-{run.name}"]
    with pytest.raises(UserError, match="exists; --overwrite True"):
        main(NeuronpediaExportConfig(train_folder=str(run)))
    main(NeuronpediaExportConfig(train_folder=str(run), overwrite=True))
    assert sorted(p.name for p in out.parent.iterdir()) == [stem]  # no staging folder or lock left behind


def test_a_run_without_a_finished_scan_is_one_line(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exports", "explanations", "hub", "topk",
                                                                 "transcoders", "descriptions"))
    proc = run_cli(["-m", "interp.exports.neuronpedia", "--train_folder", str(run)])
    assert_one_line_error(proc, "no finished scan")
