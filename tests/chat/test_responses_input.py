"""Responses API request parts -> chat-completions shapes (what chat/render.py then renders)."""

from __future__ import annotations

import pytest

from small4.chat import responses_input as ri
from small4.chat.render import RenderError


def test_string_input_and_instructions() -> None:
    assert ri.chat_messages(None, "Hi") == [{"role": "user", "content": "Hi"}]
    assert ri.chat_messages("Be terse.", "Hi") == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]


def test_items_of_a_tool_turn_become_one_assistant_message_and_tool_results() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Oslo?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "w", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city": "Oslo"}', "status": "completed"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "snowy"}]},
        {"type": "message", "role": "assistant", "id": "m", "status": "completed",
         "content": [{"type": "output_text", "text": "Sunny and snowy.", "annotations": [], "logprobs": []}]},
    ]  # fmt: skip
    messages = ri.chat_messages(None, items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assistant = messages[1]
    assert assistant["reasoning_content"] == "Two." and assistant["content"] is None
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert messages[3]["content"] == [{"type": "text", "text": "snowy"}]
    assert messages[4]["content"] == [{"type": "text", "text": "Sunny and snowy."}]


def test_tools_choice_format_and_effort() -> None:
    tool = {"type": "function", "name": "w", "parameters": {"type": "object"}, "strict": True, "description": None}
    assert ri.chat_tools([tool]) == [
        {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert ri.chat_tool_choice({"type": "function", "name": "w"}) == {"type": "function", "function": {"name": "w"}}
    assert ri.chat_tool_choice("required") == "required"
    fmt = {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}}
    assert ri.chat_response_format(fmt) == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True},
    }
    assert ri.chat_response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert ri.reasoning_effort({"effort": "high", "summary": "auto"}) == "high"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ri.chat_messages(None, [{"type": "web_search_call"}]), "unsupported input item"),
        (lambda: ri.chat_messages(None, [{"type": "reasoning", "summary": []}]), "followed by the assistant turn"),
        (lambda: ri.chat_messages(None, [{"role": "user", "content": [{"type": "input_file"}]}]), "content part"),
        (lambda: ri.chat_messages(None, [{"role": "user", "content": "x", "extra": 1}]), "extra"),
        (lambda: ri.chat_messages(None, []), "non-empty"),
        (lambda: ri.chat_tools([{"type": "file_search"}]), "only 'function'"),
        (lambda: ri.chat_tool_choice({"type": "allowed_tools", "tools": []}), "tools"),
        (lambda: ri.chat_response_format({"verbosity": "low"}), "verbosity"),
        (lambda: ri.reasoning_effort({"effort": "high", "summary": "concise"}), "returned whole"),
        (lambda: ri.chat_messages(None, [{"type": "reasoning", "encrypted_content": "z"}]), "encrypted"),
    ],
)
def test_what_has_no_chat_equivalent_is_refused(call, match) -> None:
    with pytest.raises(RenderError, match=match):
        call()
