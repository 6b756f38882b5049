"""The defects an independent audit measured on the demo run, each reproduced and held fixed: token_match
read as the model saw it (and undefined, not meaningless, for a description that quotes only
punctuation), an explainer's prompt budget that leaves room for the answer, fuzzing whose wrong markings
reveal hidden words in the same share as the right ones, and held-out noise levels over live features."""
import itertools
import json
import random
import shutil

import pytest
import torch

from experiment.paths import RECORDS_FILE
from get_activation_descriptions import DescriptionsConfig
from interp.contexts.browser import DESCRIPTIONS_JS, write_page_descriptions
from interp.contexts.store import noise_levels, read_jsonl
from interp.descriptions.prompts import explain_examples, explain_prompt, mark, tokens_description
from interp.descriptions.scoring import (
    fuzzing_positions,
    judge_scores,
    quoted_words,
    token_match,
    wrongly_marked,
)
from interp.descriptions.stage import run_descriptions, summarise
from model.explainer import Explainer

WORDS = [" The", " capital", " of", " France", " is", " Paris", "."]


def _example(pieces, acts, masked_at=(), split="score", position=0, t=0.5):
    return {"pieces": list(pieces), "acts": list(acts), "masked_at": list(masked_at), "split": split,
            "position": position, "center": max(range(len(acts)), key=lambda i: acts[i]), "t": t,
            "activation": max(acts), "masked": False, "tokens": list(range(len(pieces)))}


# --- 1. token_match reads the text as the model saw it -------------------------------------------------

def test_a_masked_keyword_is_read_as_mask_and_never_matches():
    """" Paris" is active in every window but hidden in half of them: the model saw [MASK] there, so a
    keyword match on "Paris" must predict nothing at those positions."""
    acts = [0, 0, 0, 0, 0, 2.0, 0]
    visible = [_example(WORDS, acts, position=i) for i in range(3)]
    hidden = [_example(WORDS, acts, masked_at=[5], position=10 + i) for i in range(3)]
    quiet = [_example(WORDS, [0.0] * 7, masked_at=[2], position=20 + i) for i in range(3)]
    score = token_match('fires on "Paris"', visible + hidden + quiet)
    # as if the hidden words were the literal text [MASK]: the same score
    as_seen = [dict(e, pieces=[" [MASK]" if i in e["masked_at"] else p for i, p in enumerate(e["pieces"])])
               for e in visible + hidden + quiet]
    assert score["correlation"] == pytest.approx(token_match('fires on "Paris"', as_seen)["correlation"])
    assert score["correlation"] < 0.75  # half of the activations are at a [MASK] the keyword cannot read
    assert score["reads"] == "visible words" and score["n_hidden"] == 6
    # a word only ever hidden matches nothing: undefined, not a number from words the model never saw
    only_hidden = token_match('fires on "Paris"', hidden + [_example([" A", " cat", "."], [0.0, 0.0, 0.0])])
    assert only_hidden["correlation"] is None and only_hidden["undefined"] == "no token matches the description's words"


@pytest.mark.parametrize("description,expected", [
    ('fires on "[MASK]" tokens', set()),  # quotes only how a hidden word is shown
    ("predicts what belongs at a MASK position", {"predicts", "belongs"}),
    ('fires on "capital" and <<[MASK=Paris]>>', {"capital", "paris"}),
    ('typical context: "of <<[MASK=France]>> is [MASK]"', {"france"}),
    ("the masked token after [MASK]", {"after"}),
])
def test_mask_is_never_a_keyword(description, expected):
    assert quoted_words(description) == expected


def test_a_description_quoting_only_punctuation_is_undefined():
    """The tokens baseline of a feature on "." and "," quotes only punctuation; falling back to unrelated
    context words ("plus", "equals", "100") gave a defined but meaningless score."""
    pieces = [" 2", " plus", " 3", " equals", " 100", ".", " 4", ",", " 5"]
    acts = [0, 0, 0, 0, 0, 1.0, 0, 0.5, 0]
    record = {"feature": 1, "top": [_example(pieces, acts, split=s, position=i) for i, s in
                                    enumerate(["explain", "score"] * 3)],
              "quantile": [], "random": [_example(pieces, [0.0] * 9, split="score", position=50)]}
    desc = tokens_description({}, record, 10)
    assert desc.startswith('fires on "." (') and '"," (' in desc and "plus" in desc  # the context is quoted
    contexts = [e for e in record["top"] + record["random"] if e["split"] == "score"]
    score = token_match(desc, contexts)
    assert score["correlation"] is None and score["words"] == []
    assert score["undefined"] == "the description quotes no word (only punctuation or [MASK])"
    # a description that quotes a word besides punctuation is scored on that word alone
    assert token_match('fires on "." and "plus"', contexts)["words"] == ["plus"]


