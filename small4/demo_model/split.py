"""What the demo model never sees in training: the one place that splits names, words and numbers.

The v2 curriculum (``curriculum_v2``) and the held-out evaluation (``heldout``) draw from disjoint pools, so the
held-out numbers measure generalisation, not recall:

* number pairs: ``heldout_pair(a, b)`` keeps about one pair in seven for evaluation; the training generator
  redraws any such pair, the held-out one draws only those (every operand also occurs in training, never the
  pair: the model must add, not remember);
* tool-argument integers: ``heldout_number(n)`` (about one in eleven from 10 up); training never writes one,
  held-out arguments of two or more digits are only such numbers;
* words: tool names, parameter names, string and enum values, result keys, JSON keys and greetings of the
  held-out generator come from lists that share no entry with the training lists, nor with the v1 curriculum's
  (``calculator``, ``get_weather``, its cities), which the shipped model was trained on.

``is_training_word`` is how the training generator refuses a random pseudo-word that happens to be a held-out one.
"""

from __future__ import annotations


def heldout_pair(a: int, b: int) -> bool:
    """About 1/7 of operand pairs (ordered) are held out of training arithmetic."""
    return (a * 31 + b * 17) % 7 == 3


def heldout_number(n: int) -> bool:
    """About 1/11 of the integers from 10 up are held out of training tool arguments (single digits never are:
    a model that never wrote a lone 3 could not copy one)."""
    return abs(n) >= 10 and (abs(n) * 7919 + 3) % 11 == 0


# -- training pools -------------------------------------------------------------------------------------------

TRAIN_VERBS = ("get", "find", "fetch", "check", "list", "create", "send", "read", "make", "count", "set", "open")
TRAIN_NOUNS = (
    "book", "song", "recipe", "ticket", "order", "note", "user", "file", "price", "movie", "planet", "train",
    "score", "word", "color", "event", "team", "room", "stock", "time",
)  # fmt: skip
TRAIN_PARAMS = (
    "name", "title", "query", "id", "count", "limit", "year", "size", "page", "level", "text", "code", "label",
    "mode", "key", "value", "item", "tag", "owner", "number", "rating", "score", "enabled", "verbose", "unit",
)  # fmt: skip
TRAIN_VALUES = (
    "apple", "river", "stone", "cloud", "tiger", "violin", "garden", "rocket", "pepper", "marble", "candle",
    "forest", "silver", "winter", "falcon", "harbor", "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo",
    "Lisbon", "Vienna", "Oslo", "Cairo", "Lima", "Seoul", "Anna", "Marco", "Yuki", "Omar", "Lena", "Tom",
)  # fmt: skip
TRAIN_ENUMS = (("small", "medium", "large"), ("low", "high"), ("asc", "desc"), ("red", "green", "blue"))
SYLLABLES = ("ka", "zo", "ri", "mu", "te", "xo", "bel", "dra", "fin", "gor", "lu", "pex", "qua", "sim", "vo", "yn")

# -- held-out pools (disjoint from the above and from curriculum.py's) -------------------------------------------

HELDOUT_PLACES = (
    "Nairobi", "Dublin", "Quito", "Hanoi", "Zagreb", "Perth", "Accra", "Bergen", "Kyoto", "Porto", "Tallinn",
    "Havana", "Denver", "Lyon", "Riga", "Malaga",
)  # fmt: skip
HELDOUT_PEOPLE = ("Jakob", "Priya", "Carmen", "Elias", "Nadia", "Hugo")
HELDOUT_THINGS = ("pumpkin", "lantern", "meadow", "copper", "glacier", "walnut")
HELDOUT_VALUES = (*HELDOUT_PLACES, *HELDOUT_PEOPLE, *HELDOUT_THINGS)
HELDOUT_PARAMS = (
    "location", "days", "destination", "origin", "amount", "currency", "language", "sentence", "symbol",
    "quantity", "guests", "date", "formula", "product", "email", "urgent", "radius", "topic", "passengers",
)  # fmt: skip
HELDOUT_CURRENCIES = ("USD", "EUR", "JPY", "GBP")  # held-out enum values
HELDOUT_LANGUAGES = ("French", "German", "Spanish")
HELDOUT_RESULT_KEYS = ("outlook", "fare", "rate", "translation", "seats", "confirmation")
HELDOUT_TOOL_NAMES = (
    "search_flights", "convert_currency", "translate_phrase", "get_forecast", "solve_formula", "reserve_table",
    "quote_share", "mail_contact",
)  # fmt: skip


def is_training_word(word: str) -> bool:
    """False for any word the held-out generator uses (names, parameters, values), whatever the case."""
    return word.lower() not in _HELDOUT_LOWER


_HELDOUT_WORDS = (
    *HELDOUT_VALUES, *HELDOUT_PARAMS, *HELDOUT_TOOL_NAMES, *HELDOUT_CURRENCIES, *HELDOUT_LANGUAGES, *HELDOUT_RESULT_KEYS
)  # fmt: skip
_HELDOUT_LOWER = {w.lower() for w in _HELDOUT_WORDS} | {
    part for name in HELDOUT_TOOL_NAMES for part in name.split("_") if part != "get"
}
