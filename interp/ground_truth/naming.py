"""Does a feature's description name a concept category of the synthetic corpus, and that one specifically?

A description earns credit for a category when it names it by its name (or plural), by a phrase of its
own ("capital city", "chemical element", "ordinal number"), or by its members, outside quoted example
contexts ("… <<x>> …"). The credit is split among every category it names, so a description that lists
all 17 category names earns 1/17 for each (1 in total), not 17 categories.

Several category names are everyday words of feature descriptions: "number", "object", "element",
"symbol", "capital", "day", "family" ("one or two numbers", "the object of a verb", "an element of a list",
"capital letters"); so are some members ("one", "first", "May", "string", single letters such as C).
Those count only with help: a bare everyday name needs a member beside it, or a list of other categories
around it; an everyday member counts only quoted (as the `tokens` baseline writes its tokens) or beside
another member that is not everyday. Phrases that fix the everyday sense ("capital letters", "the object
of a verb") are removed before anything is matched.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

# Category names that are ordinary words in a description of a feature: alone they name nothing.
AMBIGUOUS_NAMES = {"number", "object", "element", "symbol", "capital", "day", "family"}

# Phrases that name a category of data/synthetic_facts.CATEGORIES specifically (their plurals count too).
CATEGORY_PHRASES: dict[str, list[str]] = {
    "country": ["country name", "nation"],
    "capital": ["capital city", "capital of a country", "capital of the country", "capitals of countries",
                "national capital", "capital of a nation"],
    "continent": ["continent name"],
    "animal": ["animal name", "animal species"],
    "animal_class": ["animal class", "class of animal", "classes of animals", "class of an animal",
                     "animal group", "group of animals", "groups of animals", "animal taxon", "animal taxa"],
    "colour": ["color", "colour name", "color name"],
    "object": ["coloured object", "colored object", "everyday object", "physical object", "natural object"],
    "number": ["number word", "numeral", "cardinal number", "counting number", "spelled-out number",
               "written-out number", "atomic number", "whole number", "number name", "names of numbers"],
    "element": ["chemical element", "element name", "name of an element", "names of elements",
                "names of chemical elements", "element of the periodic table", "elements of the periodic table"],
    "symbol": ["chemical symbol", "element symbol", "atomic symbol", "symbol of an element", "symbols of elements",
               "symbol of the element", "symbols of the elements", "symbol for an element",
               "symbols of chemical elements", "chemical element symbol"],
    "month": ["month name", "month of the year", "months of the year"],
    "ordinal": ["ordinal number", "ordinal word"],
    "day": ["day of the week", "days of the week", "weekday", "day name", "name of a day", "names of days",
            "names of the days"],
    "profession": ["occupation", "job title"],
    "tool": ["tool name"],
    "instrument": ["musical instrument"],
    "family": ["instrument family", "family of instruments", "families of instruments",
               "family of an instrument", "orchestra section", "section of the orchestra", "orchestral section"],
}

# Everyday senses of the ambiguous names: removed before matching, so they can never name a category.
EVERYDAY_PHRASES = [
    "capital letter", "capital letters", "capitalised", "capitalized", "in capitals", "capital I",
    "object of a verb", "object of the verb", "object of a sentence", "object of the sentence",
    "object of a preposition", "object of the preposition", "direct object", "indirect object",
    "element of a list", "element of the list", "elements of a list", "elements of the list", "list element",
    "element of an array", "array element", "element of a sequence", "element of a set",
    "a number of", "the number of", "number of words", "number of tokens", "phone number", "page number",
    "line number", "word family", "family of words", "day and night",
]

# Members that are everyday words; they count only quoted, or beside a member that is not one.
EVERYDAY_MEMBERS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                    "nineteen", "twenty", "first", "second", "third", "fourth", "fifth", "sixth", "seventh",
                    "eighth", "ninth", "tenth", "eleventh", "twelfth", "May", "March", "string", "keyboard",
                    "organ", "white", "black", "ash"}
# Members whose lower-case spelling is an everyday word ("may", "march"): matched case-sensitively.
CASE_SENSITIVE_MEMBERS = {"May", "March"}

GENERIC_DESCRIPTIONS: list[str] = [
    "the first word of a sentence",
    "the first or second word of a sentence",
    "one or two words before the end of a sentence",
    "tokens in the first, second or third position",
    "words in capital letters",
    "single capital letters such as A, B and C",
    "numbers and punctuation",
    "a number of short function words",
    "the object of a verb",
    "the subject or object of a sentence, usually a noun",
    "an element of a list",
    "the last element of a list, before a full stop",
    "symbols like + and =",
    "a symbol such as # or @ in the middle of a word",
    "words that may begin a sentence, such as The or A",
    "time words such as day, night and year",
    "a word from the same family as the previous one",
    "a string of characters typed on a keyboard",
]

_QUOTED_CONTEXT = re.compile(r'"[^"]*<<[^"]*"|“[^”]*<<[^”]*”')
_OPEN_QUOTE = re.compile(r"[\"'“‘]\s*$")
_CLOSE_QUOTE = re.compile(r"^\s*[\"'”’]")


def _plurals(phrase: str) -> set[str]:
    """The phrase and its last word's plural forms ("capital city" → "capital cities")."""
    head, _, last = phrase.rpartition(" ")
    prefix = head + " " if head else ""
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    if last.endswith("ss"):
        forms.discard(last + "s")
    return {prefix + f for f in forms}


