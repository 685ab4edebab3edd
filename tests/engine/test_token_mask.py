"""Grammar bitmasks to sampler masks: bit order, crop and pad to the model's vocabulary, and the provider wired
into the real engine (with a scripted matcher, so this test does not depend on chat/)."""

from __future__ import annotations

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.engine import LLM
from small4.engine.sampling_params import SamplingParams
from small4.engine.token_mask import bitmask_to_bool, token_mask_provider
from small4.weights.tiny import make_tiny


def _bitmask(allowed: set[int], vocab: int) -> bytes:
    """Reference packing, llguidance's layout: 32-bit little-endian words, bit t for token t."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return b"".join(w.to_bytes(4, "little") for w in words)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 3000])
def test_bitmask_round_trip(vocab):
    allowed = {t for t in (0, 1, 7, 8, 30, 31, 32, 33, 63, 64, 99, 2999) if t < vocab}
    mask = bitmask_to_bool(_bitmask(allowed, vocab), vocab)
    assert mask.dtype == torch.bool and mask.shape == (vocab,)
    assert set(torch.nonzero(mask).flatten().tolist()) == allowed


def test_bitmask_is_cropped_or_padded_to_the_model_vocab():
    bits = _bitmask({0, 40, 99}, 100)  # 4 words: 128 bits
    assert torch.nonzero(bitmask_to_bool(bits, 50)).flatten().tolist() == [0, 40]
    padded = bitmask_to_bool(bits, 300)
    assert padded.shape == (300,) and torch.nonzero(padded).flatten().tolist() == [0, 40, 99]


class _Scripted:
    """Allows exactly ``script[len(output)]`` next, then only EOS; records what it was shown."""

    def __init__(self, script: list[int], eos: int, vocab: int) -> None:
        self.script, self.eos, self.vocab = script, eos, vocab
        self.seen: list[list[int]] = []

    def advance(self, output_token_ids):
        self.seen.append(list(output_token_ids))
        n = len(output_token_ids)
        return _bitmask({self.script[n]} if n < len(self.script) else {self.eos}, self.vocab)


def test_provider_passes_the_output_and_returns_a_vocab_mask():
    matcher = _Scripted([5, 6], eos=2, vocab=40)
    provider = token_mask_provider(matcher, 64)
    mask = provider([5])
    assert matcher.seen == [[5]]
    assert mask.shape == (64,) and torch.nonzero(mask).flatten().tolist() == [6]


def test_engine_follows_the_mask_and_stops_on_eos(tmp_path):
    llm = LLM(make_tiny(tmp_path, layout="hf", seed=7), EngineConfig(block_size=4))
    engine, eos = llm.engine, llm.tokenizer.eos_id
    script = [1500, 1777, 2001, 1500]
    matchers = [_Scripted(script, eos, llm.tokenizer.vocab_size) for _ in range(2)]
    vocab = engine.runner.config.text.vocab_size
    prompt = llm.tokenizer.encode("hello there", bos=True)
    for i, (matcher, temperature) in enumerate(zip(matchers, (0.0, 1.0), strict=True)):
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=50)
        engine.add_request(f"r{i}", prompt, params, token_mask_factory=lambda m=matcher: token_mask_provider(m, vocab))
    tokens: dict[str, list[int]] = {"r0": [], "r1": []}
    finish: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert tokens == {"r0": [*script, eos], "r1": [*script, eos]}
    assert finish == {"r0": "stop", "r1": "stop"}
    assert matchers[0].seen == [script[:n] for n in range(len(script) + 1)]
