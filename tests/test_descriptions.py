import dataclasses
import json
import shutil

import pytest
import torch

from core import cli
from experiment.paths import RECORDS_FILE
from get_activation_descriptions import IGNORED, DescriptionsConfig, main
from interp.contexts.store import read_jsonl
from interp.descriptions.prompts import (
    clean,
    explain_examples,
    explain_prompt,
    fit_prompt,
    mark,
    plain,
    tokens_description,
)
from interp.descriptions.scoring import (
    auroc,
    balanced_accuracy,
    detection_prompt,
    fuzzing_prompt,
    judge_many,
    judge_scores,
    quoted_words,
    score_sets,
    simulation,
    simulation_request,
    token_match,
)
from interp.descriptions.stage import batched, run_descriptions, summarise
from model.explainer import Explainer
from tests.helpers import assert_one_line_error, run_cli

REFERENCE = ("--train_folder experiments/X --checkpoint_name state_step020000.pt --train_seq_len 4_096 --train_steps "
             "1_000 --grad_acc_steps 8 --num_layers 12 --num_heads 6 --model_dim 384 --save_model True --cuda 1 "
             "--val_loss_every 1_000 --save_every 2_000").split()


def _example(pieces, acts, split="score", position=0, masked=False):
    return {"pieces": pieces, "acts": acts, "split": split, "position": position, "masked": masked,
            "center": max(range(len(acts)), key=lambda i: acts[i]), "activation": max(acts), "t": 0.5,
            "tokens": list(range(len(pieces)))}


def _record(n=6):
    words = [" The", " capital", " of", " France", " is", " Paris", "."]
    top = [_example(words, [0, 0, 0, 0, 0, 3.0 - i * 0.1, 0], "explain" if i % 2 == 0 else "score", position=100 + i)
           for i in range(n)]
    quant = [_example(words, [0, 0, 0, 0.5, 0, 1.0, 0], "explain" if i % 2 == 0 else "score", position=200 + i)
             for i in range(4)]
    rand = [_example([" A", " cat", " is", " a", " mammal", "."], [0.0] * 6, "explain" if i % 2 == 0 else "score",
                     position=300 + i) for i in range(6)]
    return {"feature": 7, "top": top, "quantile": quant, "random": rand}


STATS = {"feature": 7, "masked_fraction": 0.8, "fire_count": 10, "top_tokens": [[" Paris", 8], [" France", 2]]}


def test_prompt_shows_only_the_explain_half_with_marks():
    record = _record()
    examples = explain_examples(record, 10)
    assert all(e["split"] == "explain" for e in examples) and len(examples) == 5
    prompt = explain_prompt(examples, STATS)
    assert prompt.count("Excerpt") == 5 and " <<Paris>>" in prompt
    assert mark(record["quantile"][0]) == " The capital of <<France>> is <<Paris>>."
    # where it fires comes from the examples shown, not from the scan-wide STATS (which count the score half)
    assert "hidden from the model (masked)" not in prompt and "words the model can see" in prompt
    for e in examples:
        e["masked_at"] = [5]
    assert "fires mostly (71%) on words that are hidden" in explain_prompt(examples, STATS)  # 5 of 7 masked


def test_fit_prompt_drops_whole_examples():
    examples = explain_examples(_record(), 10)
    count = lambda p: len(p.split())  # noqa: E731
    full = count(explain_prompt(examples, STATS))
    prompt, kept = fit_prompt(examples, STATS, count, full - 5)
    assert len(kept) == 4 and count(prompt) <= full - 5
    for e in kept:
        assert mark(e) in prompt  # every example shown is shown whole
    _, one = fit_prompt(examples, STATS, count, 3)
    assert len(one) == 1


@pytest.mark.parametrize("raw,expected", [
    ("  Names of capital cities.\nmore", ("Names of capital cities.", None)), ("Description: months", ("months", None)),
    ("", (None, "empty")), ("  ...  ", (None, "empty")), ("Excerpt 1: The capital", (None, "echo")),
    ("the capital of <<France>>", (None, "echo")), ("The capital of France is", (None, "echo")),
])
def test_cleaning(raw, expected):
    assert clean(raw, explain_prompt(explain_examples(_record(), 10), STATS)) == expected


