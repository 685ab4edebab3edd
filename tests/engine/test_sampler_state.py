"""Penalty counts kept on the device across steps (``PenaltyCounts``, used when the batch has keys) give exactly
the logits the stateless list path gives, step after step, through appends, released and reused rows, pool
growth, a re-used key with another prompt, and rows that use only one kind of penalty."""

from __future__ import annotations

import torch

from small4.engine.sampler import Sampler, SamplingBatch
from small4.engine.sampling_params import SamplingParams

VOCAB = 50


def _batch(params, prompts, outputs, keys):
    return SamplingBatch.from_lists(params, prompts, outputs, keys=keys)


def test_device_counts_equal_list_counts_over_steps():
    g = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalty: never gets a row
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.3),
    ] * 3  # 12 penalised-or-not rows: the pool (8 rows at first) grows
    keys = [f"s{i}" for i in range(len(params))]
    prompts = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (len(params),))]
    outputs: list[list[int]] = [[] for _ in params]
    stateful, stateless = Sampler(), Sampler()
    for step in range(6):
        logits = torch.randn(len(params), VOCAB, generator=g) * 3
        a = stateful.process_logits(logits, _batch(params, prompts, outputs, keys))
        b = stateless.process_logits(logits, _batch(params, prompts, outputs, None))
        assert torch.equal(a, b), step
        for out in outputs:  # every sequence gains one or two tokens (a step may append more than one)
            out.extend(torch.randint(0, VOCAB, (1 + step % 2,), generator=g).tolist())
        if step == 2:  # s1 finishes; a new sequence under a new key takes its pool row
            stateful.release("s1")
            keys[1], prompts[1], outputs[1] = "new", [1, 2, 3], []
        if step == 3:  # a key reused for another sequence (other prompt) is recounted, not continued
            prompts[5], outputs[5] = [7, 7, 8], [9]
    assert set(stateful.penalties._rows) == {k for k, p in zip(keys, params, strict=True) if p.repetition_penalty != 1.0
                                             or p.frequency_penalty or p.presence_penalty}  # fmt: skip


def test_only_new_tokens_are_uploaded():
    sampler = Sampler()
    params = [SamplingParams(frequency_penalty=1.0)]
    prompt, out = [1, 2], [3, 3]
    sampler.process_logits(torch.zeros(1, VOCAB), _batch(params, [prompt], [out], ["a"]))
    row, counted, _ = sampler.penalties._rows["a"]
    assert counted == 2 and sampler.penalties._output[row, 3] == 2
    out.append(4)
    x = sampler.process_logits(torch.zeros(1, VOCAB), _batch(params, [prompt], [out], ["a"]))
    assert sampler.penalties._rows["a"][1] == 3
    assert x[0, 3] == -2.0 and x[0, 4] == -1.0 and x[0, 1] == 0.0  # prompt tokens: not in the frequency count
