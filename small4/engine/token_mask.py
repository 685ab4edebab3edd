"""Grammar bitmasks -> the bool tensors the sampler applies.

A grammar matcher (``small4.chat.grammar.GrammarMatcher``, or anything with the same ``advance``) returns a
packed llguidance bitmask: little-endian 32-bit words, bit ``t`` set when token ``t`` may come next. The engine
never imports ``chat/``, so the matcher is typed here by its protocol only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class BitmaskMatcher(Protocol):
    def advance(self, output_token_ids: Sequence[int]) -> bytes | None:
        """Consume the unseen suffix of the output; return the bitmask of tokens allowed next (None: any token,
        e.g. a grammar that has not been triggered yet)."""
        ...


def bitmask_to_bool(bitmask: bytes, vocab_size: int) -> torch.Tensor:
    """Unpack a bitmask into a bool tensor ``[vocab_size]``: cropped when the grammar's vocabulary is longer
    than the model's, padded with False (disallowed) when it is shorter (a padded lm_head)."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")  # [8 * len(bitmask)]
    allowed = torch.from_numpy(bits[:vocab_size].view(np.bool_))  # [<= vocab_size]
    if allowed.shape[0] < vocab_size:
        allowed = torch.cat([allowed, torch.zeros(vocab_size - allowed.shape[0], dtype=torch.bool)])
    return allowed


def token_mask_provider(matcher: BitmaskMatcher, vocab_size: int) -> Callable[[list[int]], torch.Tensor | None]:
    """The ``token_mask`` hook for ``Engine.add_request``: called with the sequence's output token ids before
    each sampling step, returns the allowed tokens ``[vocab_size]``. One matcher (and provider) per sequence."""

    def provider(output_token_ids: list[int]) -> torch.Tensor | None:
        bitmask = matcher.advance(output_token_ids)
        return None if bitmask is None else bitmask_to_bool(bitmask, vocab_size)

    return provider


@dataclass(frozen=True)
class GrammarSpec:
    """What a grammar mask is built from, as data: the lark grammar text (as ``chat/grammar.py`` compiles it) and
    whether it applies only from the model's own trigger token on (``TriggeredMatcher``: tool_choice "auto").
    A factory that carries one can be rebuilt in another process (the engine core: ``small4/core/``)."""

    grammar: str
    triggered: bool = False


class GrammarMaskFactory:
    """A ``TokenMaskFactory`` that also says what it is made of: calling it builds one sequence's provider here;
    ``spec`` lets an engine in another process build the same matcher itself (a callable cannot cross)."""

    def __init__(self, spec: GrammarSpec, build: Callable[[], Callable[[list[int]], torch.Tensor | None]]) -> None:
        self.spec = spec
        self._build = build

    def __call__(self) -> Callable[[list[int]], torch.Tensor | None]:
        return self._build()
