"""chat/render.py: OpenAI-shaped requests -> mistral-common -> prompt ids, checked against mistral-common itself."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import NamedToolChoice, ToolChoiceEnum
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from small4.chat.media import MediaPolicy
from small4.chat.render import ChatRenderer, RenderedPrompt, RenderError, new_tool_call_id
from small4.tokenizer import Tokenizer
from small4.weights.tekken_tiny import write_tiny_tekken

# Special ids of the real Small 4 tokenizer (kept by the tiny tekken file).
EOS, INST, END_INST, AVAILABLE_TOOLS, TOOL_RESULTS, TOOL_CALLS = 2, 3, 4, 5, 7, 9
IMG, IMG_BREAK, IMG_END, SYSTEM_PROMPT, ARGS, THINK, END_THINK, MODEL_SETTINGS = 10, 12, 13, 17, 32, 34, 35, 36

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
JSON_KEYS = [
    "role", "content", "type", "text", "image_url", "url", "tool_calls", "tool_call_id", "id", "function", "name",
    "arguments", "parameters", "reasoning_content", "prefix", "detail",
]  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    write_tiny_tekken(path)
    return Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def renderer(tokenizer: Tokenizer) -> ChatRenderer:
    return ChatRenderer(tokenizer.mistral)


def direct(mistral: MistralTokenizer, messages: list[dict], **kwargs) -> list[int]:
    """mistral-common's own encoding of the same OpenAI request, for parity."""
    request = ChatCompletionRequest.from_openai(messages=messages, **kwargs)
    return mistral.encode_chat_completion(request).tokens


def png_data_url(size: tuple[int, int] = (60, 40), color: str = "red") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tool_turns(call_ids: tuple[str, str]) -> list[dict]:
    a, b = call_ids
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": a, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": b, "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": a, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": b, "content": "12:00"},
        {"role": "assistant", "content": "21 degrees at noon."},
        {"role": "user", "content": "Thanks!"},
    ]


# -- parity with mistral-common ---------------------------------------------------------------------


def test_system_and_user(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    out = renderer.render(messages)
    assert isinstance(out, RenderedPrompt)
    assert out.token_ids == direct(tokenizer.mistral, messages)
    assert out.num_tokens == len(out.token_ids)
    assert out.images == []
    assert out.token_ids[0] == tokenizer.bos_id
    assert out.token_ids[-1] == END_INST
    assert SYSTEM_PROMPT in out.token_ids and INST in out.token_ids
    assert isinstance(out.request, ChatCompletionRequest)


def test_text_parts_equal_string_content(renderer: ChatRenderer) -> None:
    as_string = renderer.render([{"role": "user", "content": "Hello there"}])
    as_parts = renderer.render([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}])
    assert as_parts.token_ids == as_string.token_ids


def test_multi_turn_tool_calls_round_trip(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    messages = tool_turns(("abcdefgh1", "abcdefgh2"))
    out = renderer.render(messages, tools=[WEATHER, CLOCK])
    assert out.token_ids == direct(tokenizer.mistral, messages, tools=[WEATHER, CLOCK])
    text = tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert "[AVAILABLE_TOOLS]" in text
    # The v15 assistant tool-call format: [TOOL_CALLS]name[ARGS]json per call, no call ids.
    assert '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}</s>' in text
    assert "[TOOL_RESULTS]" in text


def test_arbitrary_client_tool_call_ids_are_mapped(renderer: ChatRenderer) -> None:
    valid = renderer.render(tool_turns(("abcdefgh1", "abcdefgh2")), tools=[WEATHER, CLOCK])
    odd = renderer.render(tool_turns(("call_0-weather", "")), tools=[WEATHER, CLOCK])
    assert odd.token_ids == valid.token_ids  # ids are not tokenized in v13+
    ids = [c.id for c in odd.request.messages[2].tool_calls]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in ids) and len(set(ids)) == 2
    assert [m.tool_call_id for m in odd.request.messages[3:5]] == ids


def test_unknown_tool_result_id_names_the_client_id(renderer: ChatRenderer) -> None:
    messages = tool_turns(("call_0-weather", "call_1-time"))
    messages[4]["tool_call_id"] = "call_9-other"
    with pytest.raises(RenderError, match="call_9-other"):
        renderer.render(messages, tools=[WEATHER, CLOCK])


