"""The two answer dialects: how the dialect is chosen and how reasoning, finish reasons and usage are shaped."""

from __future__ import annotations

import pytest

from small4.chat.dialect import (
    SAFE_PROMPT,
    Dialect,
    choose_dialect,
    content_and_reasoning,
    finish_reason,
    usage_body,
    with_safe_prompt,
)


@pytest.mark.parametrize(
    ("header", "agent", "mistral_fields", "expected"),
    [
        (None, "OpenAI/Python 3.57.0", False, Dialect.OPENAI),
        (None, None, False, Dialect.OPENAI),
        (None, "mistral-client-python/3.7.0", False, Dialect.MISTRAL),
        (None, "curl/8", True, Dialect.MISTRAL),
        ("openai", "mistral-client-python/3.7.0", True, Dialect.OPENAI),  # the header wins
        ("Mistral", "OpenAI/Python", False, Dialect.MISTRAL),
    ],
)
def test_choose_dialect(header, agent, mistral_fields, expected) -> None:
    assert choose_dialect(header, agent, mistral_fields) is expected


def test_unknown_dialect_header_is_an_error() -> None:
    with pytest.raises(ValueError, match="openai' or 'mistral"):
        choose_dialect("anthropic", None, False)


def test_reasoning_shapes() -> None:
    assert content_and_reasoning(Dialect.OPENAI, "19.", "Units: 9.") == {
        "content": "19.",
        "reasoning_content": "Units: 9.",
        "reasoning": "Units: 9.",
    }
    assert content_and_reasoning(Dialect.MISTRAL, "19.", "Units: 9.") == {
        "content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "Units: 9."}]},
            {"type": "text", "text": "19."},
        ]
    }
    assert content_and_reasoning(Dialect.MISTRAL, "19.", "") == {"content": "19."}
    assert content_and_reasoning(Dialect.MISTRAL, None, "") == {}
    assert content_and_reasoning(Dialect.OPENAI, "", "") == {"content": ""}


@pytest.mark.parametrize(
    ("dialect", "engine", "calls", "expected"),
    [
        (Dialect.OPENAI, "stop", True, "tool_calls"),
        (Dialect.OPENAI, "length", True, "length"),
        (Dialect.MISTRAL, "stop", False, "stop"),
        (Dialect.MISTRAL, "abort", False, "error"),
        (Dialect.OPENAI, None, False, None),
    ],
)
def test_finish_reasons(dialect, engine, calls, expected) -> None:
    assert finish_reason(dialect, engine, calls) == expected


def test_safe_prompt_goes_first() -> None:
    joined = with_safe_prompt([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert joined[0]["content"] == f"{SAFE_PROMPT}\n\nBe terse." and len(joined) == 2
    added = with_safe_prompt([{"role": "user", "content": "Hi"}])
    assert added[0] == {"role": "system", "content": SAFE_PROMPT} and added[1]["content"] == "Hi"


def test_usage_details() -> None:
    assert usage_body(10, 4, 8, 2) == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
