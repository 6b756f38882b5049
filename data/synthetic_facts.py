"""The knowledge behind the synthetic corpus: concept categories, their members, and the relations.

Every relation maps one member of a category to one member of another, so a completion has exactly one
right answer among a known set of candidates (model/fact_eval.py measures chance against the strongest
of three guessers: uniform among the candidates, the majority answer, and shuffled answers).
"""
from __future__ import annotations

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# country: (capital, continent)
COUNTRIES = {
    "France": ("Paris", "Europe"), "Germany": ("Berlin", "Europe"), "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"), "Norway": ("Oslo", "Europe"), "Japan": ("Tokyo", "Asia"),
    "China": ("Beijing", "Asia"), "India": ("New Delhi", "Asia"), "Egypt": ("Cairo", "Africa"),
    "Kenya": ("Nairobi", "Africa"), "Brazil": ("Brasilia", "South America"), "Peru": ("Lima", "South America"),
    "Canada": ("Ottawa", "North America"), "Mexico": ("Mexico City", "North America"),
    "Australia": ("Canberra", "Oceania"),
}
# animal: class
ANIMALS = {
    "dog": "mammal", "cat": "mammal", "whale": "mammal", "horse": "mammal", "eagle": "bird", "owl": "bird",
    "penguin": "bird", "salmon": "fish", "shark": "fish", "frog": "amphibian", "salamander": "amphibian",
    "snake": "reptile", "turtle": "reptile", "lizard": "reptile", "bee": "insect", "ant": "insect",
    "butterfly": "insect",
}
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey"]
# object (as written in a sentence): colour
OBJECT_COLOURS = {
    "the sky": "blue", "fresh grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
    "a ripe tomato": "red", "a carrot": "orange", "a plum": "purple", "chocolate": "brown",
    "a flamingo": "pink", "ash": "grey", "a lemon": "yellow", "milk": "white", "a strawberry": "red",
}
COLOUR_MIXES = {("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
                ("red", "white"): "pink", ("black", "white"): "grey"}
# element: (symbol, atomic number)
ELEMENTS = {
    "hydrogen": ("H", 1), "helium": ("He", 2), "lithium": ("Li", 3), "carbon": ("C", 6), "nitrogen": ("N", 7),
    "oxygen": ("O", 8), "fluorine": ("F", 9), "neon": ("Ne", 10), "sodium": ("Na", 11),
    "magnesium": ("Mg", 12), "aluminium": ("Al", 13), "silicon": ("Si", 14), "sulfur": ("S", 16),
    "chlorine": ("Cl", 17), "argon": ("Ar", 18), "potassium": ("K", 19), "calcium": ("Ca", 20),
}
# profession: tool
PROFESSIONS = {
    "carpenter": "hammer", "painter": "brush", "doctor": "stethoscope", "farmer": "tractor", "chef": "knife",
    "tailor": "needle", "photographer": "camera", "astronomer": "telescope", "gardener": "shovel",
    "barber": "scissors", "plumber": "wrench", "writer": "pen",
}
# instrument: family
INSTRUMENTS = {
    "violin": "string", "cello": "string", "guitar": "string", "harp": "string", "flute": "woodwind",
    "clarinet": "woodwind", "oboe": "woodwind", "trumpet": "brass", "trombone": "brass", "tuba": "brass",
    "drum": "percussion", "xylophone": "percussion", "piano": "keyboard", "organ": "keyboard",
}


def _members() -> dict[str, list[str]]:
    return {
        "country": list(COUNTRIES), "capital": [c for c, _ in COUNTRIES.values()],
        "continent": sorted({k for _, k in COUNTRIES.values()}),
        "animal": list(ANIMALS), "animal_class": sorted(set(ANIMALS.values())),
        "colour": COLOURS, "object": list(OBJECT_COLOURS),
        "number": NUMBER_WORDS,
        "element": list(ELEMENTS), "symbol": [s for s, _ in ELEMENTS.values()],
        "month": MONTHS, "ordinal": ORDINALS, "day": DAYS,
        "profession": list(PROFESSIONS), "tool": list(PROFESSIONS.values()),
        "instrument": list(INSTRUMENTS), "family": sorted(set(INSTRUMENTS.values())),
    }


CATEGORIES: dict[str, list[str]] = _members()
