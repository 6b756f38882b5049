"""The synthetic ground-truth corpus: educational-style documents whose every concept mention is known.

A document picks one topic, opens with an introduction, then says 3-8 things about that topic's
entities from sentence templates. Every slot filled in a template is recorded as a character span with
its concept (category, entity). Each fact relation also has one *probe* phrasing that never appears in
the corpus; `facts.jsonl` lists every fact both in a phrasing the corpus uses ("seen") and in the probe
phrasing ("heldout"), as (prompt, answer) pairs with the candidate answers, so chance is known.
Deterministic for a seed.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterator

from data import synthetic_facts as kb

# slot name → category (slots of one category in one sentence get distinct names)
SLOT_CATEGORY = {
    "country": "country", "capital": "capital", "continent": "continent", "animal": "animal",
    "class": "animal_class", "object": "object", "colour": "colour", "colour1": "colour", "colour2": "colour",
    "colour3": "colour", "a": "number", "b": "number", "c": "number", "element": "element",
    "symbol": "symbol", "number": "number", "month": "month", "next_month": "month", "ordinal": "ordinal",
    "day": "day", "next_day": "day", "profession": "profession", "tool": "tool", "instrument": "instrument",
    "family": "family",
}


def _frames() -> dict[str, list[dict[str, str]]]:
    """Every consistent assignment of entities to the slots of each frame."""
    n = kb.NUMBER_WORDS
    return {
        "country": [{"country": k, "capital": cap, "continent": cont} for k, (cap, cont) in kb.COUNTRIES.items()],
        "animal": [{"animal": a, "class": c} for a, c in kb.ANIMALS.items()],
        "object_colour": [{"object": o, "colour": c} for o, c in kb.OBJECT_COLOURS.items()],
        "mix": [{"colour1": a, "colour2": b, "colour3": c} for (a, b), c in kb.COLOUR_MIXES.items()],
        "sum": [{"a": n[a], "b": n[b], "c": n[a + b]} for a in range(21) for b in range(21 - a)],
        "product": [{"a": n[a], "b": n[b], "c": n[a * b]} for a in range(2, 11) for b in range(2, 11) if a * b <= 20],
        "successor": [{"a": n[i], "b": n[i + 1]} for i in range(20)],
        "element": [{"element": e, "symbol": s, "number": n[z]} for e, (s, z) in kb.ELEMENTS.items()],
        "month": [{"month": m, "next_month": kb.MONTHS[(i + 1) % 12], "ordinal": kb.ORDINALS[i]}
                  for i, m in enumerate(kb.MONTHS)],
        "day": [{"day": d, "next_day": kb.DAYS[(i + 1) % 7]} for i, d in enumerate(kb.DAYS)],
        "profession": [{"profession": p, "tool": t} for p, t in kb.PROFESSIONS.items()],
        "instrument": [{"instrument": i, "family": f} for i, f in kb.INSTRUMENTS.items()],
    }


@dataclass(frozen=True)
class Template:
    topic: str
    frame: str
    text: str
    relation: str | None = None  # a fact template: the relation it states ...
    answer: str | None = None  # ... and the slot that holds the answer
    probe: bool = False  # the held-out phrasing: never written into the corpus


def T(topic, frame, text, relation=None, answer=None, probe=False) -> Template:
    return Template(topic, frame, text, relation, answer, probe)


TEMPLATES = [
    # geography
    T("geography", "country", "The capital of {country} is {capital}.", "capital_of", "capital"),
    T("geography", "country", "The capital city of {country} is called {capital}.", "capital_of", "capital", True),
    T("geography", "country", "{country} is a country in {continent}.", "continent_of", "continent"),
    T("geography", "country", "{country} lies on the continent of {continent}.", "continent_of", "continent", True),
    T("geography", "country", "{capital} is the capital city of {country}."),
    T("geography", "country", "Many travellers visit {capital} when they go to {country}."),
    T("geography", "country", "The people of {country} are proud of {capital}."),
    # animals
    T("animals", "animal", "The {animal} is a {class}.", "animal_class", "class"),
    T("animals", "animal", "Biologists put the {animal} in the group of the {class}.", "animal_class", "class", True),
    T("animals", "animal", "A {animal} is a kind of {class}."),
    T("animals", "animal", "Scientists classify the {animal} as a {class}."),
    T("animals", "animal", "Children often learn about the {animal} at school."),
    # colours
    T("colours", "object_colour", "The colour of {object} is {colour}.", "object_colour", "colour"),
    T("colours", "object_colour", "If you look at {object}, you see the colour {colour}.", "object_colour",
      "colour", True),
    T("colours", "object_colour", "{object} is usually {colour}."),
    T("colours", "mix", "Mixing {colour1} and {colour2} makes {colour3}.", "colour_mix", "colour3"),
    T("colours", "mix", "A painter who blends {colour1} with {colour2} gets {colour3}.", "colour_mix", "colour3",
      True),
    T("colours", "object_colour", "Many flags use the colour {colour}."),
    # numbers
    T("numbers", "sum", "{a} plus {b} equals {c}.", "sum", "c"),
    T("numbers", "sum", "What is {a} plus {b}? The answer is {c}.", "sum", "c", True),
    T("numbers", "sum", "{c} minus {b} equals {a}."),
    T("numbers", "sum", "If you have {a} apples and get {b} more, you have {c} apples."),
    T("numbers", "product", "{a} times {b} is {c}."),
    T("numbers", "successor", "The number after {a} is {b}.", "successor", "b"),
    T("numbers", "successor", "Counting up, right after {a} comes {b}.", "successor", "b", True),
    # chemistry
    T("chemistry", "element", "The chemical symbol for {element} is {symbol}.", "element_symbol", "symbol"),
    T("chemistry", "element", "Chemists write {element} with the symbol {symbol}.", "element_symbol", "symbol", True),
    T("chemistry", "element", "The atomic number of {element} is {number}.", "atomic_number", "number"),
    T("chemistry", "element", "An atom of {element} has an atomic number of {number}.", "atomic_number", "number",
      True),
    T("chemistry", "element", "{symbol} is the symbol of {element}."),
    T("chemistry", "element", "{element} has {number} protons in each atom."),
    # the calendar
    T("calendar", "month", "The month after {month} is {next_month}.", "next_month", "next_month"),
    T("calendar", "month", "When {month} ends, the next month is {next_month}.", "next_month", "next_month", True),
    T("calendar", "month", "{month} is the {ordinal} month of the year."),
    T("calendar", "month", "{month} comes before {next_month}."),
    T("calendar", "day", "The day after {day} is {next_day}.", "next_day", "next_day"),
    T("calendar", "day", "When {day} is over, the next day is {next_day}.", "next_day", "next_day", True),
    T("calendar", "day", "{day} comes before {next_day}."),
    # jobs
    T("jobs", "profession", "A {profession} works with a {tool}.", "tool_of", "tool"),
    T("jobs", "profession", "The most useful tool for a {profession} is a {tool}.", "tool_of", "tool", True),
    T("jobs", "profession", "Every {profession} needs a good {tool}."),
    T("jobs", "profession", "A {tool} is the main tool of a {profession}."),
    # music
    T("music", "instrument", "The {instrument} belongs to the {family} family.", "instrument_family", "family"),
    T("music", "instrument", "In an orchestra, the {instrument} sits with the {family} instruments.",
      "instrument_family", "family", True),
    T("music", "instrument", "Musicians play the {instrument} in the {family} section."),
    T("music", "instrument", "Learning the {instrument} takes years of practice."),
]

TOPIC_NAMES = {"geography": "geography", "animals": "animals", "colours": "colours", "numbers": "numbers",
               "chemistry": "chemistry", "calendar": "the calendar", "jobs": "jobs and their tools",
               "music": "musical instruments"}
INTROS = ["This lesson is about {}.", "Here are some facts about {}.", "Today we learn about {}.",
          "Let us review what we know about {}."]
OUTROS = ["These facts often appear in school tests.", "Try to remember them for the next quiz.",
          "Read the sentences again to remember them."]

SLOT_RE = re.compile(r"\{(\w+)\}")


def concept_table() -> list[tuple[str, str]]:
    """(category, entity) for every concept; its index + 1 is the concept's label id (0 = no concept)."""
    return [(cat, member) for cat, members in kb.CATEGORIES.items() for member in members]


