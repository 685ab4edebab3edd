"""Every checkpoint layout make-tiny writes loads and generates through the real server, and generation_config.json
gives the default sampling parameters (``--generation-config auto``) unless told to ignore it."""

from __future__ import annotations

import json

import pytest

from conftest import start_server
from small4.server.protocol import CompletionRequest
from small4.weights.tiny import make_tiny

LAYOUTS = {
    "mistral-bf16": ("mistral", "none"),
    "hf-fp8": ("hf", "fp8"),
    "mistral-fp8": ("mistral", "fp8"),
    "release-both-file-sets": ("release", "none"),
    "release-fp8-both-file-sets": ("release", "fp8"),
    "release-nvfp4": ("release", "nvfp4"),
    "hf-fp8-block": ("hf", "fp8-block"),
    "mistral-nvfp4": ("mistral", "nvfp4"),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_generates_through_the_server(name, tmp_path):
    layout, quant = LAYOUTS[name]
    server = start_server(make_tiny(tmp_path, layout=layout, quant=quant, seed=5))
    try:
        r = server.client().completions.create(model="tiny", prompt="hello world", max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    finally:
        server.stop()


def _greedy_and_seeded(server, seeds=(1, 2, 3, 4)) -> tuple[str, list[str]]:
    client = server.client()

    def text(**kw) -> str:
        return client.completions.create(model="tiny", prompt="hello world", max_tokens=8, **kw).choices[0].text

    return text(temperature=0), [text(seed=s) for s in seeds]


def test_generation_config_supplies_default_sampling(tmp_path):
    """generation_config.json says top_k 1: a request that sets no sampling field then decodes greedily, whatever
    its seed; ignoring the file, the same requests sample at temperature 1 and stray from the greedy text."""
    model_dir = make_tiny(tmp_path, layout="release", seed=5)
    (model_dir / "generation_config.json").write_text(json.dumps({"top_k": 1}))
    server = start_server(model_dir)
    try:
        assert server.ctx.sampling_defaults == {"top_k": 1}
        greedy, seeded = _greedy_and_seeded(server)
        assert seeded == [greedy] * len(seeded)
    finally:
        server.stop()
    server = start_server(model_dir, "--generation-config", "ignore")
    try:
        assert server.ctx.sampling_defaults == {}
        greedy_again, seeded = _greedy_and_seeded(server)
        assert greedy_again == greedy and any(s != greedy for s in seeded)
    finally:
        server.stop()


def test_request_values_win_over_generation_config():
    defaults = {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "min_p": 0.1, "repetition_penalty": 1.1}
    unset = CompletionRequest(prompt="x").sampling_params(4, None, defaults=defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.min_p, unset.repetition_penalty) == (
        0.7,
        0.95,
        20,
        0.1,
        1.1,
    )
    own = CompletionRequest(prompt="x", temperature=0.0, top_p=0.5, top_k=3).sampling_params(4, None, defaults=defaults)
    assert (own.temperature, own.top_p, own.top_k, own.min_p) == (0.0, 0.5, 3, 0.1)
    plain = CompletionRequest(prompt="x").sampling_params(4, None)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)