def _pattern(word: str, case_sensitive: bool) -> re.Pattern:
    # a whole word, but not the "s" of "model's" nor a "don" of "don't"
    return re.compile(rf"(?<!\w)(?<!\w['’]){re.escape(word)}(?!\w)(?!['’]\w)", 0 if case_sensitive else re.IGNORECASE)


def _member_forms(member: str) -> set[str]:
    m = member.strip()
    forms = {m}
    bare = re.sub(r"^(the|a|an) ", "", m)
    forms.add(bare)
    if " " in bare and bare.islower():
        forms.add(bare.rsplit(" ", 1)[1])  # "a ripe banana" → "banana"
    if len(m) > 2 and not m.isupper() and m not in EVERYDAY_MEMBERS:
        forms |= {p for f in set(forms) for p in _plurals(f)}
    return forms


def _is_weak(member: str) -> bool:
    m = member.strip()
    return m in EVERYDAY_MEMBERS or (len(m) == 1 and m.isupper())


@lru_cache(maxsize=64)
def _patterns(table: tuple[tuple[str, tuple[str, ...]], ...]) -> list[tuple[re.Pattern, str | None, str, bool]]:
    """(pattern, category or None, kind, weak) for every phrase, name and member, longest text first.
    kind: "specific" (names the category alone), "bare" (an everyday name), "member", "everyday" (none)."""
    entries: dict[tuple[str, str | None, str], bool] = {}
    for phrase in EVERYDAY_PHRASES:
        entries[(phrase, None, "everyday")] = False
    for category, members in table:
        name = category.replace("_", " ")
        for form in _plurals(name):
            entries[(form, category, "bare" if name in AMBIGUOUS_NAMES else "specific")] = False
        for phrase in CATEGORY_PHRASES.get(category, []):
            for form in _plurals(phrase):
                entries[(form, category, "specific")] = False
        for member in members:
            for form in _member_forms(member):
                entries.setdefault((form, category, "member"), _is_weak(member))
    out: list[tuple[re.Pattern, str | None, str, bool]] = []
    for (text, named, kind), weak in sorted(entries.items(), key=lambda e: -len(e[0][0])):
        case = kind == "member" and (len(text) <= 2 or text.isupper() or text in CASE_SENSITIVE_MEMBERS)
        out.append((_pattern(text, case), named, kind, weak))
    return out


@lru_cache(maxsize=4096)
def _named(description: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> frozenset[str]:
    """The categories a description names (see the module's docstring)."""
    text = _QUOTED_CONTEXT.sub(" ", description)
    specific: set[str] = set()
    bare: set[str] = set()
    strong: dict[str, set[str]] = {}
    weak: dict[str, set[str]] = {}
    for pattern, category, kind, is_weak in _patterns(table):
        for m in list(pattern.finditer(text)):
            quoted = _OPEN_QUOTE.search(text[:m.start()]) and _CLOSE_QUOTE.search(text[m.end():])
            text = text[:m.start()] + " " * (m.end() - m.start()) + text[m.end():]
            if category is None:
                continue
            if kind == "specific":
                specific.add(category)
            elif kind == "bare":
                bare.add(category)
            elif is_weak and not quoted:
                weak.setdefault(category, set()).add(m.group(0).lower())
            else:
                strong.setdefault(category, set()).add(m.group(0).lower())
    named = set(specific)
    for category, found in strong.items():
        if len(found) + len(weak.get(category, ())) >= 2 or category in bare:
            named.add(category)
    for category in bare:
        if len(weak.get(category, ())) >= 2:  # "numbers such as one and two"
            named.add(category)
    # a bare everyday name inside a list of categories ("countries, capitals, numbers") is one of them
    listed = {c for c in bare if len(named - {c}) >= 2}
    return frozenset(named | listed)


def _table(members: dict[str, list[str]], category: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    table = {c: tuple(m) for c, m in members.items()}
    table.setdefault(category, ())
    return tuple(sorted(table.items()))


def category_credit(description: str | None, category: str, members: dict[str, list[str]]) -> float:
    """Credit in [0, 1] for `description` naming `category` specifically: 0 when it does not name it,
    else 1 / (the number of categories it names). `members` maps every category to its member entities."""
    if not description:
        return 0.0
    named = _named(description, _table(members, category))
    return 1 / len(named) if category in named else 0.0


def shuffled_naming_rate(rows: list[dict], pool: list[str], members: dict[str, list[str]], explainer: str = "",
                         repeats: int = 50, seed: int = 0) -> float | None:
    """The negative control: the mean credit of descriptions of other, random features (drawn from all of
    an explainer's descriptions but the row's own) for the row's category, over `repeats` draws. Near 0
    unless the check is lenient."""
    rng = random.Random(seed)
    total = 0.0
    n = 0
    for r in rows:
        own = r.get("descriptions", {}).get(explainer)
        others = [d for d in pool if d != own]
        for _ in range(repeats if others else 0):
            total += category_credit(rng.choice(others), r["category"], members)
            n += 1
    return total / n if n else None
