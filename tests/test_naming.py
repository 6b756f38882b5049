"""Whether a description names a concept category, and that one specifically (interp/ground_truth/naming.py)."""
import pytest

from data.synthetic_facts import CATEGORIES
from interp.ground_truth.naming import (
    AMBIGUOUS_NAMES,
    CATEGORY_PHRASES,
    GENERIC_DESCRIPTIONS,
    category_credit,
    shuffled_naming_rate,
)

ALL_NAMES = ", ".join(c.replace("_", " ") for c in CATEGORIES)


def credits(description):
    """Credit for every category of the corpus."""
    return {c: category_credit(description, c, CATEGORIES) for c in CATEGORIES}


# the cases of tests/test_ground_truth.py::test_names_category_is_strict, each with its own members
@pytest.mark.parametrize("description,category,members,named", [
    ('fires on "violin" (6%), "cello" (5%)', "instrument", ["violin", "cello"], True),  # two members
    ("names of countries", "country", ["France"], True),  # the category's name, plural
    ("an animal class such as mammals", "animal_class", ["mammal"], True),
    # a quoted example context is not the description's own words
    ('fires on "main" (11%); typical context: "the main <<tool>> of"', "tool", ["hammer"], False),
    (None, "tool", ["hammer"], False),
    # one member inside an ordinary phrase, or a letter inside "'s"
    ("the model's output", "symbol", ["S", "O", "Fe"], False),
    ("the first word", "ordinal", ["first", "second", "third"], False),
    ("one of several words", "number", ["one", "two", "three"], False),
    ("symbols such as Fe and O", "element_symbol", ["S", "O", "Fe"], True),  # case-aware members
    ("fires on s and fe", "element_symbol", ["S", "O", "Fe"], False),
])
def test_strict_cases_of_the_old_check_keep_their_answer(description, category, members, named):
    assert (category_credit(description, category, {category: members}) > 0) is named


@pytest.mark.parametrize("description,category", [
    ("the first or second word of a sentence", "ordinal"),
    ("one or two words", "number"),
    ("capital letters", "capital"),
    ("words in capital letters", "capital"),
    ("the object of a verb", "object"),
    ("any element of a list", "element"),
    ("a symbol such as # or @", "symbol"),
    ("symbols like + and =", "symbol"),
    ("numbers and punctuation", "number"),
    ("single capital letters such as C and S", "symbol"),
    ("the first, second or third token", "ordinal"),
    ("words that may march in a sentence", "month"),
])
def test_everyday_words_name_no_category(description, category):
    assert category_credit(description, category, CATEGORIES) == 0
    assert sum(credits(description).values()) == 0


@pytest.mark.parametrize("description,category,credit", [
    # the `tokens` baseline: quoted member tokens count, the quoted example context does not
    ('fires on "Paris" (12%), "Rome" (8%), "Lima" (5%), mostly at masked positions; typical context: '
     '"the capital of <<France>> is"', "capital", 1.0),
    ('fires on "Paris" (12%), "Rome" (8%), "Lima" (5%), mostly at masked positions; typical context: '
     '"the capital of <<France>> is"', "country", 0.0),
    ("fires on \"one\" (10%), \"two\" (5%)", "number", 1.0),  # everyday members, quoted
    ("fires on ' first' (9%), ' second' (4%)", "ordinal", 1.0),
    ("numbers like seven and eight", "number", 1.0),
    ("capital cities such as Paris", "capital", 1.0),
    ("chemical symbols", "symbol", 1.0),
    ("the chemical element symbols", "symbol", 1.0),  # a longer phrase wins over the shorter inside it
    ("chemical elements", "element", 1.0),
    ("ordinal numbers", "ordinal", 1.0),
    ("ordinal numbers", "number", 0.0),
    ("an animal class such as mammals", "animal", 0.0),
    ("mammals and birds", "animal_class", 1.0),
    ("the days of the week", "day", 1.0),
    ("the woodwind and brass families", "family", 1.0),
    ("a ripe banana, the sky, snow", "object", 1.0),
    ("months and colours", "month", 0.5),  # two categories named: half each
    ("the months May and June", "month", 1.0),
])
def test_specific_names_earn_credit_split_among_the_categories_named(description, category, credit):
    assert category_credit(description, category, CATEGORIES) == pytest.approx(credit)


def test_a_list_of_every_category_earns_one_in_total():
    got = credits(ALL_NAMES)
    assert all(v == pytest.approx(1 / 17) for v in got.values()), got
    assert sum(got.values()) == pytest.approx(1)
    plural = "countries, capitals, continents, animals, animal classes, colours, objects, numbers, elements, " \
             "symbols, months, ordinals, days, professions, tools, instruments, families"
    assert sum(credits(plural).values()) == pytest.approx(1)


def test_generic_descriptions_name_no_category():
    assert len(GENERIC_DESCRIPTIONS) == 18
    assert sum(sum(credits(d).values()) for d in GENERIC_DESCRIPTIONS) == 0
    rows = [{"category": c} for c in CATEGORIES]
    assert shuffled_naming_rate(rows, GENERIC_DESCRIPTIONS, CATEGORIES) == 0


def test_the_phrases_are_those_of_the_real_categories():
    assert set(CATEGORY_PHRASES) == set(CATEGORIES)
    assert AMBIGUOUS_NAMES <= set(CATEGORIES)


def test_the_shuffled_control_averages_the_credit():
    rows = [{"category": "instrument"}, {"category": "country"}]
    members = {"instrument": ["violin", "cello", "harp"], "country": ["France", "Spain", "Peru"]}
    pool = ["the first word of a sentence", "verbs in the past tense", "fires on the word the", "instruments"]
    rate = shuffled_naming_rate(rows, pool, members)
    assert 0 < rate < 0.2  # only "instruments", for one of the two categories
    assert shuffled_naming_rate([], pool, members) is None
    # a pool of category lists is credited at most 1 / 17 per draw, not 1
    everything = shuffled_naming_rate([{"category": c} for c in CATEGORIES], [ALL_NAMES], CATEGORIES, repeats=5)
    assert everything == pytest.approx(1 / 17)
    # the row's own description is never drawn
    own = shuffled_naming_rate([{"category": "month", "descriptions": {"e": "months"}}], ["months", "x"],
                               CATEGORIES, "e")
    assert own == 0