@dataclass
class Document:
    text: str
    spans: list[tuple[int, int, int]]  # (start, end, concept id), character offsets into text


def render(template: Template, binding: dict[str, str], concept_ids: dict[tuple[str, str], int],
           stop_at: str | None = None) -> tuple[str, list[tuple[int, int, int]]]:
    """Fill a template, recording a span per slot; with `stop_at`, return only the text before that slot."""
    out, pos = "", 0
    spans: list[tuple[int, int, int]] = []
    for m in SLOT_RE.finditer(template.text):
        out += template.text[pos:m.start()]
        slot = m.group(1)
        entity = binding[slot]
        if re.search(r"(^|\s)[Aa] $", out) and entity[0] in "aeiou":
            out = out[:-1] + "n "  # "a insect" → "an insect"
        if slot == stop_at:
            return _capitalise(out.rstrip()), spans
        spans.append((len(out), len(out) + len(entity), concept_ids[(SLOT_CATEGORY[slot], entity)]))
        out += entity
        pos = m.end()
    out += template.text[pos:]
    return _capitalise(out), spans


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]  # same length, so spans stay valid


def generate_documents(n_chars: int, seed: int = 0) -> Iterator[Document]:
    """Documents until about `n_chars` characters have been written."""
    rng = random.Random(seed)
    frames = _frames()
    ids = {c: i + 1 for i, c in enumerate(concept_table())}
    by_topic = {t: [tp for tp in TEMPLATES if tp.topic == t and not tp.probe] for t in TOPIC_NAMES}
    written = 0
    while written < n_chars:
        topic = rng.choice(list(TOPIC_NAMES))
        text, spans = "", []
        sentences: list[tuple[str, list]] = []
        if rng.random() < 0.8:
            sentences.append((rng.choice(INTROS).format(TOPIC_NAMES[topic]), []))
        for _ in range(rng.randint(3, 8)):
            tp = rng.choice(by_topic[topic])
            sentences.append(render(tp, rng.choice(frames[tp.frame]), ids))
        if rng.random() < 0.3:
            sentences.append((rng.choice(OUTROS), []))
        for sentence, sent_spans in sentences:
            if text:
                text += " "
            spans += [(s + len(text), e + len(text), c) for s, e, c in sent_spans]
            text += sentence
        written += len(text)
        yield Document(text, spans)


def fact_prompts() -> list[dict]:
    """Every fact in the corpus's own phrasing ("seen") and in its probe phrasing ("heldout")."""
    frames = _frames()
    ids = {c: i + 1 for i, c in enumerate(concept_table())}
    facts = []
    for tp in TEMPLATES:
        if tp.relation is None or tp.answer is None:
            continue
        category = SLOT_CATEGORY[tp.answer]
        for binding in frames[tp.frame]:
            prompt, _ = render(tp, binding, ids, stop_at=tp.answer)
            facts.append({"prompt": prompt, "answer": " " + binding[tp.answer], "relation": tp.relation,
                          "phrasing": "heldout" if tp.probe else "seen", "category": category,
                          "candidates": [" " + m for m in kb.CATEGORIES[category]]})
    return facts


def corpus_stats() -> dict[str, int]:
    """Counts that the documentation promises (categories, members, templates)."""
    return {"categories": len(kb.CATEGORIES),
            "categories_with_10_or_more": sum(len(m) >= 10 for m in kb.CATEGORIES.values()),
            "templates_in_corpus": sum(not t.probe for t in TEMPLATES),
            "probe_templates": sum(t.probe for t in TEMPLATES),
            "facts": len(fact_prompts())}