def test_scorer_arithmetic_with_oracle_and_constant_judges():
    record = _record()
    pos, neg = score_sets(record)
    assert {e["split"] for e in pos + neg} == {"score"} and len(pos) == 5 and len(neg) == 3

    def oracle(prompts):  # knows the truth: the feature fires on " Paris"
        out = []
        for p in prompts:
            if "marked words" in p:
                out.append(1.0 if "<<Paris>>" in p else 0.0)
            else:
                out.append(1.0 if "Paris" in p.split("Text:")[1] else 0.0)
        return out

    good = judge_scores("the word Paris", record, oracle, seed=0)
    assert good["detection"]["auroc"] == 1.0 and good["detection"]["balanced_accuracy"] == 1.0
    assert good["fuzzing"]["balanced_accuracy"] == 1.0
    # every judgement is kept, in score_sets' order: the scores can be recomputed from them
    pos, neg = score_sets(record)
    assert good["detection"]["probabilities"] == {"activating": [1.0] * len(pos), "non_activating": [0.0] * len(neg)}
    assert good["fuzzing"]["probabilities"] == {"right": [1.0] * len(pos), "wrong": [0.0] * len(pos)}
    flat = judge_scores("anything", record, lambda ps: [0.7] * len(ps), seed=0)
    assert flat["detection"]["auroc"] == 0.5 and flat["fuzzing"]["auroc"] == 0.5
    assert flat["detection"]["balanced_accuracy"] == 0.5
    assert auroc([0.9, 0.8], [0.1, 0.85]) == 0.75 and balanced_accuracy([0.9], [0.2, 0.6]) == 0.75


def test_token_match_uses_quoted_words():
    record = _record()
    pos, neg = score_sets(record)
    right = token_match('fires on "Paris"', pos + neg)
    wrong = token_match('fires on "cat"', pos + neg)
    assert right["correlation"] > 0.8 and wrong["correlation"] < 0
    none = token_match("nothing quoted matches here", pos + neg)
    assert none["correlation"] is None and none["undefined"] == "no token matches the description's words"


@pytest.mark.parametrize("pos,neg,expected", [
    ([0.7, 0.7], [0.7], 0.5),  # every score ties: no information, exactly chance
    ([0.9, 0.7], [0.7, 0.7], 0.75),  # partial ties count one half
    ([0.2], [0.9], 0.0),
    ([0.5], [], None), ([], [0.5], None), ([], [], None),  # a class is missing: undefined
])
def test_auroc_standard_meaning(pos, neg, expected):
    assert auroc(pos, neg) == expected


@pytest.mark.parametrize("drop", ["random", "top_and_quantile"])
def test_a_missing_class_is_reported_not_crashed(drop):
    """A feature that fires in every pooled window has no non-activating contexts; one that fired once has
    no held-out activating ones. Its AUROC is undefined, says why, and the summary counts it apart."""
    record = _record()
    if drop == "random":
        record["random"] = []
    else:
        record["top"] = [e for e in record["top"] if e["split"] == "explain"]
        record["quantile"] = []
    scores = judge_scores("the word Paris", record, lambda ps: [0.5] * len(ps), seed=0)
    det = scores["detection"]
    assert det["auroc"] is None and det["balanced_accuracy"] is None
    assert det["undefined"] == ("no non-activating contexts in the score half" if drop == "random"
                                else "no activating contexts in the score half")
    assert ("undefined" in scores["fuzzing"]) == (drop != "random")
    defined = judge_scores("the word Paris", _record(), lambda ps: [0.5] * len(ps), seed=0)
    assert "undefined" not in defined["detection"] and defined["detection"]["auroc"] == 0.5
    records = [{"explainer": "x", "layer": 0, "failure": None, "scores": s} for s in (scores, defined)]
    stats = summarise(records)["x"]["0"]["scores"]["detection_auroc"]
    assert stats == {"mean": 0.5, "median": 0.5, "n": 1, "n_undefined": 1}
    assert quoted_words('on "a" and typical context: "x <<Paris>> y"') == {"a", "paris"}