def test_older_keyword_matches_are_summarised_apart_and_every_label_says_what_it_reads(tmp_path):
    """A record made before token_match read [MASK] (no "reads") matched hidden words; it is still read,
    under a name that says so, and never mixed into the visible-words mean."""
    new = {"explainer": "tokens", "layer": 0, "feature": 1, "failure": None, "description": '"Paris"',
           "scores": {"token_match": {"correlation": 0.25, "reads": "visible words", "words": ["paris"]}}}
    old = dict(new, feature=2, scores={"token_match": {"correlation": 0.75, "words": ["paris"]}})
    oldest = dict(new, feature=3, scores={"simulation": {"correlation": 0.5, "n_tokens": 40, "words": ["paris"]}})
    scores = summarise([new, old, oldest])["tokens"]["0"]["scores"]
    assert scores["token_match_correlation"]["mean"] == 0.25 and scores["token_match_correlation"]["n"] == 1
    assert scores["token_match_all_words_correlation"]["mean"] == 0.625
    write_page_descriptions(tmp_path, [new, old, oldest])
    shown = json.loads((tmp_path / DESCRIPTIONS_JS).read_text().split("=", 1)[1].rstrip().rstrip(";"))
    assert list(shown["1"][0]["scores"]) == ["token_match (visible words)"]
    assert list(shown["2"][0]["scores"]) == list(shown["3"][0]["scores"]) == ["token_match (hidden words too)"]


# --- 3. fuzzing: wrong markings reveal in the same share as the right one ------------------------------

PIECES = [" The", " capital", "\n", " of", " France", " is", " Paris", ".", " It", " is", " big", " and", " old"]


def _looks(example: dict, marked: set[int]) -> dict:
    """What a reader sees of a marking: its marks, and how many of them reveal a hidden word."""
    text = mark(example, marked)
    return {"marks": text.count("<<"), "reveals": text.count("<<[MASK=")}


def _grid():
    """Windows of 1 to 13 tokens, every mask rate, sparse to all-active features; a few by hand."""
    rng = random.Random(1)
    out = []
    for n, p_mask, p_active in itertools.product((1, 2, 3, 5, 8, 13), (0.0, 0.3, 0.7, 1.0), (0.1, 0.4, 0.8, 1.0)):
        for _ in range(3):
            acts = [round(rng.uniform(0.1, 3), 3) if rng.random() < p_active else 0.0 for _ in range(n)]
            if not any(acts):
                acts[rng.randrange(n)] = 1.0
            out.append(_example(PIECES[:n], acts, [i for i in range(n) if rng.random() < p_mask]))
    out.append(_example(PIECES[:4], [0, 0, 1.0, 0]))  # fires on a line break only
    out.append(_example(PIECES[:4], [0, 0, 1.0, 0], masked_at=[2]))  # on a hidden line break
    out.append(_example(PIECES[:3], [2.0, 1.0, 0.5], masked_at=[0]))  # every token active
    return out


def test_every_marking_shows_a_mark_and_wrong_ones_reveal_as_often_as_the_right_one():
    matched = 0
    for k, ex in enumerate(_grid()):
        right, wrong = fuzzing_positions(ex, random.Random(k))
        r, w = _looks(ex, right), _looks(ex, wrong)
        assert r["marks"] >= 1 and w["marks"] >= 1, (ex, right, wrong)  # no marking is empty
        assert mark(ex, right) == mark(ex)  # the right marking marks the active tokens
        assert wrongly_marked(ex, random.Random(k)) == mark(ex, wrong)
        inactive = [i for i, a in enumerate(ex["acts"]) if a == 0]
        if not inactive:  # nothing to mark wrongly: a strict subset of the right marks (or, one token, the same)
            assert wrong < right or len(right) == 1
            continue
        assert not wrong & right and wrong <= set(inactive)
        assert w["marks"] == min(r["marks"], len(inactive))  # as many marks as the example allows
        revealing = sum(_looks(ex, {i})["reveals"] for i in inactive)  # inactive tokens a mark would reveal
        if revealing >= r["reveals"] and len(inactive) - revealing >= r["marks"] - r["reveals"]:
            # the example allows it (enough hidden and visible inactive tokens): the same reveals exactly
            assert w["reveals"] == r["reveals"], (ex, right, wrong)
            matched += 1
    assert matched > 80  # the grid's examples that allow an exact match


def test_a_judge_that_reads_only_the_share_of_reveals_is_at_chance():
    """The audit's description-free cue: P(yes) = the share of marks that reveal a hidden word, over examples
    that allow an exact match (a sparse feature in windows with hidden and visible inactive tokens)."""
    rng = random.Random(3)
    top = []
    while len(top) < 40:
        acts = [round(rng.uniform(0.5, 3), 3) if rng.random() < 0.1 else 0.0 for _ in PIECES]
        acts[len(top) % len(PIECES)] = 1.5
        ex = _example(PIECES, acts, [j for j in range(len(PIECES)) if rng.random() < 0.4], position=len(top))
        active, inactive = [i for i, a in enumerate(acts) if a > 0], [i for i, a in enumerate(acts) if a == 0]
        right, revealing = _looks(ex, set(active)), sum(_looks(ex, {i})["reveals"] for i in inactive)
        if revealing >= right["reveals"] and len(inactive) - revealing >= right["marks"] - right["reveals"]:
            top.append(ex)
    record = {"feature": 0, "top": top, "quantile": [], "random": [_example(PIECES, [0.0] * 13, position=99)]}

    def reveal_share(prompts):
        texts = [p.split('Text: "', 1)[1] if "marked <<like this>>" in p else None for p in prompts]
        return [0.5 if t is None else t.count("<<[MASK=") / max(1, t.count("<<")) for t in texts]

    fuzz = judge_scores("anything", record, reveal_share, seed=0)["fuzzing"]
    assert fuzz["auroc"] == 0.5 and fuzz["n"] == 40


