"""Fact completion's chance level: the strongest of a uniform guess, the majority answer and shuffled answers."""
import json

import pytest
import torch

import model.fact_eval as fe

CAPITALS = [" Paris", " Rome", " Lima", " Ottawa", " Oslo"]


class CharTok:
    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def fake_model(monkeypatch, answer):
    """Patch the sampler so that every prompt is completed by `answer(prompt)`."""
    def fake_generate(model, prompts, cfg):
        rows = []
        for p in prompts:
            text = (answer("".join(map(chr, p))) + "." * cfg.gen_length)[:cfg.gen_length]
            rows.append([ord(ch) for ch in text])
        return type("Out", (), {"states": [torch.tensor(rows)]})()

    monkeypatch.setattr(fe, "generate", fake_generate)


def facts(answers, relation="capital_of", phrasing="seen", candidates=CAPITALS):
    return [{"prompt": f"{relation} {phrasing} {i}", "answer": a, "relation": relation, "phrasing": phrasing,
             "candidates": candidates} for i, a in enumerate(answers)]


def test_chance_is_the_strongest_guesser(monkeypatch):
    # 3 of 4 answers are " Paris": always answering it is right 75% of the time, a uniform guess 20%
    fake_model(monkeypatch, lambda p: " Rome")
    result = fe.fact_accuracy(None, CharTok(), facts([" Paris", " Paris", " Paris", " Rome"]))
    assert result["accuracy"] == pytest.approx(0.25)
    assert result["chance"] == pytest.approx(0.75)  # was 0.2, the uniform guess
    assert result["chance_uniform"] == pytest.approx(0.2)
    assert result["chance_majority"] == pytest.approx(0.75)
    assert result["chance_shuffled"] == pytest.approx(0.25)  # " Rome" is one answer in four, however shuffled
    seen = result["by_phrasing"]["seen"]
    assert seen["chance"] == pytest.approx(0.75) and seen["macro_chance"] == pytest.approx(0.75)


@pytest.mark.parametrize("answers,completion", [
    ([" Paris", " Paris", " Paris", " Rome"], " Paris"),
    ([" Paris", " Rome", " Lima", " Oslo", " Oslo"], " Oslo"),
    ([" Ottawa"] * 3 + [" Lima"] * 2, " Ottawa"),
])
def test_a_model_that_always_answers_the_majority_scores_the_majority_share_against_shuffled_answers(
        monkeypatch, answers, completion):
    fake_model(monkeypatch, lambda p: completion)
    result = fe.fact_accuracy(None, CharTok(), facts(answers), shuffle_repeats=7)
    share = answers.count(completion) / len(answers)
    assert result["chance_shuffled"] == pytest.approx(share)
    assert result["chance_majority"] == pytest.approx(share)
    assert result["accuracy"] == pytest.approx(share)  # no better than its chance
    rel = result["by_relation"]["capital_of"]
    assert (rel["top_completion"], rel["top_completion_share"]) == (completion.strip(), 1.0)


def test_the_chance_is_the_max_per_relation_phrasing_and_overall(monkeypatch):
    sums = facts([" two", " three", " three", " four", " four", " four"], "sum", "heldout",
                 [" one", " two", " three", " four", " five", " six", " seven", " eight"])
    capitals = facts(CAPITALS) + facts(CAPITALS, phrasing="heldout")
    truth = {f["prompt"]: f["answer"] for f in sums + capitals}
    fake_model(monkeypatch, lambda p: truth[p] if p.startswith("capital_of") else " four")
    result = fe.fact_accuracy(None, CharTok(), sums + capitals)
    parts = [result, *result["by_phrasing"].values(), *result["by_relation"].values(),
             *(x for part in result["by_phrasing"].values() for x in part["by_relation"].values())]
    for part in parts:
        assert part["chance"] == max(part["chance_uniform"], part["chance_majority"], part["chance_shuffled"])
        assert 0 < part["p_shuffled"] <= 1
    held = result["by_phrasing"]["heldout"]
    assert held["by_relation"]["sum"]["chance_majority"] == pytest.approx(0.5)
    assert held["by_relation"]["sum"]["top_completion"] == "four"
    assert held["macro_chance"] == pytest.approx((0.5 + 0.2) / 2)  # the mean of the relations' chances
    assert held["macro_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert result["by_relation"]["capital_of"]["accuracy"] == 1.0
    assert result["by_relation"]["capital_of"]["p_shuffled"] < 0.1  # no shuffle is right on every capital


def test_the_shuffle_stays_inside_relation_and_phrasing(monkeypatch):
    # answers of another relation (or phrasing) are never shuffled onto a fact: a model right on every
    # fact of two single-fact groups scores 1 against shuffled answers
    fake_model(monkeypatch, lambda p: " Paris" if "seen" in p else " Rome")
    result = fe.fact_accuracy(None, CharTok(), facts([" Paris"]) + facts([" Rome"], phrasing="heldout"))
    assert result["chance_shuffled"] == 1.0 and result["accuracy"] == 1.0


def test_on_the_tiny_model(tiny_run):
    from experiment import load_run

    config, model, tok, _ = load_run(tiny_run, "latest", "cpu")
    facts_ = [json.loads(line) for line in open(f"{config['data']['folder']}/facts.jsonl")]
    facts_ = [f for f in facts_ if f["relation"] in ("capital_of", "successor")]
    result = fe.fact_accuracy(model, tok, facts_, shuffle_repeats=5)
    for part in [result, *result["by_phrasing"].values()]:
        assert part["chance"] == max(part["chance_uniform"], part["chance_majority"], part["chance_shuffled"])
    for part in result["by_phrasing"].values():
        assert part["macro_chance"] >= max(part["macro_chance_uniform"], part["macro_chance_majority"])
    capitals = result["by_relation"]["capital_of"]
    assert capitals["chance_uniform"] == pytest.approx(1 / 15) and capitals["chance_majority"] == pytest.approx(1 / 15)
    assert 0 < capitals["top_completion_share"] <= 1 and capitals["top_completion"]
