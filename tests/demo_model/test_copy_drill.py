"""The copy drills (``copy_drill.py``): their labels, their batches, and that the trainer learns from them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from small4.demo_model import copy_drill
from small4.demo_model.train import batch_loss, initial_model, micro_spec, train
from small4.model.context import AttentionMetadata

VOCAB = 3000
SHORT_MAX = 1 + 6 + 12 + 4 + 12  # tag, prefix, segment, filler, segment at their longest


def test_previous_token_drill_labels_each_position_with_the_token_before() -> None:
    rng = random.Random(0)
    for _ in range(50):
        enc = copy_drill.previous_token_drill(rng, VOCAB)
        assert enc.tokens[0] == copy_drill.PREVIOUS_TAG and enc.labels[0] == copy_drill.IGNORE
        assert enc.labels[1:] == enc.tokens[:-1]
        assert all(copy_drill.FIRST_BPE_ID <= t < VOCAB for t in enc.tokens[1:])


@pytest.mark.parametrize("long", [False, True])
def test_repeat_drill_labels_only_the_predictable_part_of_the_repeat(long: bool) -> None:
    rng = random.Random(1)
    lengths = []
    for _ in range(50):
        enc = copy_drill.repeat_drill(rng, VOCAB, long=long)
        lengths.append(len(enc.tokens))
        tokens, labels = enc.tokens, enc.labels
        assert tokens[0] == copy_drill.REPEAT_TAG and len(labels) == len(tokens)
        labelled = [i for i, y in enumerate(labels) if y != copy_drill.IGNORE]
        assert labelled, "every drill has a segment of at least 4 tokens"
        start, end = labelled[0], labelled[-1] + 2  # the repeat is tokens[start:end]
        assert end == len(tokens) and labelled == list(range(start, end - 1))
        assert all(labels[i] == tokens[i + 1] for i in labelled)
        segment = tokens[start:end]
        earlier = tokens[1:start]
        assert any(earlier[k : k + len(segment)] == segment for k in range(len(earlier))), "the repeat occurs earlier"
    assert (max(lengths) <= SHORT_MAX) != long  # short drills stay short: that is what gets them off the plateau


def test_drill_batch_fills_its_budget_with_both_drills() -> None:
    batch = copy_drill.drill_batch(random.Random(2), VOCAB, 4096)
    total = sum(len(e.tokens) for e in batch)
    assert 4096 - 200 < total <= 4096
    assert {e.example.task for e in batch} == {"drill_previous", "drill_repeat"}
    only_previous = copy_drill.drill_batch(random.Random(2), VOCAB, 2048, previous_share=1.0)
    assert {e.example.task for e in only_previous} == {"drill_previous"}
    short = copy_drill.drill_batch(random.Random(2), VOCAB, 4096, previous_share=0.0)
    long = copy_drill.drill_batch(random.Random(2), VOCAB, 4096, previous_share=0.0, long_share=1.0)
    assert max(len(e.tokens) for e in short) <= SHORT_MAX < max(len(e.tokens) for e in long)


def test_batch_loss_uses_the_explicit_labels() -> None:
    """The packed loss equals cross-entropy at the labelled positions, one drill at a time (not the mask path:
    a drill's mask is all zeros, which would leave no target at all)."""
    model = initial_model(micro_spec(), 0).eval()
    vocab = model.embed_tokens.weight.shape[0]
    batch = copy_drill.drill_batch(random.Random(3), vocab, 600)
    with torch.no_grad():
        loss, per_task = batch_loss(model, batch)
        losses = []
        for enc in batch:
            n = len(enc.tokens)
            hidden = model(torch.tensor(enc.tokens), torch.arange(n), AttentionMetadata.for_prefill([n]))
            target = torch.tensor(enc.labels)
            keep = target >= 0
            losses.append(F.cross_entropy(model.compute_logits(hidden[keep]), target[keep], reduction="sum"))
    n_labels = sum(sum(y >= 0 for y in e.labels) for e in batch)
    torch.testing.assert_close(loss, torch.stack(losses).sum() / n_labels, rtol=1e-5, atol=1e-5)
    assert set(per_task) <= {"drill_previous", "drill_repeat"} and per_task


def test_train_runs_drill_steps_then_keeps_a_share(tmp_path: Path) -> None:
    share = 0.25
    log = train(
        tmp_path / "out",
        steps=6,
        spec=micro_spec(),
        curriculum="v1",
        eval_per_task=1,
        progress=False,
        threads=1,
        copy_drill_steps=3,
        copy_drill_share=share,
    )
    assert log["copy_drill_steps"] == 3 and log["copy_drill_share"] == share
    assert {"drill_previous", "drill_repeat"} <= set(log["final_loss_per_task"])
    assert len(set(log["final_loss_per_task"]) - {"drill_previous", "drill_repeat"}) >= 2  # the curriculum too