# --- 4. held-out noise levels over live features only -------------------------------------------------

def test_held_out_noise_counts_only_features_with_a_held_out_activating_example():
    live = {"feature": 0, "top": [_example(WORDS, [0, 0, 0, 0, 0, 1.0, 0], t=0.3)], "quantile": [],
            "random": [_example(WORDS, [0.0] * 7, t=0.35)]}
    dead = {"feature": 1, "top": [], "quantile": [],
            "random": [_example(WORDS, [0.0] * 7, t=0.9, position=i) for i in range(5)]}
    explained_only = {"feature": 2, "top": [_example(WORDS, [0, 0, 0, 0, 0, 1.0, 0], split="explain", t=0.2)],
                      "quantile": [], "random": [_example(WORDS, [0.0] * 7, t=0.95)]}
    alone = noise_levels([live])
    assert noise_levels([live, dead, explained_only]) == alone
    assert alone["non_activating"]["mean_t"] == 0.35 and alone["activating"]["n"] == 1 and alone["n_features"] == 1


# --- 2. an explainer's prompt leaves room for its answer ----------------------------------------------

@pytest.fixture(scope="module")
def gpt2_1024(tiny_llms, tmp_path_factory):
    """A tiny randomly initialised GPT-2 with GPT-2's own context, 1,024 positions (tiny_llms' tokenizer). It
    has no end-of-text token, so it always writes every new token it is asked for."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_llms["gpt2"])
    folder = tmp_path_factory.mktemp("tiny_gpt2_1024")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prompt_budget_leaves_room_for_the_new_tokens(gpt2_1024, tiny_llms):
    causal = Explainer(str(gpt2_1024), torch.device("cpu"))
    assert causal.context == 1024 and causal.prompt_budget(30) == 994  # prompt + new tokens ≤ context
    seq2seq = Explainer(str(tiny_llms["t5"]), torch.device("cpu"))
    assert seq2seq.prompt_budget(30) == seq2seq.prompt_budget(300) == 512  # the encoder's limit, for the prompt alone
    # generation itself truncates a too-long prompt to the budget, so it never runs past the context
    out = causal.generate(["The capital of France is Paris. " * 300], 30)
    assert len(out) == 1


def test_a_gpt2_with_1024_positions_describes_long_prompts(gpt2_1024, tiny_topk, tiny_run, tmp_path, capsys):
    """The real description path: prompts fitted to the budget, then 300 new tokens generated (a long answer
    makes the room it needs plain). The features described are the two whose explain half makes the longest
    prompts, longer than the whole context."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("descriptions"))
    explainer = Explainer(str(gpt2_1024), torch.device("cpu"))
    live = {s["feature"] for s in read_jsonl(tiny_topk / "layer_00" / "features.jsonl") if not s["dead"]}
    lengths = sorted((explainer.count_tokens(explain_prompt(explain_examples(r, 40), {})), r["feature"])
                     for r in read_jsonl(tiny_topk / "layer_00" / "contexts.jsonl") if r["feature"] in live)
    longest = lengths[-2:]
    assert longest[0][0] > 1024, longest  # the full prompts do not fit: they are fitted, leaving room or not
    cfg = DescriptionsConfig(train_folder=str(run), explainer=str(gpt2_1024), device="cpu", layers="0",
                             features=",".join(str(f) for _, f in longest), n_examples=40, max_new_tokens=300,
                             batch_size=2, scorers="token_match")
    out = run_descriptions(cfg, explainer_factory=lambda name: explainer)
    records = read_jsonl(out / RECORDS_FILE)
    assert sorted(r["feature"] for r in records) == sorted(f for _, f in longest)
    assert all(r["raw"] and len(r["prompt_examples"]) >= 1 for r in records)
    for r in records:  # each prompt was cut down to whole examples that leave room for the 300 new tokens
        shown = [e for c in ("top", "quantile") for e in _contexts(tiny_topk)[r["feature"]][c]
                 if e["position"] in r["prompt_examples"]]
        assert explainer.count_tokens(explain_prompt(shown, {})) <= 1024 - 300
    assert "token_match (visible words) correlation" in capsys.readouterr().out  # the summary says what it reads


def _contexts(topk):
    return {r["feature"]: r for r in read_jsonl(topk / "layer_00" / "contexts.jsonl")}
