"""Images end to end through the server with the openai client: data URLs, several images, images across turns,
streaming, batch invariance with and without images, prefix caching keyed by content, and bad media as 400s."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from small4.config import EngineConfig
from small4.engine.engine import Engine
from small4.engine.multimodal import ImageInput
from small4.engine.sampling_params import SamplingParams

AUTH = {"Authorization": "Bearer test-key"}


def _png(color: tuple[int, int, int], size: tuple[int, int] = (56, 42)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(*urls: str, text: str = "What is in the picture?") -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": parts}


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, **kw)


def test_image_changes_the_answer_and_is_counted(server):
    client = server.client()
    red = _chat(client, [_image_message(_png((255, 0, 0)))])
    blue = _chat(client, [_image_message(_png((0, 0, 255)))])
    text_only = _chat(client, [{"role": "user", "content": "What is in the picture?"}])
    assert red.usage.prompt_tokens == blue.usage.prompt_tokens > text_only.usage.prompt_tokens
    assert red.choices[0].message.content != blue.choices[0].message.content


def test_two_images_and_images_across_turns(server):
    client = server.client()
    two = _chat(client, [_image_message(_png((255, 0, 0)), _png((0, 255, 0), (28, 84)))])
    history = [
        _image_message(_png((255, 0, 0))),
        {"role": "assistant", "content": "A red square."},
        _image_message(_png((0, 255, 0)), text="And this one?"),
    ]
    turns = _chat(client, history)
    assert two.choices[0].finish_reason in ("stop", "length") and turns.choices[0].finish_reason in ("stop", "length")


def test_streaming_with_image_equals_non_streaming(server):
    client = server.client()
    messages = [_image_message(_png((10, 200, 30)))]
    full = _chat(client, messages)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_batch_invariance_with_and_without_images(server):
    client = server.client()
    requests = [
        [_image_message(_png((i * 40, 90, 200 - i * 30)))]
        if i % 2
        else [{"role": "user", "content": f"Tell me about number {i}."}]
        for i in range(6)
    ]
    alone = [_chat(client, m).choices[0].message.content for m in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: _chat(client, m).choices[0].message.content, requests))
    assert together == alone


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,!!!notbase64", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "image"),
        (
            "data:image/png;base64," + base64.b64encode(base64.b64decode(_png((1, 2, 3)).split(",")[1])[:60]).decode(),
            "image",
        ),
        ("http://example.com/cat.png", "remote"),
        ("file:///etc/passwd", "data:"),
    ],
)
def test_bad_media_is_400_and_server_keeps_serving(server, url, fragment):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, [_image_message(url)])
    body = err.value.response.json()["error"]
    assert fragment in body["message"].lower() and "traceback" not in body["message"].lower()
    assert _chat(client, [{"role": "user", "content": "still there?"}]).choices


def test_too_many_images_and_oversized_body(server):
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers=AUTH,
        timeout=30,
        json={"model": "tiny", "max_tokens": 2, "messages": [_image_message(*[_png((5, 5, 5))] * 9)]},
    )
    assert r.status_code == 400 and "image" in json.dumps(r.json()["error"]).lower()


def test_engine_prefix_cache_keys_images_by_content(tiny_model_dir):
    """Same tokens, different pixels: the second request must not reuse the first one's image blocks."""
    engine = Engine.from_model_dir(tiny_model_dir, EngineConfig(block_size=4))
    vision = engine.runner.config.vision
    pixels = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(0))
    slots = vision.tokens_per_image(56, 56)
    prompt = [1, 3] + [vision.image_token_id] * slots + [13] + [1100 + i for i in range(12)] + [4]
    params = SamplingParams(temperature=0, max_tokens=6)

    def run(rid: str, image: ImageInput) -> tuple[list[int], int]:
        engine.add_request(rid, prompt, params, images=[image])
        tokens, cached = [], 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                cached = out.num_cached_tokens
        return tokens, cached

    first, cached_first = run("a", ImageInput(pixels, b"hash-a"))
    again, cached_again = run("b", ImageInput(pixels, b"hash-a"))
    other, cached_other = run("c", ImageInput(-pixels, b"hash-c"))
    assert cached_first == 0 and cached_again > slots and again == first
    assert cached_other <= 2  # only the blocks before the first [IMG] can match
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(ValueError, match="image tokens"):
        engine.add_request("d", prompt[:-3] + [4], params, images=[ImageInput(pixels[:, :28], b"x")])


@pytest.mark.parametrize("budget", [5, 13])
def test_chunk_boundaries_inside_an_image_do_not_change_outputs(tiny_model_dir, budget):
    pixels = torch.randn(3, 112, 84, generator=torch.Generator().manual_seed(1))

    def run(cfg: EngineConfig) -> list[int]:
        engine = Engine.from_model_dir(tiny_model_dir, cfg)
        vision = engine.runner.config.vision
        prompt = [1, 3, 1200] + [vision.image_token_id] * vision.tokens_per_image(112, 84) + [13, 1300, 4]
        engine.add_request(
            "r", prompt, SamplingParams(temperature=0, max_tokens=8), images=[ImageInput(pixels, b"img")]
        )
        tokens = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
        return tokens

    whole = run(EngineConfig(block_size=4))
    chunked = run(EngineConfig(block_size=4, max_num_batched_tokens=budget, max_num_seqs=4))
    assert chunked == whole
