"""Token ids -> text, one token at a time, with stop strings.

Tokens are byte sequences (tekken is byte-level), so one character may span several tokens: bytes go through
an incremental UTF-8 decoder that holds an incomplete sequence until it completes. Stop strings are matched on
the decoded text. Text that might still grow into a stop string is held back until it is disambiguated, so a
stop string never reaches the client, even when it is split across several tokens.

Stop semantics: generation stops at the first position of the text at which some stop string ends (the same
answer a character-by-character matcher gives, whatever the tokenisation); among stop strings ending there,
the longest wins. Output is truncated before the match (or after it with ``include_stop_str_in_output``).
``min_tokens`` defers stop strings as it defers EOS and stop ids (as vLLM does): a stop string counts only when
it ends in the ``min_tokens``-th output token or later; one complete before that is ordinary text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from small4.engine.sampling_params import SamplingParams


class IncrementalDetokenizer:
    """Decodes one request's output tokens as they arrive; ``add`` returns only text that is safe to release.

    ``text`` is everything released so far, ``stopped`` the matched stop string (None until one matches).
    The work per token is bounded by the longest stop string plus the token's own text, so long outputs stay
    linear.
    """

    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        is_special: Callable[[int], bool],
        params: SamplingParams,
    ) -> None:
        self._token_bytes = token_bytes
        self._is_special = is_special
        self._skip_special = params.skip_special_tokens
        self._kept_special = frozenset(params.kept_special_token_ids)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0  # tokens fed to add(), skipped specials included (they count for min_tokens)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded, not yet released: always shorter than the longest stop string
        self._chunks: list[str] = []
        self.stopped: str | None = None

    @property
    def text(self) -> str:
        """All text released so far (by ``add`` and ``flush``)."""
        return "".join(self._chunks)

    @property
    def held_text(self) -> str:
        """Decoded text withheld because it may be the start of a stop string."""
        return self._held

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the newly releasable text (possibly empty)."""
        if self.stopped is not None:
            return ""
        self._num_tokens += 1
        if self._skip_special and self._is_special(token_id) and token_id not in self._kept_special:
            return ""
        return self._release(self._decoder.decode(self._token_bytes(token_id)), final=False)

    def flush(self) -> str:
        """End of generation without a stop string: release what was held (an incomplete UTF-8 tail becomes
        U+FFFD). Returns "" once a stop string has matched, since nothing after it may be released."""
        if self.stopped is not None:
            return ""
        return self._release(self._decoder.decode(b"", final=True), final=True)

    def _release(self, new_text: str, final: bool) -> str:
        window = self._held + new_text
        match = self._find_stop(window) if self._num_tokens >= self._min_tokens else None
        if match is not None:
            start, stop = match
            out = window[: start + len(stop)] if self._include_stop else window[:start]
            self.stopped = stop
            self._held = ""
        else:
            keep = 0 if final else self._partial_stop_length(window)
            out, self._held = window[: len(window) - keep], window[len(window) - keep :]
        if out:
            self._chunks.append(out)
        return out

    def _find_stop(self, window: str) -> tuple[int, str] | None:
        """The stop string occurrence in ``window`` that ends first (longest on a tie), as (start, stop).

        Only the window needs searching: released text never holds the start of a stop string."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = window.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_stop_length(self, window: str) -> int:
        """Length of the longest suffix of ``window`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(window)), longest, -1):
                if window.endswith(stop[:k]):
                    longest = k
                    break
        return longest
