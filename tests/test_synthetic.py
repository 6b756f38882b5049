import json

import numpy as np

from data import synthetic_facts as kb
from data.shards import read_shard
from data.synthetic import TEMPLATES, concept_table, corpus_stats, fact_prompts, generate_documents


def test_deterministic_for_a_seed():
    a = [d.text for d in generate_documents(20_000, seed=3)]
    assert a == [d.text for d in generate_documents(20_000, seed=3)]
    assert a != [d.text for d in generate_documents(20_000, seed=4)]


def test_size_is_adjustable():
    for n in (10_000, 100_000):
        total = sum(len(d.text) for d in generate_documents(n))
        assert n <= total < n + 2_000


def test_promised_breadth():
    stats = corpus_stats()
    assert stats["categories_with_10_or_more"] >= 8
    assert stats["templates_in_corpus"] >= 30
    relations = {t.relation for t in TEMPLATES if t.relation}
    assert len(relations) >= 8
    # every relation has a phrasing in the corpus and a held-out probe phrasing
    for r in relations:
        assert {t.probe for t in TEMPLATES if t.relation == r} == {True, False}


def test_spans_name_their_concepts():
    table = concept_table()
    docs = list(generate_documents(50_000, seed=1))
    assert all(len(d.text.split(". ")) >= 3 for d in docs)  # several sentences each
    for d in docs:
        for start, end, cid in d.spans:
            category, entity = table[cid - 1]
            assert d.text[start:end].lower() == entity.lower(), (d.text[start:end], entity)
            assert entity in kb.CATEGORIES[category]


def test_heldout_phrasings_never_appear_in_the_corpus_and_seen_ones_do():
    text = "\n".join(d.text for d in generate_documents(2_000_000, seed=0))
    facts = fact_prompts()
    heldout = [f for f in facts if f["phrasing"] == "heldout"]
    seen = [f for f in facts if f["phrasing"] == "seen"]
    assert len(heldout) == len(seen) > 300
    assert not any(f["prompt"] + f["answer"] in text for f in heldout)
    found = np.mean([f["prompt"] + f["answer"] in text for f in seen])
    assert found > 0.9, found
    for f in facts:
        assert f["answer"] in f["candidates"] and len(set(f["candidates"])) == len(f["candidates"]) >= 5


def test_labels_follow_the_text_through_tokenization(synthetic_data):
    """Every labelled token's text lies inside a span of that concept, and every span is labelled."""
    folder, tok, meta = synthetic_data
    docs = [json.loads(line) for line in (folder / meta["corpus"]).read_text().splitlines()]
    val = meta["shards"][0]
    tokens = np.asarray(read_shard(folder / val["file"]))
    labels = np.asarray(read_shard(folder / val["file"].replace(".bin", ".labels.bin")))
    starts = np.flatnonzero(tokens == tok.bos_id)
    assert len(starts) == val["n_docs"] and starts[0] == 0
    n_labelled = 0
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(tokens)
        doc = docs[val["first_doc"] + k]
        ids, labs = tokens[start + 1:end], labels[start + 1:end]
        assert tok.decode(ids) == doc["text"]
        pos, covered = 0, set()
        for tid, lab in zip(ids, labs):
            piece = tok.token_bytes(int(tid)).decode("utf-8")
            if lab:
                inner = pos + len(piece) - len(piece.lstrip())
                span = [s for s in doc["spans"] if s[0] <= inner and pos + len(piece) <= s[1]]
                assert span and span[0][2] == lab, (piece, doc["text"])
                covered.add(tuple(span[0]))
                n_labelled += 1
            pos += len(piece)
        assert covered == {tuple(s) for s in doc["spans"]}
    assert n_labelled > 300
