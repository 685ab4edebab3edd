"""Copy drills: synthetic token sequences that build the induction circuit before (and beside) the chat curriculum.

Issue 17's held-out skills (tool arguments, JSON values, ``a + b`` restated, tool results read back) all copy
tokens from the prompt, and both v2 runs that trained on the chat curriculum alone copied nothing ("79 + 13" ->
"73 + 97 = 101."). Copying in context takes two attention heads that compose: one writes "my previous token"
into each position, a later one finds the earlier position whose previous token is the current token and
copies what stands there. Probes on the small size (one core, lr 3e-3, random BPE tokens; teacher-forced
accuracy on held-out drills, session 6's note has the numbers):

* a **repeat** drill with long sequences (4-48 token segment, ~80 tokens in all) stays on the unigram plateau
  (loss ~7.6, accuracy 0.02 after 1500 steps), alone or mixed with the previous-token drill;
* a **previous-token** drill alone (predict the token *before*) is learned in under 200 steps;
* **short** repeat drills (2-12 token segment, ~20 tokens), 30% previous-token drills beside them, 1024-token
  batches, leave the plateau within ~400 steps (repeat accuracy 0.05 at 400, 0.20 at 1000 steps): the time an
  induction head takes to form grows with the context length, and small batches reach it on fewer tokens. It is
  fragile: of two ``train-demo`` runs with the same seed and drills (they differ only in the wall-clock-driven
  learning rate), one reached repeat loss 0.2 by step 1500, the other was still at 4.6 and never formed it.

So the drill phase trains on short drills; later batches keep a share of drills, half of them long, to stretch
the circuit to the distances a chat prompt has. Tags are two control tokens the chat format never uses
(``<SPECIAL_998>`` / ``<SPECIAL_999>``), so a drill never looks like a conversation. Labels are explicit
(``EncodedExample.labels``): the previous-token drill's targets are not next tokens.
"""

from __future__ import annotations

import random

from small4.demo_model.curriculum import EncodedExample, Example, pack_until

PREVIOUS_TAG = 998  # at each position, predict the token before it
REPEAT_TAG = 999  # predict the repeated segment from its earlier occurrence
FIRST_BPE_ID = 1000  # tekken: ids below are control tokens
IGNORE = -100


def previous_token_drill(rng: random.Random, vocab_size: int) -> EncodedExample:
    """``[PREVIOUS_TAG] t1 .. tn``: the label at ``t_i`` is ``t_{i-1}`` (the tag for ``t1``)."""
    body = _random_tokens(rng, vocab_size, rng.randint(8, 60))
    tokens = [PREVIOUS_TAG, *body]
    labels = [IGNORE, *tokens[:-1]]
    return _encoded("drill_previous", tokens, labels)


def repeat_drill(rng: random.Random, vocab_size: int, long: bool = False) -> EncodedExample:
    """``[REPEAT_TAG] prefix segment filler segment``: labels on the second segment, from its second token on.

    Short drills (a 2-12 token segment, about 20 tokens in all) are the ones that get off the plateau: the time
    an induction head takes to form grows with the context length. Long ones (4-48 token segments, up to ~140
    tokens) stretch the formed circuit to the distances a chat prompt has."""
    seg, pre, fill = ((4, 48), (0, 30), (0, 10)) if long else ((2, 12), (0, 6), (0, 4))
    segment = _random_tokens(rng, vocab_size, rng.randint(*seg))
    prefix = _random_tokens(rng, vocab_size, rng.randint(*pre))
    filler = _random_tokens(rng, vocab_size, rng.randint(*fill))
    tokens = [REPEAT_TAG, *prefix, *segment, *filler, *segment]
    start = len(tokens) - len(segment)  # the repeat's first token; what follows it is predictable
    labels = [IGNORE] * len(tokens)
    for i in range(start, len(tokens) - 1):
        labels[i] = tokens[i + 1]
    return _encoded("drill_repeat", tokens, labels)


def drill_batch(
    rng: random.Random, vocab_size: int, token_budget: int, previous_share: float = 0.3, long_share: float = 0.0
) -> list:
    """Drills until the budget would pass: previous-token with probability ``previous_share``, else repeat
    (long with probability ``long_share``)."""

    def draw() -> EncodedExample:
        if rng.random() < previous_share:
            return previous_token_drill(rng, vocab_size)
        return repeat_drill(rng, vocab_size, long=rng.random() < long_share)

    return pack_until(draw, token_budget)


def _random_tokens(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    return [rng.randrange(FIRST_BPE_ID, vocab_size) for _ in range(n)]


def _encoded(task: str, tokens: list[int], labels: list[int]) -> EncodedExample:
    mask = [0] * len(tokens)  # unused when labels are given
    return EncodedExample(Example(task, [], {}), tokens, mask, len(tokens), [], labels=labels)
