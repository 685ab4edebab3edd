"""/tokenize, /detokenize and /version (vLLM's shapes) over loopback: counts agree with what the generation
endpoints bill, and token ids read back as the text they came from."""

from __future__ import annotations

import importlib.metadata

import httpx
import pytest

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers={"Authorization": "Bearer test-key"}, timeout=30)


def test_chat_messages_count_what_chat_completions_bills(server):
    t = _post(server, "/tokenize", {"model": "tiny", "messages": MESSAGES}).json()
    r = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert t["count"] == len(t["tokens"]) == r.usage.prompt_tokens
    assert t["max_model_len"] == server.ctx.limits.max_model_len and t["token_strs"] is None
    high = _post(server, "/tokenize", {"messages": MESSAGES, "reasoning_effort": "high"}).json()
    assert high["tokens"] != t["tokens"]  # the model settings are part of the rendered prompt
    text = _post(server, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"]
    assert "[INST]" in text and "Say hello." in text and "You are terse." in text


def test_prompt_round_trip_and_token_strs(server):
    t = _post(server, "/tokenize", {"prompt": "héllo wörld", "return_token_strs": True}).json()
    assert t["tokens"][0] == server.ctx.tokenizer.bos_id
    bare = _post(server, "/tokenize", {"prompt": "héllo wörld", "add_special_tokens": False}).json()
    assert bare["tokens"] == t["tokens"][1:]
    assert "".join(t["token_strs"][1:]) == "héllo wörld"
    assert _post(server, "/detokenize", {"tokens": bare["tokens"]}).json() == {"prompt": "héllo wörld"}
    r = server.client().completions.create(model="tiny", prompt="héllo wörld", max_tokens=1)
    assert r.usage.prompt_tokens == t["count"]


@pytest.mark.parametrize(
    ("path", "body", "match"),
    [
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "exactly one of prompt or messages"),
        ("/tokenize", {}, "exactly one of prompt or messages"),
        ("/tokenize", {"prompt": "a", "tools": []}, "messages only"),
        ("/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}, "not supported"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "does not exist"),
        ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
        ("/tokenize", {"prompt": "a", "surprise": 1}, "surprise"),
    ],
)
def test_bad_requests_are_400s(server, path, body, match):
    r = _post(server, path, body)
    assert r.status_code in (400, 404), r.text
    assert match in r.json()["error"]["message"]


def test_needs_the_api_key(server):
    assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "a"}).status_code == 401


def test_completions_usage_counts_prefix_cache_hits(server):
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    first = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=1)
    again = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_version_is_the_installed_package_and_needs_no_key(server):
    r = httpx.get(f"{server.base_url}/version", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"version": importlib.metadata.version("small4")}
