import json

import pytest
import torch

from interp.ground_truth import GroundTruthConfig, names_category, run_ground_truth
from tests.helpers import assert_one_line_error, run_cli


def test_names_category():
    assert names_category('fires on "violin" (6%), "cello" (5%)', "instrument", ["violin", "cello"])
    assert names_category("names of countries", "country", ["France"])
    assert names_category("an animal class such as mammals", "animal_class", ["mammal"])
    # a quoted example context is not the description's own words
    assert not names_category('fires on "main" (11%); typical context: "the main <<tool>> of"', "tool", ["hammer"])
    assert not names_category(None, "tool", ["hammer"])


def test_benchmark_on_the_tiny_model(tiny_descriptions, tiny_run, tiny_transcoders):
    result = run_ground_truth(GroundTruthConfig(train_folder=str(tiny_run), device="cpu", val_tokens=4096))
    saved = json.loads((tiny_run / "ground_truth.json").read_text())
    assert saved["fraction_recovered"] == result["fraction_recovered"]
    assert len(result["categories"]) == 17 and set(result["named_among_recovered"]) == {"tokens"}
    assert all(0 <= r["best_f1"] <= 1 for r in result["categories"])
    assert result["fact_completion"]["by_phrasing"]["seen"]["accuracy"] > 0.15

    # brute force: the best category's F1 recomputed from dense latents and the labels
    from data.loader import ShardLoader
    from experiment import load_run
    from model.hooks import capture_mlps
    from model.transcoder import Transcoder

    config, model, _, _ = load_run(tiny_run, "latest", "cpu")
    data = config["data"]["folder"]
    concepts = json.loads(open(f"{data}/concepts.json").read())
    best = max(result["categories"], key=lambda r: r["best_f1"])
    ids = {c["id"] for c in concepts if c["category"] == best["category"]}
    tc = Transcoder.load(tiny_transcoders / f"layer_{best['layer']:02d}")
    loader = ShardLoader(data, "val", config["train"]["train_seq_len"], 8)
    fires, member = [], []
    for batch in loader.sequential(4096):
        with torch.no_grad(), capture_mlps(model, [best["layer"]]) as seen:
            model(batch.tokens)
            dense = tc.dense_latents(seen[best["layer"]][0].reshape(-1, model.cfg.model_dim))
        fires.append(dense[:, best["feature"]] > 0)
        member.append(torch.tensor([int(x) in ids for x in batch.labels.reshape(-1)]))
    fires, member = torch.cat(fires), torch.cat(member)
    tp = (fires & member).sum().item()
    assert best["best_f1"] == pytest.approx(2 * tp / (fires.sum().item() + member.sum().item()), rel=1e-5)


def test_refuses_a_run_without_concept_labels(tmp_path, tiny_run):
    assert_one_line_error(run_cli(["-m", "interp.ground_truth", "--train_folder", str(tmp_path / "none")]),
                          "does not exist")