def test_unanswered_tool_call_is_refused(renderer: ChatRenderer) -> None:
    messages = tool_turns(("abcdefgh1", "abcdefgh2"))
    del messages[4]  # second call never answered
    with pytest.raises(RenderError):
        renderer.render(messages, tools=[WEATHER, CLOCK])


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, ToolChoiceEnum.auto),
        ("auto", ToolChoiceEnum.auto),
        ("none", ToolChoiceEnum.none),
        ("required", ToolChoiceEnum.required),
        ({"type": "function", "function": {"name": "get_time"}}, NamedToolChoice(function={"name": "get_time"})),
    ],
)
def test_tool_choice(renderer: ChatRenderer, tokenizer: Tokenizer, choice, expected) -> None:
    messages = [{"role": "user", "content": "What time is it?"}]
    out = renderer.render(messages, tools=[WEATHER, CLOCK], tool_choice=choice)
    assert out.request.tool_choice == expected
    assert [t.function.name for t in out.request.tools] == ["get_weather", "get_time"]
    assert AVAILABLE_TOOLS in out.token_ids
    kwargs = {} if choice is None else {"tool_choice": choice}
    assert out.token_ids == direct(tokenizer.mistral, messages, tools=[WEATHER, CLOCK], **kwargs)


@pytest.mark.parametrize(
    ("tools", "choice", "match"),
    [
        ([WEATHER], "sometimes", "tool_choice must be one of 'auto', 'none', 'required', 'any'"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "not among the tools"),
        (None, "required", "needs tools"),
        ([WEATHER], {"type": "function"}, "named tool_choice"),
        ([WEATHER], 3, "string or an object"),
    ],
)
def test_bad_tool_choice(renderer: ChatRenderer, tools, choice, match) -> None:
    with pytest.raises(RenderError, match=match) as info:
        renderer.render([{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice)
    assert info.value.param == "tool_choice"


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ([{"type": "retrieval", "function": {"name": "x"}}], "only 'function'"),
        ([{"type": "function", "function": {"name": "bad name", "parameters": {}}}], "Function name"),
        ([WEATHER, WEATHER], "duplicate tool name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {}, "examples": []}}], "examples"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "schema"),
    ],
)
def test_bad_tools(renderer: ChatRenderer, tools, match) -> None:
    with pytest.raises(RenderError, match=match) as info:
        renderer.render([{"role": "user", "content": "hi"}], tools=tools)
    assert info.value.param.startswith("tools")


def test_reasoning_effort(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Think about it."}]
    builder = tokenizer.mistral.instruct_tokenizer.tokenizer.model_settings_builder.reasoning_effort
    assert renderer.reasoning_efforts == tuple(str(v) for v in builder.values) == ("none", "high")
    assert renderer.default_reasoning_effort == "none"
    default = renderer.render(messages)
    none = renderer.render(messages, reasoning_effort="none")
    high = renderer.render(messages, reasoning_effort="high")
    assert default.token_ids == none.token_ids != high.token_ids
    assert MODEL_SETTINGS in high.token_ids
    assert (default.reasoning, none.reasoning, high.reasoning) == (False, False, True)
    assert (default.reasoning_effort, high.reasoning_effort) == ("none", "high")
    assert high.token_ids == direct(tokenizer.mistral, messages, reasoning_effort="high")
    assert '"reasoning_effort": "high"' in tokenizer.decode(high.token_ids, skip_special_tokens=False)


@pytest.mark.parametrize("effort", ["low", "medium", "max", "bogus", ""])
def test_invalid_reasoning_effort_names_allowed_values(renderer: ChatRenderer, effort: str) -> None:
    with pytest.raises(RenderError) as info:
        renderer.render([{"role": "user", "content": "hi"}], reasoning_effort=effort)
    assert info.value.param == "reasoning_effort"
    for allowed in renderer.reasoning_efforts:
        assert repr(allowed) in info.value.message


@pytest.mark.parametrize(
    ("messages", "kwargs"),
    [
        ([{"role": "user", "content": "Hi"}], {}),
        ([{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi"}], {}),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            {},
        ),
        ([{"role": "user", "content": "Hi"}], {"tools": [WEATHER], "reasoning_effort": "high"}),
        (tool_turns(("abcdefgh1", "abcdefgh2")), {"tools": [WEATHER, CLOCK], "tool_choice": "required"}),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel", "prefix": True}], {}),
    ],
)
def test_token_count_equals_mistral_common(renderer: ChatRenderer, tokenizer: Tokenizer, messages, kwargs) -> None:
    out = renderer.render(messages, **kwargs)
    expected_messages = [{k: v for k, v in m.items() if k != "prefix"} for m in messages]
    continue_final = bool(messages[-1].get("prefix"))
    expected = direct(tokenizer.mistral, expected_messages, continue_final_message=continue_final, **kwargs)
    assert out.num_tokens == len(expected)
    assert out.token_ids == expected


def test_assistant_reasoning_content_becomes_think_chunk(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
        {"role": "user", "content": "and 3+3?"},
    ]
    out = renderer.render(messages, reasoning_effort="high")
    assert out.token_ids == direct(tokenizer.mistral, messages, reasoning_effort="high")
    assert "[THINK]two and two[/THINK]4</s>" in tokenizer.decode(out.token_ids, skip_special_tokens=False)
    plain = renderer.render([messages[0], {"role": "assistant", "content": "4"}, messages[2]], reasoning_effort="high")
    assert THINK in out.token_ids and END_THINK in out.token_ids and THINK not in plain.token_ids


def test_continue_final_assistant_message(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    out = renderer.render(
        [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,", "prefix": True}],
        reasoning_effort="high",
    )
    assert tokenizer.decode(out.token_ids, skip_special_tokens=False).endswith("[/INST]1, 2,")
    assert out.token_ids[-1] != EOS
    assert out.reasoning is False  # the continued message is already past its reasoning


def test_image_data_url(renderer: ChatRenderer, tokenizer: Tokenizer) -> None:
    url = png_data_url((60, 40))
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]
    out = renderer.render(messages)
    assert IMG in out.token_ids and IMG_END in out.token_ids
    assert len(out.images) == 1 and out.images[0].ndim == 3 and out.images[0].shape[0] == 3
    # 60x40 px with 14 px patches merged 2x2: 3 x 2 image tokens, a break after each row but the last.
    img_tokens = [t for t in out.token_ids if t in (IMG, IMG_BREAK, IMG_END)]
    assert img_tokens == [IMG, IMG, IMG, IMG_BREAK, IMG, IMG, IMG, IMG_END]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    request = ChatCompletionRequest(
        messages=[UserMessage(content=[TextChunk(text="What is this?"), ImageChunk(image=image)])]
    )
    assert out.token_ids == tokenizer.mistral.encode_chat_completion(request).tokens


def test_image_in_tool_result(renderer: ChatRenderer) -> None:
    messages = tool_turns(("abcdefgh1", "abcdefgh2"))[:5]
    messages[4]["content"] = [{"type": "image_url", "image_url": {"url": png_data_url(), "detail": "auto"}}]
    out = renderer.render(messages, tools=[WEATHER, CLOCK])
    assert len(out.images) == 1 and IMG in out.token_ids


IMAGE_ERRORS = [
    ("data:image/png;base64,!!!not-base64!!!", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"definitely not an image").decode(), "decodable image"),
    ("data:image/png," + "abc", "base64 data: URLs"),
    ("data:text/plain;base64,aGVsbG8=", "base64 data: URLs"),
    ("https://example.com/cat.png", "remote image URLs are disabled"),
    ("http://example.com/cat.png", "remote image URLs are disabled"),
    ("file:///etc/passwd", "base64 data: URLs"),
    ("/etc/passwd", "base64 data: URLs"),
]


@pytest.mark.parametrize(("url", "match"), IMAGE_ERRORS)
def test_bad_images(renderer: ChatRenderer, url: str, match: str) -> None:
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(RenderError, match=match) as info:
        renderer.render([{"role": "user", "content": content}])
    assert info.value.param == "messages[0].content[1].image_url"


BAD_REQUESTS = [
    ([], "non-empty list", "messages"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'", "messages[0].role"),
    ([{"content": "hi"}], "unknown role None", "messages[0].role"),
    (["hi"], "must be an object", "messages[0]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}], "last message", "messages[1].role"),
    ([{"role": "system", "content": "sys only"}], "last message", "messages[0].role"),
    ([{"role": "user", "content": "hi", "name": "bob"}], "unsupported field 'name'", "messages[0].name"),
    ([{"role": "user", "content": None}], "need content", "messages[0].content"),
    ([{"role": "user", "content": []}], "non-empty list", "messages[0].content"),
    (
        [{"role": "user", "content": [{"type": "input_audio"}]}],
        "unsupported content part",
        "messages[0].content[0].type",
    ),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}], "unsupported field 'x'", None),
    (
        [
            {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "user", "content": "x"},
        ],
        "images are not supported in system",
        "messages[0].content[0]",
    ),
    (
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}}]}],
        "detail",
        "messages[0].content[0].image_url.detail",
    ),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "tool_call_id", "messages[1].tool_call_id"),
    (
        [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "b"}],
        "Unexpected role 'tool' after role 'user'",
        "messages",
    ),
    (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "refusal": "no"},
            {"role": "user", "content": "c"},
        ],
        "unsupported field 'refusal'",
        "messages[1].refusal",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}, {"role": "user", "content": "c"}],
        "Invalid assistant message",
        "messages",
    ),
    (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "prefix": True},
            {"role": "user", "content": "c"},
        ],
        "prefix",
        "messages",
    ),
    (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "tool_calls": [{"id": "abcdefghi", "function": {"name": "f"}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"},
        ],
        "string name and string arguments",
        "messages[1].tool_calls[0].function",
    ),
]


