"""Arithmetic drills: dense lines of the digit facts the curriculum's traces use, and whole two-digit sums.

Session 7's copy-spec runs copied the right digits into their traces but got the facts wrong ("Units: 9 + 3 =
10", "Tens: 7 + 1 + 1 = 10"): in the chat curriculum a fact is two answer tokens in a ~100-token example, so
the ~300 distinct facts get few, diluted looks. A drill line is the fact alone, in exactly the trace's
spelling (``9 + 3 = 12.``, ``7 + 1 + 1 = 9.``, ``13 - 6 = 7.``, ``6 - 1 - 3 = 2.``), a dozen per sequence, with
labels on the results only; half the lines are whole training-pair sums and differences (``79 + 13 = 92.``),
the answer that reasoning "none" writes without a trace. Held-out pairs (``split.heldout_pair``) never appear.

The tag is a control token the chat format never uses (``<SPECIAL_997>``), like the copy drills' tags.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from small4.demo_model import split
from small4.demo_model.copy_drill import IGNORE
from small4.demo_model.curriculum import EncodedExample, Example, pack_until

ARITH_TAG = 997
Encode = Callable[[str], list[int]]


def digit_fact(rng: random.Random) -> tuple[str, int]:
    """One single-digit step of an ``add_trace`` / ``sub_trace``: its left side and its value."""
    x, y = rng.randint(0, 9), rng.randint(0, 9)
    kind = rng.randrange(5)
    if kind == 0:
        return f"{x} + {y}", x + y  # units, and tens without a carry
    if kind == 1:
        return f"{x} + {y} + 1", x + y + 1  # tens with the carry
    if kind == 2:
        x, y = max(x, y), min(x, y)
        return f"{x} - {y}", x - y  # units without a borrow, tens
    if kind == 3:
        y = rng.randint(1, 9)
        x = rng.randint(0, y - 1)
        return f"{x + 10} - {y}", x + 10 - y  # units after a borrow
    x = rng.randint(1, 9)
    y = rng.randint(0, x - 1)
    return f"{x} - 1 - {y}", x - 1 - y  # tens after a borrow


def whole_sum(rng: random.Random) -> tuple[str, int]:
    """A training pair's sum or difference, the answer reasoning "none" writes directly."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(0, 99)
        sub = rng.random() < 0.5
        if sub:
            a, b = max(a, b), min(a, b)
        if not split.heldout_pair(a, b):
            return (f"{a} - {b}", a - b) if sub else (f"{a} + {b}", a + b)


def arith_drill(rng: random.Random, encode: Encode, whole_share: float = 0.5) -> EncodedExample:
    """``[ARITH_TAG] lhs = value. lhs = value. ...``: labels on each value and its full stop."""
    tokens, labels = [ARITH_TAG], [IGNORE]
    space = encode(" ")  # before the next line: predicts nothing
    for _ in range(rng.randint(6, 14)):
        lhs, value = whole_sum(rng) if rng.random() < whole_share else digit_fact(rng)
        left = encode(f"{lhs} = ")
        right = encode(f"{value}.")
        labels += [IGNORE] * (len(left) - 1) + [right[0]]
        labels += [*right[1:], IGNORE]
        tokens += [*left, *right, *space]
        labels += [IGNORE] * len(space)
    return EncodedExample(Example("drill_arith", [], {}), tokens, [0] * len(tokens), len(tokens), [], labels=labels)


def arith_batch(rng: random.Random, encode: Encode, token_budget: int) -> list[EncodedExample]:
    return pack_until(lambda: arith_drill(rng, encode), token_budget)
