import json

import pytest
import torch

from interp.ground_truth import (
    Counts,
    GroundTruthConfig,
    choose_and_score,
    names_category,
    run_ground_truth,
    shuffled_naming_rate,
)
from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("description,category,members,named", [
    ('fires on "violin" (6%), "cello" (5%)', "instrument", ["violin", "cello"], True),  # two members
    ("names of countries", "country", ["France"], True),  # the category's name, plural
    ("an animal class such as mammals", "animal_class", ["mammal"], True),
    # a quoted example context is not the description's own words
    ('fires on "main" (11%); typical context: "the main <<tool>> of"', "tool", ["hammer"], False),
    (None, "tool", ["hammer"], False),
    # the audit's false positives: one member inside an ordinary phrase, or a letter inside "'s"
    ("the model's output", "symbol", ["S", "O", "Fe"], False),
    ("the first word", "ordinal", ["first", "second", "third"], False),
    ("one of several words", "number", ["one", "two", "three"], False),
    ("symbols such as Fe and O", "element_symbol", ["S", "O", "Fe"], True),  # case-aware members
    ("fires on s and fe", "element_symbol", ["S", "O", "Fe"], False),
])
def test_names_category_is_strict(description, category, members, named):
    assert names_category(description, category, members) is named


def test_the_feature_is_chosen_on_one_half_and_scored_on_the_other():
    # feature 0 looks best where features are chosen, feature 1 where they are scored
    select = Counts({0: torch.tensor([[9.0], [5.0]])}, {0: torch.tensor([10.0, 10.0])}, torch.tensor([10.0]))
    report = Counts({0: torch.tensor([[1.0], [9.0]])}, {0: torch.tensor([10.0, 10.0])}, torch.tensor([10.0]))
    row = choose_and_score(select, report, [0], 0)
    assert (row["layer"], row["feature"]) == (0, 0)
    assert row["f1_selection"] == pytest.approx(0.9) and row["f1_heldout"] == pytest.approx(0.1)
    assert (row["tokens_selection"], row["tokens_heldout"]) == (10, 10)


def test_the_shuffled_control_is_near_zero_for_a_strict_check():
    rows = [{"category": "instrument"}, {"category": "country"}]
    members = {"instrument": ["violin", "cello", "harp"], "country": ["France", "Spain", "Peru"]}
    pool = ["the first word of a sentence", "verbs in the past tense", "fires on the word the", "instruments"]
    rate = shuffled_naming_rate(rows, pool, members)
    assert 0 < rate < 0.2  # only "instruments", for one of the two categories
    assert shuffled_naming_rate([], pool, members) is None


def test_benchmark_on_the_tiny_model(tiny_descriptions, tiny_run, tiny_transcoders):
    result = run_ground_truth(GroundTruthConfig(train_folder=str(tiny_run), device="cpu", val_tokens=4096))
    saved = json.loads((tiny_run / "ground_truth.json").read_text())
    assert saved["fraction_recovered"] == result["fraction_recovered"]
    assert len(result["categories"]) == 17 and set(result["named_among_recovered"]) == {"tokens"}
    assert all(0 <= r["f1_selection"] <= 1 and 0 <= r["f1_heldout"] <= 1 for r in result["categories"])
    assert result["mean_f1_heldout"] <= result["mean_f1_selection"] + 1e-9  # chosen where it looks best
    assert set(result["named_shuffled_control"]) == {"tokens"} and result["naming_not_evidence"] == ["tokens"]
    assert result["fact_completion"]["by_phrasing"]["seen"]["accuracy"] > 0.15

    # brute force: the best category's F1 recomputed from dense latents and the labels
    from data.loader import ShardLoader
    from experiment import load_run
    from model.hooks import capture_mlps
    from model.transcoder import Transcoder

    config, model, _, _ = load_run(tiny_run, "latest", "cpu")
    data = config["data"]["folder"]
    concepts = json.loads(open(f"{data}/concepts.json").read())
    best = max(result["categories"], key=lambda r: r["f1_selection"])
    ids = {c["id"] for c in concepts if c["category"] == best["category"]}
    tc = Transcoder.load(tiny_transcoders / f"blocks.{best['layer']}.mlp")
    loader = ShardLoader(data, "val", config["train"]["train_seq_len"], 8)
    fires, member = [], []
    for b, batch in enumerate(loader.sequential(4096)):
        if b % 2 == 0:
            continue  # the half where features are chosen; the held-out F1 comes from the other
        with torch.no_grad(), capture_mlps(model, [best["layer"]]) as seen:
            model(batch.tokens)
            dense = tc.dense_latents(seen[best["layer"]][0].reshape(-1, model.cfg.model_dim))
        fires.append(dense[:, best["feature"]] > 0)
        member.append(torch.tensor([int(x) in ids for x in batch.labels.reshape(-1)]))
    fires, member = torch.cat(fires), torch.cat(member)
    tp = (fires & member).sum().item()
    assert best["f1_heldout"] == pytest.approx(2 * tp / (fires.sum().item() + member.sum().item()), rel=1e-5)


def test_refuses_a_run_without_concept_labels(tmp_path, tiny_run):
    assert_one_line_error(run_cli(["-m", "interp.ground_truth", "--train_folder", str(tmp_path / "none")]),
                          "does not exist")