@pytest.mark.parametrize(("messages", "match", "param"), BAD_REQUESTS)
def test_bad_requests(renderer: ChatRenderer, messages, match: str, param: str | None) -> None:
    with pytest.raises(RenderError, match=re.escape(match)) as info:
        renderer.render(messages)
    if param is not None:
        assert info.value.param == param
    assert isinstance(info.value, ValueError) and info.value.message


def test_new_tool_call_id() -> None:
    ids = {new_tool_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in ids)


def test_reasoning_efforts_come_from_the_tokenizer(tmp_path: Path) -> None:
    import json

    path = tmp_path / "tekken.json"
    write_tiny_tekken(path)
    doc = json.loads(path.read_text())
    doc["model_settings_builder"]["reasoning_effort"] = {
        "type": "enum",
        "accepts_none": True,
        "default": "low",
        "values": ["low", "medium", "high"],
    }
    path.write_text(json.dumps(doc))
    renderer = ChatRenderer(MistralTokenizer.from_file(path))
    assert renderer.reasoning_efforts == ("low", "medium", "high")
    assert renderer.default_reasoning_effort == "low"
    assert renderer.render([{"role": "user", "content": "hi"}]).reasoning is True
    with pytest.raises(RenderError, match="'low', 'medium', 'high'"):
        renderer.render([{"role": "user", "content": "hi"}], reasoning_effort="none")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["", "x", "user", "tool", "assistant", "function"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(JSON_KEYS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "tool", "system", "x"])},
            optional={k: json_values for k in JSON_KEYS if k != "role"},
        ),
        max_size=4,
    )
    | json_values,
    tools=json_values,
    tool_choice=json_values,
)
def test_arbitrary_json_only_raises_render_error(renderer: ChatRenderer, messages, tools, tool_choice) -> None:
    try:
        renderer.render(messages, tools=tools, tool_choice=tool_choice)
    except RenderError:
        pass