class Scripted:
    """An explainer whose answers are scripted: (greedy answers, sampled answers) per call, in order."""

    name = "scripted"
    max_prompt_tokens = 10_000

    def __init__(self, answer, retry_answer="a retried description", die_after=None):
        self.answer, self.retry_answer, self.die_after = answer, retry_answer, die_after
        self.calls, self.prompts = 0, []

    def count_tokens(self, prompt):
        return len(prompt.split())

    def prompt_budget(self, max_new_tokens):
        return self.max_prompt_tokens - max_new_tokens

    def generate(self, prompts, max_new_tokens, sample=False, seed=0):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            raise KeyboardInterrupt
        self.prompts += prompts
        return [(self.retry_answer if sample else self.answer(p)) for p in prompts]

    def yes_probability(self, prompts):
        return [1.0 if "<<" not in p and "Text:" in p else 0.5 for p in prompts]

    def expected_digits_all_at_once(self, prompts, lines):
        return [[float(len(line) % 10) for line in rows] for rows in lines]  # some spread, no meaning


def _cfg(run, **kw):
    return DescriptionsConfig(train_folder=str(run), explainer="scripted", device="cpu", batch_size=4,
                              max_features_per_layer=6, layers="0", **kw)


@pytest.fixture()
def run_copy(tiny_topk, tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("descriptions"))
    return dst


def test_retry_and_failure_recording(run_copy):
    answers = iter(["", "Feature 1 meaning", "", "Excerpt 1: copy", "fine", "fine 2"] * 3)
    ex = Scripted(lambda p: next(answers), retry_answer="")  # the retry fails too
    out = run_descriptions(_cfg(run_copy), explainer_factory=lambda name: ex)
    records = read_jsonl(out / RECORDS_FILE)
    assert len(records) == 6
    failed = [r for r in records if r["failure"]]
    assert {r["failure"] for r in failed} == {"empty"}  # the retry's empty answer is what failed last
    for r in failed:
        assert r["description"] is None and r["retried"] and len(r["raw"]) == 2 and r["scores"] == {}
    ok = [r for r in records if not r["failure"]]
    assert ok and all(r["description"] and "retried" not in r for r in ok if r["raw"][0].strip())


def assert_auroc_defined_unless_a_class_is_missing(det: dict) -> bool:
    """Which features of the tiny pipeline lack held-out negatives (they fire in every pooled window) or
    positives (they fired once) depends on the trained weights, hence on the processor's float kernels;
    so a test may meet an undefined AUROC, and then it must say why."""
    if det["auroc"] is None:
        assert det["undefined"] and min(det["n_activating"], det["n_non_activating"]) == 0, det
    else:
        assert 0 <= det["auroc"] <= 1 and "undefined" not in det, det
    return True


def test_retry_that_succeeds_is_kept(run_copy):
    ex = Scripted(lambda p: "", retry_answer="capital cities")
    out = run_descriptions(_cfg(run_copy), explainer_factory=lambda name: ex)
    for r in read_jsonl(out / RECORDS_FILE):
        assert r["description"] == "capital cities" and r["retried"] and r["raw"] == ["", "capital cities"]
        assert_auroc_defined_unless_a_class_is_missing(r["scores"]["detection"]) and r["judge"] == "scripted"
        sim = r["scores"]["simulation"]  # a default scorer: 5 + 5 held-out windows at most, every token
        assert 0 < sim["n_windows"] <= 10 and sim["n_tokens"] >= sim["n_windows"]


def test_held_out_split_is_respected(run_copy, tiny_topk):
    ex = Scripted(lambda p: "something")
    out = run_descriptions(_cfg(run_copy), explainer_factory=lambda name: ex)
    contexts = {r["feature"]: r for r in read_jsonl(tiny_topk / "layer_00" / "contexts.jsonl")}
    for r in read_jsonl(out / RECORDS_FILE):
        c = contexts[r["feature"]]
        split = {e["position"]: e["split"] for cat in ("top", "quantile", "random") for e in c[cat]}
        assert r["prompt_examples"] and all(split[p] == "explain" for p in r["prompt_examples"])
        held = r["score_contexts"]["activating"] + r["score_contexts"]["non_activating"]
        assert held and all(split[p] == "score" for p in held)
        assert not set(held) & set(r["prompt_examples"])


