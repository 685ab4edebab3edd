"""Incremental detokenizer tests on a fake byte-level vocabulary (including partial UTF-8 tokens)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from small4.engine.detokenizer import IncrementalDetokenizer
from small4.engine.sampling_params import SamplingParams

VOCAB: list[bytes] = [
    b"<s>",  # 0 special
    b"</s>",  # 1 special
    b"a",  # 2
    b"b",  # 3
    b"c",  # 4
    b"ab",  # 5
    b"ba",  # 6
    b" ",  # 7
    b"\xe2\x82",  # 8  first two bytes of the euro sign
    b"\xac",  # 9  its last byte
    b"\xe2",  # 10
    b"\x82\xac",  # 11
    "é".encode(),  # 12
    b"\xc3",  # 13 first byte of é
    b"\xa9",  # 14 second byte of é
    b"STOP",  # 15
    b"ST",  # 16
    b"O",  # 17
    b"P",  # 18
    b"[INST]",  # 19 special
    b"\xff",  # 20 invalid UTF-8 anywhere
]
SPECIAL = {0, 1, 19}


def _detok(**kwargs: object) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(VOCAB.__getitem__, SPECIAL.__contains__, SamplingParams(**kwargs))


def _feed(detok: IncrementalDetokenizer, tokens: list[int]) -> list[str]:
    return [detok.add(t) for t in tokens]


def test_multibyte_char_split_across_tokens_is_held_until_complete() -> None:
    d = _detok()
    assert _feed(d, [2, 8, 9, 10, 11, 13, 14]) == ["a", "", "€", "", "€", "", "é"]
    assert d.flush() == ""
    assert d.text == "a€€é"


def test_incomplete_tail_becomes_replacement_on_flush() -> None:
    d = _detok()
    assert _feed(d, [2, 8]) == ["a", ""]
    assert d.flush() == "\ufffd"


def test_stop_string_split_across_three_tokens_is_not_emitted() -> None:
    d = _detok(stop=("STOP",))
    assert _feed(d, [2, 16, 17]) == ["a", "", ""]
    assert d.stopped is None
    assert d.add(18) == ""
    assert d.stopped == "STOP"
    assert _feed(d, [2, 3]) == ["", ""]
    assert d.flush() == ""
    assert d.text == "a"


def test_near_miss_prefix_is_released_intact() -> None:
    d = _detok(stop=("STOP",))
    assert _feed(d, [16, 17]) == ["", ""]  # "STO" could still be "STOP"
    assert d.add(2) == "STOa"
    assert d.add(16) == ""
    assert d.flush() == "ST"
    assert d.text == "STOaST" and d.stopped is None


def test_include_stop_str_in_output() -> None:
    d = _detok(stop=("STOP",), include_stop_str_in_output=True)
    assert _feed(d, [2, 16, 17, 18, 2]) == ["a", "", "", "STOP", ""]
    assert d.text == "aSTOP" and d.stopped == "STOP"


def test_stop_inside_one_token_truncates_its_text() -> None:
    d = _detok(stop=("b",))
    assert d.add(2) == "a"
    assert d.add(6) == ""  # "ba": stop at its first character
    assert d.text == "a" and d.stopped == "b"


def test_earliest_ending_stop_wins() -> None:
    d = _detok(stop=("STOP", "TO"))
    assert _feed(d, [2, 15]) == ["a", "S"]
    assert d.stopped == "TO"
    d = _detok(stop=("c", "bac"))  # both end at the same character: the longest wins
    assert _feed(d, [6, 4]) == ["", ""]
    assert d.stopped == "bac"
    d = _detok(stop=("abca", "c"))  # "abca" started first, but "c" ends first
    assert _feed(d, [5, 4]) == ["", "ab"]
    assert d.stopped == "c"


def test_stop_matching_across_multibyte_chars() -> None:
    d = _detok(stop=("€é",))
    assert _feed(d, [2, 8, 9, 13]) == ["a", "", "", ""]
    assert d.add(14) == "" and d.stopped == "€é"
    assert d.text == "a"


def test_special_tokens_skipped_or_kept() -> None:
    d = _detok()
    assert _feed(d, [0, 2, 19, 3, 1]) == ["", "a", "", "b", ""]
    d = _detok(skip_special_tokens=False)
    assert _feed(d, [0, 2, 19, 3, 1]) == ["<s>", "a", "[INST]", "b", "</s>"]


def test_held_text_is_bounded_by_longest_stop() -> None:
    d = _detok(stop=("aaaa", "ab"))
    for _ in range(50):
        d.add(2)
        assert len(d.held_text) <= 3
    assert d.stopped == "aaaa" and d.text == ""


def _reference(tokens: list[int], stops: list[str], skip_special: bool, include: bool) -> tuple[str, str | None]:
    """Decode everything at once, then cut at the first position where some stop string ends."""
    data = b"".join(VOCAB[t] for t in tokens if not (skip_special and t in SPECIAL))
    full = data.decode("utf-8", errors="replace")
    for end in range(len(full) + 1):
        ending = [s for s in stops if full[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return full[: end if include else end - len(stop)], stop
    return full, None


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(0, len(VOCAB) - 1), max_size=40),
    stops=st.lists(st.text(alphabet="abcSTOP €é\ufffd", min_size=1, max_size=4), max_size=3),
    skip_special=st.booleans(),
    include=st.booleans(),
)
def test_released_text_equals_truncated_full_decode(
    tokens: list[int], stops: list[str], skip_special: bool, include: bool
) -> None:
    d = _detok(stop=tuple(stops), skip_special_tokens=skip_special, include_stop_str_in_output=include)
    released = "".join(d.add(t) for t in tokens) + d.flush()
    expected, stop = _reference(tokens, stops, skip_special, include)
    assert released == expected == d.text
    assert d.stopped == stop


def test_min_tokens_defers_stop_strings() -> None:
    """A stop string complete before the min_tokens-th token is text (as vLLM does); one ending at or after it
    stops, even when it began before."""
    d = _detok(stop=("STOP",), min_tokens=3, max_tokens=16)
    assert _feed(d, [15, 2]) == ["STOP", "a"]  # tokens 1 and 2: "STOP" does not count yet
    assert d.stopped is None
    assert _feed(d, [15]) == [""]  # token 3 ends a stop string: it counts
    assert d.stopped == "STOP" and d.text == "STOPa"
    split = _detok(stop=("STOP",), min_tokens=3, max_tokens=16)
    assert _feed(split, [2, 16, 17, 18]) == ["a", "", "", ""]  # "ST" held across the boundary, ends at token 4
    assert split.stopped == "STOP" and split.text == "a"


def test_min_tokens_counts_skipped_special_tokens() -> None:
    d = _detok(stop=("STOP",), min_tokens=2, max_tokens=16)
    assert _feed(d, [19, 15]) == ["", ""]  # the skipped special is the first output token
    assert d.stopped == "STOP"
