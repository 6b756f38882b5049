"""The scan, descriptions and scores as delphi reads them: its LatentDataset loads the cache (in a subprocess
with the package and what it imports), its top examples are the scan's, and its analysis of the exported
judgements gives this project's scores."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file

from tests.helpers import assert_one_line_error, run_cli, side_package_python

READ = r"""
import json, sys, torch
from transformers import AutoTokenizer
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
from delphi.log.result_analysis import compute_auc, compute_classification_metrics, compute_confusion, load_data

root, hook, feats = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
ds = LatentDataset(raw_dir=f"{root}/latents", modules=[hook], latents={hook: torch.tensor(feats)},
                   sampler_cfg=SamplerConfig(n_examples_train=3, n_examples_test=2, n_quantiles=2, train_type="top"),
                   constructor_cfg=ConstructorConfig(min_examples=1, example_ctx_len=16, n_non_activating=3,
                                                     non_activating_source="random"),
                   tokenizer=AutoTokenizer.from_pretrained(f"{root}/tokenizer"))
out = {"records": {}, "scores": {}}
for r in ds:
    out["records"][r.latent.latent_index] = {"max": r.max_activation, "n_not_active": len(r.not_active),
                                             "train": ["".join(e.str_tokens) for e in r.train]}
df, _ = load_data(__import__("pathlib").Path(f"{root}/tokens/scores"), [hook])
for (scorer, latent), g in df.groupby(["score_type", "latent_idx"]):
    m = compute_classification_metrics(compute_confusion(g))
    out["scores"][f"{scorer}/{latent}"] = {"accuracy": float(m["accuracy"]), "auc": compute_auc(g), "n": len(g)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def judged_run(tiny_run, tiny_topk, tiny_llms, tmp_path_factory):
    """A copy of the session's run with judged descriptions (tokens baseline, tiny T5 judge) of a few features."""
    from get_activation_descriptions import DescriptionsConfig, main

    run = tmp_path_factory.mktemp("delphi") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("exports", "descriptions", "explanations", "hub"))
    main(DescriptionsConfig(train_folder=str(run), explainer="tokens", judge=str(tiny_llms["t5"]), device="cpu",
                            scorers="detection,fuzzing", max_features_per_layer=4, n_score=5))
    return run


def test_delphi_reads_the_cache_and_recomputes_our_scores(judged_run):
    from interp.exports.delphi import DelphiExportConfig, main

    out = main(DelphiExportConfig(train_folder=str(judged_run), device="cpu"))
    topk = next((judged_run / "topk").iterdir())
    records = [json.loads(line) for line in (next((judged_run / "descriptions").iterdir()) / "descriptions.jsonl")
               .read_text().splitlines()]
    layer = 1
    stats = [json.loads(line) for line in (topk / "layer_01" / "features.jsonl").read_text().splitlines()]
    live = [s["feature"] for s in stats if not s["dead"]]
    # the cache holds every activation the scan counted, for every latent
    cache = load_file(str(next((out / "latents" / "blocks.1.mlp").glob("*.safetensors"))))
    counts = {f: 0 for f in range(len(stats))}
    for f in cache["locations"][:, 2]:
        counts[int(f)] += 1
    assert [counts[s["feature"]] for s in stats] == [s["fire_count"] for s in stats]
    assert cache["tokens"].shape == cache["clean_tokens"].shape and (cache["tokens"] != cache["clean_tokens"]).any()

    judged = [r for r in records if r["layer"] == layer and r["scores"].get("detection", {}).get("probabilities")
              and "undefined" not in r["scores"]["detection"]]  # (an undefined score is not exported)
    assert judged, "the descriptions stage kept no judge probabilities"
    feats = sorted({r["feature"] for r in judged} | set(live[:6]))
    proc = side_package_python("delphi", READ, str(out), "blocks.1.mlp", ",".join(map(str, feats)))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    by_feature = {s["feature"]: s for s in stats}
    assert sorted(map(int, got["records"])) == feats
    for f, r in got["records"].items():
        # delphi's strongest example is the scan's, to float32 precision (the same batches, noise and code)
        assert r["max"] == pytest.approx(by_feature[int(f)]["max_activation"], rel=1e-6)
        assert len(r["train"]) >= 1 and r["n_not_active"] >= 1
    assert any("[MASK]" in text for r in got["records"].values() for text in r["train"])
    # delphi's analysis of the exported judgements: our balanced accuracy and AUROC, feature by feature
    compared = 0
    for r in judged:
        for ours, theirs in (("detection", "detection"), ("fuzzing", "fuzz")):
            if "undefined" in r["scores"][ours]:
                assert f"{theirs}/{r['feature']}" not in got["scores"]
                continue
            mine, d = r["scores"][ours], got["scores"][f"{theirs}/{r['feature']}"]
            assert d["accuracy"] == pytest.approx(mine["balanced_accuracy"])
            if mine["auroc"] is not None and d["auc"] is not None:
                assert d["auc"] == pytest.approx(mine["auroc"])
                compared += 1
    assert compared >= len(judged)
    assert (out / "tokens" / "latents" / "blocks.1.mlp").is_dir()  # the explainer's folder is a delphi run
    assert json.loads((out / "tokens" / "explanations" / f"blocks.1.mlp_latent{judged[0]['feature']}.txt")
                      .read_text()) == judged[0]["description"]


def test_export_needs_a_finished_scan_and_keeps_an_existing_export(judged_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(judged_run, run, ignore=shutil.ignore_patterns("topk"))
    assert_one_line_error(run_cli(["-m", "interp.exports.delphi", "--train_folder", str(run), "--device", "cpu"]),
                          "no finished scan")
    stem = next((judged_run / "topk").iterdir()).name
    (judged_run / "exports" / "delphi" / stem).mkdir(parents=True, exist_ok=True)
    proc = run_cli(["-m", "interp.exports.delphi", "--train_folder", str(judged_run), "--device", "cpu"])
    assert_one_line_error(proc, "exists", "--overwrite True")


def test_an_explainer_named_by_hub_id_or_path_gets_one_folder(judged_run, tmp_path):
    """"google/flan-t5-xxl" or "/models/t5" become one folder inside the export, whose latents link works."""
    from interp.exports.delphi import run_folder_name, write_descriptions

    assert run_folder_name("google/flan-t5-xxl") == "google--flan-t5-xxl"
    assert run_folder_name("/models/t5") == "models--t5"
    (tmp_path / "latents").mkdir()
    topk = next((judged_run / "topk").iterdir())
    record = json.loads((next((judged_run / "descriptions").iterdir()) / "descriptions.jsonl").read_text()
                        .splitlines()[0])
    for name in ("google/flan-t5-xxl", "/models/t5"):
        write_descriptions(tmp_path, [dict(record, explainer=name)], topk, {})
        run = tmp_path / run_folder_name(name)
        assert (run / "latents").resolve() == (tmp_path / "latents").resolve()
        assert len(list((run / "explanations").iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["google--flan-t5-xxl", "latents", "models--t5"]
