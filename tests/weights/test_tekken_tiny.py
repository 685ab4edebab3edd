"""The tiny v15 tekken file must behave like the real Mistral Small 4 tokenizer inside mistral-common."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.exceptions import InvalidRequestException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, Tool
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV15
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image

from small4.tokenizer import Tokenizer
from small4.weights.tekken_tiny import write_tiny_tekken

NUM_BPE = 2000
VOCAB = 1000 + NUM_BPE

EXPECTED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]",
    11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]",
    34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]",
}  # fmt: skip

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs",
    "中文分词测试，还有标点。",
    "emoji 😀👩‍👩‍👧‍👦🇫🇷 and ZWJ",
    "Ünïcödé àccents, Ελληνικά, русский, العربية, हिन्दी",
    "def f(x):\n    return x ** 2  # code\n",
    "[INST] literal control text [/INST] <s>",
    "\x00\x01\x7f raw controls",
]


@pytest.fixture(scope="module")
def tekken_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tekken.json"
    assert write_tiny_tekken(path, NUM_BPE) == VOCAB
    return path


@pytest.fixture(scope="module")
def mistral(tekken_path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(tekken_path)


@pytest.fixture(scope="module")
def tekken(mistral: MistralTokenizer) -> Tekkenizer:
    inner = mistral.instruct_tokenizer.tokenizer
    assert isinstance(inner, Tekkenizer)
    return inner


@pytest.fixture(scope="module")
def tok(tekken_path: Path) -> Tokenizer:
    return Tokenizer.from_file(tekken_path.parent)


def _user(text: str = "Hi there") -> list:
    return [SystemMessage(content="You are terse."), UserMessage(content=text)]


def _between(tokens: list[int], start: int, end: int) -> list[int]:
    i = tokens.index(start)
    return tokens[i + 1 : tokens.index(end, i)]


# --- file layout and loading -------------------------------------------------------------------


def test_loads_as_v15_tekken(mistral: MistralTokenizer, tekken: Tekkenizer) -> None:
    assert isinstance(mistral.instruct_tokenizer, InstructTokenizerV15)
    assert tekken.version == TokenizerVersion.v15
    assert tekken.n_words == VOCAB
    assert tekken.num_special_tokens == 1000
    assert tekken.model_settings_builder is not None


def test_special_token_ids(tekken: Tekkenizer) -> None:
    for rank, text in EXPECTED_SPECIALS.items():
        assert tekken.get_special_token(text) == rank
        assert tekken.id_to_piece(rank) == text
    for rank in [*range(20, 32), 38, 500, 999]:
        assert tekken.id_to_piece(rank) == f"<SPECIAL_{rank}>"
    assert tekken.special_ids == set(range(1000))


def test_file_layout(tekken_path: Path) -> None:
    doc = json.loads(tekken_path.read_text(encoding="utf-8"))
    assert list(doc) == ["config", "vocab", "special_tokens", "image", "model_settings_builder"]
    assert doc["config"]["version"] == "v15"
    assert doc["image"] == {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    assert len(doc["vocab"]) == NUM_BPE and len(doc["special_tokens"]) == 1000


def test_vocab_size_follows_num_bpe_ranks(tmp_path: Path) -> None:
    assert write_tiny_tekken(tmp_path / "tekken.json", 300) == 1300
    assert MistralTokenizer.from_file(tmp_path / "tekken.json").instruct_tokenizer.tokenizer.n_words == 1300


@pytest.mark.parametrize("bad", [0, 255, 10**6])
def test_rejects_bad_rank_count(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match="num_bpe_ranks"):
        write_tiny_tekken(tmp_path / "tekken.json", bad)


def test_deterministic_bytes(tmp_path: Path, tekken_path: Path) -> None:
    again = tmp_path / "tekken.json"
    write_tiny_tekken(again, NUM_BPE)
    assert again.read_bytes() == tekken_path.read_bytes()


# --- text round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_examples(tekken: Tekkenizer, text: str) -> None:
    ids = tekken.encode(text, bos=False, eos=False)
    assert all(1000 <= i < VOCAB for i in ids)
    assert tekken.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_any_text(tekken: Tekkenizer, text: str) -> None:
    assert tekken.decode(tekken.encode(text, bos=False, eos=False)) == text


def test_merges_are_used_and_bytes_fall_back(tekken: Tekkenizer) -> None:
    common = tekken.encode(" the the the", bos=False, eos=False)
    assert len(common) < len(" the the the")  # real merges survive the truncation
    rare = "𝔘"  # 4 UTF-8 bytes, no merge among the first 2000 ranks
    assert tekken.encode(rare, bos=False, eos=False) == [1000 + b for b in rare.encode("utf-8")]


# --- chat rendering ----------------------------------------------------------------------------


def test_system_and_user_chat(mistral: MistralTokenizer) -> None:
    out = mistral.encode_chat_completion(ChatCompletionRequest(messages=_user()))
    assert out.tokens[:2] == [1, 17]
    assert out.tokens[-1] == 4
    assert mistral.decode(out.tokens, special_token_policy=SpecialTokenPolicy.KEEP) == (
        '<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][MODEL_SETTINGS]{"reasoning_effort": "none"}'
        "[/MODEL_SETTINGS][INST]Hi there[/INST]"
    )


def test_chat_with_tools(mistral: MistralTokenizer) -> None:
    tool = Tool(
        function=Function(
            name="get_weather",
            description="Weather for a city.",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        )
    )
    out = mistral.encode_chat_completion(ChatCompletionRequest(messages=_user(), tools=[tool]))
    tools_json = mistral.decode(_between(out.tokens, 5, 6))
    assert json.loads(tools_json)[0]["function"]["name"] == "get_weather"
    assert out.tokens.index(6) < out.tokens.index(36) < out.tokens.index(3)


def test_reasoning_effort_model_settings(mistral: MistralTokenizer) -> None:
    def encode(effort: str | None) -> list[int]:
        request = ChatCompletionRequest(messages=_user(), reasoning_effort=effort)
        return mistral.encode_chat_completion(request).tokens

    high, none, default = encode("high"), encode("none"), encode(None)
    assert high != none
    assert default == none  # the builder's default is "none"
    assert mistral.decode(_between(high, 36, 37)) == '{"reasoning_effort": "high"}'
    assert mistral.decode(_between(none, 36, 37)) == '{"reasoning_effort": "none"}'


@pytest.mark.parametrize("effort", ["medium", "low", "max"])
def test_unsupported_reasoning_effort_rejected(mistral: MistralTokenizer, effort: str) -> None:
    with pytest.raises(InvalidRequestException, match="reasoning_effort"):
        mistral.encode_chat_completion(ChatCompletionRequest(messages=_user(), reasoning_effort=effort))


def test_think_chunk_in_history(mistral: MistralTokenizer) -> None:
    messages = [
        UserMessage(content="hi"),
        AssistantMessage(content=[ThinkChunk(thinking="hmm"), TextChunk(text="yo")]),
        UserMessage(content="again"),
    ]
    out = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages))
    assert mistral.decode(_between(out.tokens, 34, 35)) == "hmm"


@pytest.mark.parametrize(
    ("size", "grid"),
    [((56, 56), (2, 2)), ((28, 56), (1, 2)), ((29, 28), (2, 1)), ((3080, 100), (55, 2))],
)
def test_image_tokens_use_patch14_merge2(
    mistral: MistralTokenizer, size: tuple[int, int], grid: tuple[int, int]
) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    messages = [UserMessage(content=[ImageChunk(image=image), TextChunk(text="describe")])]
    out = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages))
    cols, rows = grid
    expected = ([10] * cols + [12]) * rows
    expected[-1] = 13
    start = out.tokens.index(10)
    assert out.tokens[start : start + len(expected)] == expected
    assert out.images[0].shape == (3, rows * 28, cols * 28)


# --- the engine's wrapper ----------------------------------------------------------------------


def test_wrapper_basics(tok: Tokenizer, tekken_path: Path) -> None:
    assert isinstance(tok.mistral, MistralTokenizer)
    assert Tokenizer.from_file(tekken_path).vocab_size == tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 11)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("hello", bos=False) == ids[1:-1]


def test_wrapper_decode_policies(tok: Tokenizer) -> None:
    ids = [1, tok.special_id("[THINK]"), *tok.encode("plan", bos=False), 35, *tok.encode(" ok", bos=False), 2]
    assert tok.decode(ids) == "plan ok"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>[THINK]plan[/THINK] ok</s>"


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concat_matches_decode(tok: Tokenizer, text: str) -> None:
    ids = [tok.bos_id, 34, *tok.encode(text, bos=False), 35]
    joined = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", "replace")
    assert joined == tok.decode(ids, skip_special_tokens=False)


def test_token_bytes_partial_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("𝔘", bos=False)
    pieces = [tok.token_bytes(i) for i in ids]
    assert pieces == [bytes([b]) for b in "𝔘".encode()]
    assert tok.token_bytes(34) == b"[THINK]"


def test_wrapper_special_lookup(tok: Tokenizer) -> None:
    assert tok.special_id("[THINK]") == 34
    assert tok.special_id("[/MODEL_SETTINGS]") == 37
    assert tok.is_special(0) and tok.is_special(999)
    assert not tok.is_special(1000) and not tok.is_special(VOCAB - 1)
    with pytest.raises(ValueError):
        tok.special_id("[NOPE]")
    with pytest.raises(ValueError):
        tok.token_bytes(VOCAB)


def test_wrapper_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path)


# --- the spaceless variant (the demo model's copy-friendly pieces) -------------------------------


@pytest.fixture(scope="module")
def spaceless(tmp_path_factory: pytest.TempPathFactory) -> Tekkenizer:
    path = tmp_path_factory.mktemp("spaceless") / "tekken.json"
    assert write_tiny_tekken(path, NUM_BPE, spaceless=True) == VOCAB
    inner = MistralTokenizer.from_file(path).instruct_tokenizer.tokenizer
    assert isinstance(inner, Tekkenizer)
    return inner


def _pieces(tekken: Tekkenizer, text: str) -> list[bytes]:
    return [tekken.id_to_byte_piece(i) for i in tekken.encode(text, bos=False, eos=False)]


def test_spaceless_pieces_never_hold_a_space(spaceless: Tekkenizer) -> None:
    pieces = [spaceless.id_to_byte_piece(1000 + r) for r in range(NUM_BPE)]
    assert all(len(p) == 1 or (b" " not in p and p.isascii()) for p in pieces)
    assert sum(len(p) > 1 for p in pieces) == NUM_BPE - 256  # every slot past the bytes is a real merge


@pytest.mark.parametrize("value", ["Perth", "reserve_table", "walnut meadow", "jakob@example.org", "751"])
def test_spaceless_copies_prose_into_json_as_the_same_pieces(
    spaceless: Tekkenizer, tekken: Tekkenizer, value: str
) -> None:
    prose, quoted = _pieces(spaceless, f"origin set to {value}."), _pieces(spaceless, json.dumps({"o": value}))
    words = _pieces(spaceless, value)
    assert any(prose[i : i + len(words)] == words for i in range(len(prose)))
    assert any(quoted[i : i + len(words)] == words for i in range(len(quoted)))
    if value == "Perth":  # the real ranks glue the space to the first piece, so the two spellings differ
        assert _pieces(tekken, " Perth")[0] != _pieces(tekken, "Perth")[0]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_spaceless_round_trips_any_text(spaceless: Tekkenizer, text: str) -> None:
    assert spaceless.decode(spaceless.encode(text, bos=False, eos=False)) == text
