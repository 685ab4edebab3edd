"""Speculative decoding through the server with the official openai client over loopback: the per-request
``speculative`` field (extra_body; the Mistral dialect takes it too), ``auto`` off for structured output, greedy
answers equal with and without it, and the acceptance metrics in /metrics."""

from __future__ import annotations

import re

import httpx
import pytest

from conftest import start_server
from small4.weights.tiny_draft import make_tiny_draft

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir, tmp_path_factory):
    draft = make_tiny_draft(tmp_path_factory.mktemp("draft"), seed=3)
    s = start_server(tiny_model_dir, "--speculative-model", str(draft), "--num-speculative-tokens", "3")
    yield s
    s.stop()


def verify_steps(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return float(re.search(r"^small4_spec_verify_steps_total (\S+)$", text, re.M).group(1))


def test_switch_and_auto(spec_server):
    client = spec_server.client()
    on = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12)
    after_on = verify_steps(spec_server)
    assert after_on > 0
    off = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"speculative": False}
    )
    assert off.choices[0].message.content == on.choices[0].message.content
    assert verify_steps(spec_server) == after_on  # no drafts verified for it
    client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=8, response_format={"type": "json_object"}
    )
    assert verify_steps(spec_server) == after_on  # auto: structured output does not speculate
    forced = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        temperature=0,
        max_tokens=8,
        response_format={"type": "json_object"},
        extra_body={"speculative": True},
    )
    assert verify_steps(spec_server) > after_on  # asked for: a grammar-constrained request speculates too
    assert forced.choices[0].finish_reason in ("stop", "length")
    text = httpx.get(f"{spec_server.base_url}/metrics").text
    for name in ("small4_spec_acceptance_rate", "small4_spec_mean_accepted_length"):
        assert re.search(rf"^{name} \S+$", text, re.M), name
    assert "small4_spec_accepted_length_per_step_count" in text
    assert "small4_spec_request_acceptance_rate_count" in text


def test_mistral_dialect_takes_the_field(spec_server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "random_seed": 1, "speculative": False}
    r = httpx.post(
        f"{spec_server.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {spec_server.api_key or 'unused'}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    bad = httpx.post(f"{spec_server.base_url}/v1/chat/completions", json={**body, "speculative": "sometimes"})
    assert bad.status_code in (400, 422)


def test_the_embedded_model_speculates_with_its_shipped_draft_under_the_latency_profile():
    from small4.cli import build_parser
    from small4.server.serve import build_from_args
    from small4.weights import embedded_draft_dir

    assert embedded_draft_dir() is not None  # shipped beside the demo model
    for extra, drafts in ((["--profile", "latency"], True), ([], False)):
        args = build_parser().parse_args(["serve", "--kv-cache-memory", "8MiB", *extra])
        _, ctx = build_from_args(args)
        runner = ctx.engine.engine.runner
        assert (runner.draft is not None) == drafts, extra
        assert (ctx.engine.engine.spec is not None) == drafts, extra