def _image_request(*urls: str) -> list[dict]:
    parts = [{"type": "text", "text": "look"}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def _data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("mode", "size", "fmt"),
    [("RGB", (3001, 1777), "PNG"), ("1", (1777, 3001), "PNG"), ("P", (4000, 37), "PNG"), ("RGB", (2500, 1600), "JPEG")],
)
def test_large_images_are_shrunk_before_mistral_common_with_the_same_token_grid(
    tokenizer: Tokenizer, mode: str, size: tuple[int, int], fmt: str
) -> None:
    """The renderer shrinks an image larger than the model takes while it is still 8-bit PIL; mistral-common then
    sees an image that already fits, so the prompt (its [IMG] grid) is exactly the one the full image gets."""
    image = Image.radial_gradient("L").resize(size).convert(mode)
    url = _data_url(image, fmt)
    shrinking = ChatRenderer(tokenizer.mistral)
    full = ChatRenderer(tokenizer.mistral)
    full._max_image_side = None  # the old path: the full-size image handed to mistral-common
    small, big = shrinking.render(_image_request(url)), full.render(_image_request(url))
    assert small.token_ids == big.token_ids
    assert small.images[0].shape == big.images[0].shape
    assert max(small.images[0].shape[1:]) <= shrinking._max_image_side


