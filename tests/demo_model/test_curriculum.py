"""The demo model's curriculum and trainer: rendering, loss masks, a micro training run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from small4.chat.parse import OutputParser
from small4.demo_model.curriculum import (
    TASKS,
    add_trace,
    encode_example,
    eval_examples,
    make_example,
    sample_examples,
    sub_trace,
)
from small4.demo_model.train import (
    batch_examples,
    batch_loss,
    initial_model,
    load_renderer,
    micro_spec,
    save_checkpoint,
)
from small4.weights.loader import load_model
from small4.weights.tekken_tiny import write_tiny_tekken


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tekken(d / "tekken.json", 2000)
    return load_renderer(d)


def _decode(renderer, ids: list[int]) -> str:
    return renderer.tokenizer.instruct_tokenizer.tokenizer.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


def _assistant_text(assistant: dict) -> str:
    """The assistant turn as it should appear in the token stream (v13+ format, then EOS)."""
    text = ""
    if "reasoning_content" in assistant:
        text += f"[THINK]{assistant['reasoning_content']}[/THINK]"
    if assistant.get("content"):
        text += assistant["content"]
    for call in assistant.get("tool_calls") or []:
        args = json.dumps(json.loads(call["function"]["arguments"]), ensure_ascii=False)
        text += f"[TOOL_CALLS]{call['function']['name']}[ARGS]{args}"
    return text + "</s>"


def test_deterministic() -> None:
    a, b = sample_examples(7, 40), sample_examples(7, 40)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.messages for x in sample_examples(8, 40)] != [x.messages for x in a]
    assert {x.task for x in sample_examples(0, 200)} == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_mask_covers_exactly_the_assistant_turn(renderer, task: str) -> None:
    rng = random.Random(task)
    for _ in range(6):
        ex = make_example(task, rng)
        enc = encode_example(renderer, ex)
        prompt = renderer.render(ex.messages, tools=ex.tools, reasoning_effort=ex.reasoning_effort)
        assert enc.prompt == prompt.token_ids  # exactly what the server feeds the engine
        assert len(enc.mask) == len(enc.tokens)
        masked = [t for t, m in zip(enc.tokens, enc.mask, strict=True) if m]
        assert enc.mask == [0] * enc.prompt_len + [1] * (len(enc.tokens) - enc.prompt_len)
        assert _decode(renderer, masked) == _assistant_text(ex.assistant)
        assert masked[-1] == renderer.tokenizer.instruct_tokenizer.tokenizer.eos_id
        if task == "vision":
            assert len(enc.images) == 1 and enc.images[0].shape[0] == 3


def test_target_is_mistral_common_full_conversation_encoding(renderer) -> None:
    """prompt + target == mistral-common's encoding of the conversation ending with the assistant message."""
    mistral = renderer.tokenizer
    for ex in sample_examples(3, 40):
        enc = encode_example(renderer, ex)
        req = renderer.render(ex.messages, tools=ex.tools, reasoning_effort=ex.reasoning_effort).request
        full = req.model_copy(update={"messages": [*req.messages, AssistantMessage.from_openai(ex.assistant)]})
        instruct_request = mistral._instruct_request_normalizer.from_chat_completion_request(full)
        assert mistral.instruct_tokenizer.encode_instruct(instruct_request).tokens == enc.tokens


def test_targets_parse_back_to_the_assistant_message(renderer) -> None:
    for ex in eval_examples(5, 2):
        text = _decode(renderer, encode_example(renderer, ex).target[:-1])
        parser = OutputParser(reasoning=ex.reasoning_effort != "none", tools=ex.tools is not None)
        parser.feed(text)
        parser.finish()
        assert parser.content == (ex.assistant.get("content") or "")
        assert parser.reasoning_content == ex.assistant.get("reasoning_content", "")
        want = [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in ex.assistant.get("tool_calls") or []
        ]
        assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == want


def test_traces_are_correct() -> None:
    for a in range(0, 100, 7):
        for b in range(0, 100, 9):
            assert add_trace(a, b).endswith(f"So {a + b}.")
            if a >= b:
                assert sub_trace(a, b).endswith(f"So {a - b}.")
    assert add_trace(38, 27) == "Units: 8 + 7 = 15, write 5 carry 1. Tens: 3 + 2 + 1 = 6. So 65."
    assert sub_trace(43, 17) == "Units: borrow, 13 - 7 = 6. Tens: 4 - 1 - 1 = 2. So 26."


def test_micro_training_lowers_loss_and_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = micro_spec()
    write_tiny_tekken(tmp_path / "tekken.json", spec.num_bpe_ranks)
    renderer = load_renderer(tmp_path)
    model = initial_model(spec, 0)
    batch = batch_examples(renderer, random.Random(0), 600)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss, per_task = batch_loss(model, batch)
        assert set(per_task) == {e.example.task for e in batch}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_checkpoint(model.eval(), spec, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32, progress=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p.detach().bfloat16().float())


def test_image_batches_train_the_vision_tower(tmp_path: Path) -> None:
    spec = micro_spec()
    write_tiny_tekken(tmp_path / "tekken.json", spec.num_bpe_ranks)
    renderer = load_renderer(tmp_path)
    model = initial_model(spec, 0)
    batch = [encode_example(renderer, make_example("vision", random.Random(i))) for i in range(2)]
    loss, _ = batch_loss(model, batch)
    loss.backward()
    assert model.vision.encoder.patch_conv.weight.grad.abs().sum() > 0
