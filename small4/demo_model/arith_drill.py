"""Arithmetic drills: dense lines of the digit facts the curriculum's traces use, and whole two-digit sums.

Session 7's copy-spec runs copied the right digits into their traces but got the facts wrong ("Units: 9 + 3 =
10", "Tens: 7 + 1 + 1 = 10"): in the chat curriculum a fact is two answer tokens in a ~100-token example, so
the ~300 distinct facts get few, diluted looks. A drill line is the fact alone, in exactly the trace's
spelling (``9 + 3 = 12.``, ``7 + 1 + 1 = 9.``, ``13 - 6 = 7.``, ``6 - 1 - 3 = 2.``), a dozen per sequence, with
labels on the results only; half the lines are whole training-pair sums and differences (``79 + 13 = 92.``),
the answer that reasoning "none" writes without a trace. Held-out pairs (``split.heldout_pair``) never appear.

Session 8's runs then wrote true facts on the wrong digits ("79 + 13" traced as "Units: 7 + 1 = 8"): the trace
copies each number's units and tens digit from the question, which a fact line never asks. ``trace_drill``
packs whole traces after their question (``79 + 13: Units: 9 + 3 = 12, write 2 carry 1. Tens: ...``), labels on
the trace, so that copy gets dense looks too.

The tag is a control token the chat format never uses (``<SPECIAL_997>``), like the copy drills' tags.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from small4.demo_model import split
from small4.demo_model.copy_drill import IGNORE
from small4.demo_model.curriculum import EncodedExample, Example, add_trace, pack_until, sub_trace

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


def training_pair(rng: random.Random) -> tuple[int, int, bool]:
    """Two-digit operands ``a``, ``b`` and whether to subtract (then ``a >= b``), never a held-out pair."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(0, 99)
        sub = rng.random() < 0.5
        if sub:
            a, b = max(a, b), min(a, b)
        if not split.heldout_pair(a, b):
            return a, b, sub


def whole_sum(rng: random.Random) -> tuple[str, int]:
    """A training pair's sum or difference, the answer reasoning "none" writes directly."""
    a, b, sub = training_pair(rng)
    return (f"{a} - {b}", a - b) if sub else (f"{a} + {b}", a + b)


def training_trace(rng: random.Random) -> tuple[str, str]:
    """A training pair's question (``79 + 13``) and the trace the curriculum writes for it."""
    a, b, sub = training_pair(rng)
    return (f"{a} - {b}", sub_trace(a, b)) if sub else (f"{a} + {b}", add_trace(a, b))


def _labelled_lines(lines: list[tuple[str, str]], encode: Encode) -> EncodedExample:
    """``[ARITH_TAG] left right left right ...`` (a space after each right side) with labels on the rights."""
    tokens, labels = [ARITH_TAG], [IGNORE]
    space = encode(" ")  # before the next line: predicts nothing
    for left_text, right_text in lines:
        left, right = encode(left_text), encode(right_text)
        labels += [IGNORE] * (len(left) - 1) + [right[0]]
        labels += [*right[1:], IGNORE]
        tokens += [*left, *right, *space]
        labels += [IGNORE] * len(space)
    return EncodedExample(Example("drill_arith", [], {}), tokens, [0] * len(tokens), len(tokens), [], labels=labels)


def arith_drill(rng: random.Random, encode: Encode, whole_share: float = 0.5) -> EncodedExample:
    """``[ARITH_TAG] lhs = value. lhs = value. ...``: labels on each value and its full stop."""
    facts = [whole_sum(rng) if rng.random() < whole_share else digit_fact(rng) for _ in range(rng.randint(6, 14))]
    return _labelled_lines([(f"{lhs} = ", f"{value}.") for lhs, value in facts], encode)


def trace_drill(rng: random.Random, encode: Encode) -> EncodedExample:
    """``[ARITH_TAG] 79 + 13: Units: ... So 92. 52 - 17: Units: borrow, ...``: labels on each trace."""
    traces = [training_trace(rng) for _ in range(rng.randint(2, 4))]
    return _labelled_lines([(f"{question}: ", trace) for question, trace in traces], encode)


def arith_batch(
    rng: random.Random, encode: Encode, token_budget: int, trace_share: float = 0.5
) -> list[EncodedExample]:
    """Drills up to ``token_budget`` tokens, ``trace_share`` of the sequences whole traces, the rest fact lines."""

    def one() -> EncodedExample:
        return trace_drill(rng, encode) if rng.random() < trace_share else arith_drill(rng, encode)

    return pack_until(one, token_budget)