def test_pixels_are_budgeted_per_request(tokenizer: Tokenizer) -> None:
    renderer = ChatRenderer(tokenizer.mistral, media_policy=MediaPolicy(max_pixels=4000, max_total_pixels=5000))
    url = png_data_url((60, 40))  # 2400 pixels
    assert len(renderer.render(_image_request(url, url)).images) == 2
    with pytest.raises(RenderError, match="pixels in all"):
        renderer.render(_image_request(url, url, url))


def test_a_huge_one_bit_png_costs_little_memory(tmp_path: Path) -> None:
    """The 6000x6000 1-bit PNG (21 KB as a data: URL, under the default pixel cap) once raised peak RSS by 0.7-2.9 GB
    through mistral-common's full-size float conversion; shrunk first, it stays far below that."""
    tekken, png = tmp_path / "tekken.json", tmp_path / "big.png"
    write_tiny_tekken(tekken)
    Image.new("1", (6000, 6000), 1).save(png, format="PNG")  # here: the child's peak is the request's alone
    script = f"""
import base64
from small4.chat.render import ChatRenderer
from small4.tokenizer import Tokenizer
renderer = ChatRenderer(Tokenizer.from_file({str(tekken)!r}).mistral)
url = "data:image/png;base64," + base64.b64encode(open({str(png)!r}, "rb").read()).decode()
def status_kib(key):
    return int(next(x for x in open("/proc/self/status") if x.startswith(key)).split()[1])
before = status_kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := now, so the peak below is the render's own
parts = [{{"type": "image_url", "image_url": {{"url": url}}}}]
renderer.render([{{"role": "user", "content": parts}}])
print((status_kib("VmHWM") - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    peak_mib = int(done.stdout.strip().splitlines()[-1])
    assert peak_mib < 200, peak_mib  # measured: ~690 MiB before, ~80 MiB after


# -- the Mistral dialect's history shapes -------------------------------------------------------------


def _assistant_history(assistant: dict) -> list[dict]:
    return [{"role": "user", "content": "What is 2 + 2?"}, assistant, {"role": "user", "content": "Thanks!"}]


def test_thinking_chunks_render_like_reasoning_content(renderer: ChatRenderer) -> None:
    openai = renderer.render(_assistant_history({"role": "assistant", "content": "4.", "reasoning_content": "2+2"}))
    alias = renderer.render(_assistant_history({"role": "assistant", "content": "4.", "reasoning": "2+2"}))
    chunks = [
        {
            "type": "thinking",
            "thinking": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2"}],
            "closed": True,
        },
        {"type": "text", "text": "4."},
    ]
    mistral = renderer.render(_assistant_history({"role": "assistant", "content": chunks}))
    plain = renderer.render(_assistant_history({"role": "assistant", "content": "4."}))
    assert openai.token_ids == alias.token_ids == mistral.token_ids != plain.token_ids
    assert THINK in openai.token_ids and END_THINK in openai.token_ids


@pytest.mark.parametrize(
    ("content", "extra", "match"),
    [
        ([{"type": "text", "text": "4."}, {"type": "thinking", "thinking": "late"}], {}, "before the answer"),
        ([{"type": "thinking", "thinking": "x", "signature": "abc"}], {}, "signed"),
        ([{"type": "thinking", "thinking": [{"type": "image_url"}]}], {}, "text chunks only"),
        ([{"type": "thinking", "thinking": "x"}], {"reasoning_content": "y"}, "once"),
        ("4.", {"reasoning_content": "x", "reasoning": "y"}, "differ"),
    ],
)
def test_bad_reasoning_in_history(renderer: ChatRenderer, content, extra, match) -> None:
    with pytest.raises(RenderError, match=match):
        renderer.render(_assistant_history({"role": "assistant", "content": content, **extra}))


def test_mistral_tool_calls_with_object_arguments_and_index(renderer: ChatRenderer) -> None:
    def history(arguments) -> list[dict]:
        call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{**call, "index": 0}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"},
        ]

    as_object = renderer.render(history({"city": "Paris"}), tools=[WEATHER])
    as_string = renderer.render(history('{"city": "Paris"}'), tools=[WEATHER])
    assert as_object.token_ids == as_string.token_ids


def test_tool_choice_any_is_required(renderer: ChatRenderer) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    any_ = renderer.render(messages, tools=[WEATHER], tool_choice="any")
    assert any_.request.tool_choice == ToolChoiceEnum.any
    with pytest.raises(RenderError, match="needs tools"):
        renderer.render(messages, tool_choice="any")