def test_interrupted_run_loses_and_redoes_nothing(run_copy):
    dying = Scripted(lambda p: "desc", die_after=1)  # dies in the second batch of four
    with pytest.raises(KeyboardInterrupt):
        run_descriptions(_cfg(run_copy), explainer_factory=lambda name: dying)
    path = run_copy / "descriptions" / "state_step000400" / RECORDS_FILE
    first = read_jsonl(path)
    assert len(first) == 4
    with open(path, "a") as fh:
        fh.write('{"explainer": "scripted", "layer": 0, "feat')  # a line cut short by a kill
    again = Scripted(lambda p: "desc")
    run_descriptions(_cfg(run_copy), explainer_factory=lambda name: again)
    records = read_jsonl(path)
    assert len(records) == 6 and records[:4] == first
    assert len({(r["layer"], r["feature"]) for r in records}) == 6
    assert len(again.prompts) == 2  # only the two unfinished features were described
    run_descriptions(_cfg(run_copy, overwrite=True), explainer_factory=lambda name: Scripted(lambda p: "new"))
    assert [r["description"] for r in read_jsonl(path)] == ["new"] * 6


def _digits_read_one_prefix_at_a_time(ex, prompt, lines):
    """The reference for `expected_digits_all_at_once`: one forward pass per line, over the prompt and the
    answer up to that line's "=", reading the last position's digit distribution."""
    ids = lambda text: ex.tok(text, add_special_tokens=False).input_ids  # noqa: E731
    answer, out = [], []
    for line in lines:
        answer += ids(f" {line} =")
        if ex.kind == "seq2seq":
            enc = ex._encode([prompt])
            dec = torch.tensor([[ex.model.config.decoder_start_token_id, *answer]])
            logits = ex.model(**enc, decoder_input_ids=dec).logits[0, -1]
        else:
            logits = ex.model(input_ids=torch.tensor([ids(ex._format(prompt)) + answer])).logits[0, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        mass = torch.stack([probs[d].sum() for d in ex._digits])
        out.append(float((mass * torch.arange(10)).sum() / mass.sum()))
        answer += ids(" ?")
    return out


def test_tiny_t5_and_gpt2_load_batch_and_judge(tiny_llms):
    for kind, folder in (("seq2seq", tiny_llms["t5"]), ("causal", tiny_llms["gpt2"])):
        ex = Explainer(str(folder), torch.device("cpu"))
        assert ex.kind == kind and ex.model.dtype == torch.float32 and ex._yes and ex._no
        prompts = ["The capital of France is", "Excerpt 1: the month after March is April and so on", "yes"]
        together = ex.generate(prompts, 6)
        assert together == [ex.generate([p], 6)[0] for p in prompts]  # batching changes nothing
        probs = ex.yes_probability(prompts)
        assert all(0 <= p <= 1 for p in probs)
        assert probs == pytest.approx([ex.yes_probability([p])[0] for p in prompts], abs=1e-5)
        # simulation's reading: an expected digit 0–9 after every line, all lines in one pass
        lines = [["1. The", "2. capital", "3. Paris"], ["1. April"]]
        rows = ex.expected_digits_all_at_once(prompts[:2], lines)
        assert [len(r) for r in rows] == [3, 1] and all(0 <= d <= 9 for r in rows for d in r)
        assert rows[1] == pytest.approx(ex.expected_digits_all_at_once(prompts[1:2], lines[1:])[0], abs=1e-4)
        later = ex.expected_digits_all_at_once(prompts[:1], [["1. The", "2. capital", "3. Berlin"]])[0]
        assert later[:2] == pytest.approx(rows[0][:2], abs=1e-5)  # a line never sees the lines after it
        # each value is read where the answer so far ends in "=": the same as a pass over that prefix alone
        assert rows[0] == pytest.approx(_digits_read_one_prefix_at_a_time(ex, prompts[0], lines[0]), abs=1e-4)


def test_judging_many_features_at_once_equals_one_at_a_time(tiny_topk, tiny_llms):
    """The stage asks the judge every question of a batch of features in one call (fuller, length-sorted
    batches): the same scores as one call per feature, exactly for a judge that reads each prompt alone,
    and within 1e-5 in every probability for a real model (padding changes the float sums' order)."""
    contexts = read_jsonl(tiny_topk / "layer_01" / "contexts.jsonl")[:6]
    items = [(f"description {i}: the word Paris", r, 7 + i) for i, r in enumerate(contexts)]

    def pure(prompts):
        return [(hash(p) % 1000) / 1000 for p in prompts]

    assert judge_many(items, pure, 3) == [judge_scores(d, r, pure, seed, 3) for d, r, seed in items]
    ex = Explainer(str(tiny_llms["t5"]), torch.device("cpu"))
    fn = batched(ex.yes_probability, 8)
    together = judge_many(items, fn, 3)
    alone = [judge_scores(d, r, fn, seed, 3) for d, r, seed in items]
    for a, b in zip(together, alone, strict=True):
        for name in ("detection", "fuzzing"):
            pa, pb = a[name].pop("probabilities"), b[name].pop("probabilities")
            for key in pa:
                assert pa[key] == pytest.approx(pb[key], abs=1e-5)
            assert a[name].keys() == b[name].keys()
            for key, value in a[name].items():  # the scores from them: equal, or within the same 1e-5
                assert value == (pytest.approx(b[name][key], abs=1e-5) if isinstance(value, float) else b[name][key])


def test_tiny_t5_end_to_end(run_copy, tiny_llms):
    cfg = DescriptionsConfig(train_folder=str(run_copy), explainer=str(tiny_llms["t5"]), device="cpu",
                             max_features_per_layer=3, n_examples=3, max_new_tokens=8, batch_size=8,
                             scorers="detection,fuzzing,token_match,simulation", n_simulate=1)
    out = main(cfg)
    records = read_jsonl(out / RECORDS_FILE)
    assert len(records) == 6 and {r["layer"] for r in records} == {0, 1}
    for r in records:
        assert r["raw"] and r["explainer"] == str(tiny_llms["t5"])
        assert (r["failure"] is None) == (r["description"] is not None)
        if r["description"]:
            assert_auroc_defined_unless_a_class_is_missing(r["scores"]["detection"])
            sim = r["scores"]["simulation"]
            assert sim["n_windows"] <= 2 and sim["n_tokens"] > 0
            assert sim["correlation"] is None and sim["undefined"] or -1 <= sim["correlation"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert str(tiny_llms["t5"]) in summary["explainers"] and (out / "scores.png").exists()
    for layer in ("0", "1"):  # the held-out examples' noise levels, activating and not, side by side
        noise = summary["held_out_noise"][layer]
        act, non = noise["activating"], noise["non_activating"]
        assert len(noise["bin_edges"]) == 11 and sum(act["histogram"]) == act["n"] > 0
        assert sum(non["histogram"]) == non["n"] > 0 and abs(act["mean_t"] - non["mean_t"]) < 0.1


def test_tokens_explainer_end_to_end(run_copy):
    proc = run_cli(["get_activation_descriptions.py", "--train_folder", str(run_copy), "--explainer", "tokens",
                    "--device", "cpu", "--train_steps", "1_000", "--save_model", "True"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ignored by this stage: --train_steps, --save_model" in proc.stdout
    out = run_copy / "descriptions" / "state_step000400"
    records = read_jsonl(out / RECORDS_FILE)
    index = json.loads((run_copy / "topk" / "state_step000400" / "index.json").read_text())
    assert len(records) == sum(v["live"] for v in index["summary"].values())  # every live feature
    assert all(r["description"].startswith("fires on") and r["failure"] is None for r in records)
    assert all(set(r["scores"]) == {"token_match"} and r["judge"] is None for r in records)
    assert all(r["scores"]["token_match"]["reads"] == "visible words" for r in records)
    corr = [r["scores"]["token_match"]["correlation"] for r in records if r["scores"]["token_match"]["correlation"]]
    assert sum(corr) / len(corr) > 0.1  # the baseline's quoted tokens do predict activations


def test_reference_command_line_parses(capsys, reference_machine):
    cfg = cli.parse_config(DescriptionsConfig, REFERENCE, ignored=IGNORED)
    assert cfg.explainer == "google/flan-t5-xxl" and cfg.cuda == 1
    assert "--train_seq_len" in capsys.readouterr().out


def test_bad_inputs(tiny_run, run_copy, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(tiny_run, fresh, ignore=shutil.ignore_patterns("topk", "descriptions"))
    base = ["get_activation_descriptions.py", "--device", "cpu"]
    assert_one_line_error(run_cli(base + ["--train_folder", str(fresh), "--explainer", "tokens"]), "no finished top-k")
    assert_one_line_error(run_cli(base + ["--train_folder", str(run_copy), "--explainer", str(tmp_path / "nope")]),
                          "does not exist")
    vit = tmp_path / "vit"
    vit.mkdir()
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    assert_one_line_error(run_cli(base + ["--train_folder", str(run_copy), "--explainer", str(vit)]),
                          "neither a seq2seq nor a causal")


def test_examples_read_as_the_model_saw_them():
    """A masked token is [MASK]: a masked trigger in a non-activating context is not shown as text."""
    negative = dict(_example([" The", " capital", " of", " France", " is", " Paris", "."], [0.0] * 7),
                    masked_at=[3, 5])
    assert plain(negative) == " The capital of [MASK] is [MASK]."
    assert 'Text: "The capital of [MASK] is [MASK]."' in detection_prompt("the word Paris", negative)
    assert "France" not in mark(negative)
    positive = dict(_example([" The", " capital", " of", " France", " is", " Paris", "."], [0, 0, 0, 0, 0, 2.0, 0]),
                    masked_at=[3, 5])
    assert mark(positive) == " The capital of [MASK] is <<[MASK=Paris]>>."  # the hidden word, where it is marked
    assert plain(positive) == " The capital of [MASK] is [MASK]."
    wrong = mark(positive, {3})  # a wrong mark reveals its hidden word the same way
    assert wrong == " The capital of <<[MASK=France]>> is [MASK]."
    fuzz = fuzzing_prompt("capital cities", mark(positive))
    assert "<<[MASK=Paris]>>" in fuzz


def test_the_tokens_baseline_reads_only_the_explain_half():
    record = _record()
    for c in ("top", "quantile"):
        for e in record[c]:
            if e["split"] == "score":
                e["pieces"] = e["pieces"][:5] + [" Berlin", "."]
    stats = dict(STATS, top_tokens=[[" Berlin", 50], [" Paris", 8]], masked_fraction=0.9, fire_count=60)
    desc = tokens_description(stats, record, 10)
    assert '"Paris"' in desc and "Berlin" not in desc and "visible positions" in desc


class _Tok:
    """A stand-in tokenizer: a fixed table from text to ids."""

    def __init__(self, table, texts):
        self.table, self.texts = table, texts

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": self.table[text]})()

    def decode(self, ids):
        return "".join(self.texts[i] for i in ids)


def test_yes_and_no_must_be_told_apart_by_their_first_token():
    from model.explainer import yes_no_ids

    texts = {1: "▁", 2: "yes", 3: "no", 4: "Yes", 5: "No", 6: "▁yes", 7: "▁no"}
    spaced = _Tok({"yes": [2], " yes": [1, 2], "Yes": [4], " Yes": [1, 4], "no": [3], " no": [1, 3], "No": [5],
                   " No": [1, 5]}, {k: v.replace("▁", " ") for k, v in texts.items()})
    assert yes_no_ids(spaced, "t") == ([2, 4], [3, 5])  # the lone "▁" both start with is skipped
    clash = _Tok({"yes": [6], " yes": [6], "Yes": [6], " Yes": [6], "no": [6], " no": [7], "No": [7], " No": [7]},
                 {k: v.replace("▁", " ") for k, v in texts.items()})
    with pytest.raises(cli.UserError, match="does not tell yes from no"):
        yes_no_ids(clash, "t")


def test_older_records_scored_simulation_count_as_token_match():
    old = {"explainer": "tokens", "layer": 0, "feature": 1, "failure": None,
           "scores": {"simulation": {"correlation": 0.5, "n_tokens": 40, "words": ["paris"]}}}
    new = dict(old, feature=2, scores={"token_match": {"correlation": 0.25, "words": [], "reads": "visible words"},
                                       "simulation": {"correlation": 0.1, "n_tokens": 40, "n_windows": 2}})
    scores = summarise([old, new])["tokens"]["0"]["scores"]
    # the old keyword "simulation" is a keyword match, one that read hidden words too: summarised apart
    assert scores["token_match_all_words_correlation"]["mean"] == 0.5
    assert scores["token_match_correlation"]["mean"] == 0.25 and scores["token_match_correlation"]["n"] == 1
    assert scores["simulation_correlation"]["mean"] == 0.1 and scores["simulation_correlation"]["n"] == 1


def test_simulation_with_oracle_and_constant_predictors():
    record = _record()
    pos, neg = score_sets(record)
    contexts = pos[:2] + neg[:2]
    oracle = lambda prompts, lines: [e["acts"] for e in contexts]  # noqa: E731
    assert simulation("capitals", contexts, oracle)["correlation"] == pytest.approx(1)
    flat = simulation("capitals", contexts, lambda prompts, lines: [[4.0] * len(x) for x in lines])
    assert flat["correlation"] is None and flat["undefined"] == "constant prediction"
    prompt, lines = simulation_request("capitals", dict(pos[0], masked_at=[5]))
    assert "is [MASK]." in prompt and "Paris" not in prompt + "".join(lines)  # as the model saw it, lines too
    assert lines[5] == "6. [MASK]" and lines[1] == "2. capital"


def test_older_protocol_inputs_are_refused(run_copy):
    tokens_cfg = DescriptionsConfig(train_folder=str(run_copy), explainer="tokens", device="cpu", layers="0",
                                    max_features_per_layer=3)
    index = run_copy / "topk" / "state_step000400" / "index.json"
    saved = json.loads(index.read_text())
    index.write_text(json.dumps({k: v for k, v in saved.items() if k != "protocol"}))
    with pytest.raises(cli.UserError, match="older protocol"):
        run_descriptions(tokens_cfg)
    index.write_text(json.dumps(saved))
    out = run_copy / "descriptions" / "state_step000400"
    out.mkdir(parents=True, exist_ok=True)
    old = {"explainer": "tokens", "layer": 0, "feature": 0, "description": "x", "failure": None, "scores": {}}
    (out / RECORDS_FILE).write_text(json.dumps(old) + "\n")
    with pytest.raises(cli.UserError, match="older protocol; --overwrite True"):
        run_descriptions(tokens_cfg)
    run_descriptions(dataclasses.replace(tokens_cfg, overwrite=True))  # redone under the new protocol
    assert all(r["protocol"] == 2 for r in read_jsonl(out / RECORDS_FILE))



def test_a_batch_that_runs_out_of_memory_is_halved_for_the_rest_of_the_run():
    from interp.descriptions.stage import BatchSize

    seen = []

    def fn(prompts):  # a device that holds at most 3 prompts at a time
        seen.append(len(prompts))
        if len(prompts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [p.upper() for p in prompts]

    limit = BatchSize(16)
    prompts = [f"prompt {i}" + "x" * (i % 5) for i in range(20)]
    assert batched(fn, limit)(prompts) == [p.upper() for p in prompts]  # every answer, in order
    assert limit.size == 2 and seen[:4] == [16, 8, 4, 2]
    seen.clear()
    assert batched(fn, limit)(prompts[:5]) == [p.upper() for p in prompts[:5]]
    assert seen == [2, 2, 1]  # the smaller size stays

    def never(prompts):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        batched(never, BatchSize(4))(prompts)
