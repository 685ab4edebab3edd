"""The arithmetic drills (``arith_drill.py``): right values, labels on the values only, the traces' spelling,
no held-out pair, and that the trainer mixes them in after the copy-drill phase."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from small4.demo_model import arith_drill, split
from small4.demo_model.curriculum import add_trace, sub_trace
from small4.demo_model.train import micro_spec, train
from small4.weights.tekken_tiny import write_tiny_tekken

LINE = re.compile(r"^(\d+(?: [+-] \d+)+) = (-?\d+)\.$")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tekkenizer:
    path = tmp_path_factory.mktemp("tok") / "tekken.json"
    write_tiny_tekken(path, 2000, spaceless=True)
    return Tekkenizer.from_file(path)


def _encode(tokenizer: Tekkenizer):
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


def _lines(tokenizer: Tekkenizer, example) -> list[str]:
    text = tokenizer.decode(example.tokens[1:])
    return [line.rstrip(".") + "." for line in text.strip().split(". ") if line]


def test_every_line_is_a_true_statement_and_no_pair_is_held_out(tokenizer: Tekkenizer) -> None:
    rng = random.Random(3)
    kinds = set()
    for _ in range(200):
        example = arith_drill.arith_drill(rng, _encode(tokenizer))
        assert example.tokens[0] == arith_drill.ARITH_TAG
        for line in _lines(tokenizer, example):
            m = LINE.match(line)
            assert m, line
            lhs, value = m.group(1), int(m.group(2))
            assert eval(lhs) == value, line  # noqa: S307 (digits and +/- only, matched above)
            numbers = [int(n) for n in re.findall(r"\d+", lhs)]
            if len(numbers) == 2 and numbers[0] >= 20:  # a whole two-digit sum or difference
                assert not split.heldout_pair(*numbers), line
            kinds.add((lhs.count("+"), lhs.count("-"), len(numbers), max(numbers) >= 20))
    assert len(kinds) >= 5  # digit facts of each kind and whole sums and differences


def test_labels_sit_on_the_values_and_their_full_stops_only(tokenizer: Tekkenizer) -> None:
    example = arith_drill.arith_drill(random.Random(0), _encode(tokenizer))
    assert len(example.labels) == len(example.tokens)
    labelled = [i for i, y in enumerate(example.labels) if y >= 0]
    for i in labelled:
        assert example.labels[i] == example.tokens[i + 1]  # next-token targets
    targets = "".join(tokenizer.decode([example.tokens[i + 1]]) for i in labelled)
    values = [line.split(" = ")[1] for line in _lines(tokenizer, example)]
    assert targets == "".join(values)


def test_the_drill_facts_are_the_traces_facts() -> None:
    """Every single-digit step a trace writes (``Units: 9 + 3 = 12``, ``Tens: 7 + 1 + 1 = 9``, ``13 - 6 = 7``,
    ``6 - 1 - 3 = 2``) is a line the drill draws, spelled the same."""
    rng = random.Random(1)
    drawn = {arith_drill.digit_fact(rng) for _ in range(20000)}
    drawn_text = {f"{lhs} = {value}" for lhs, value in drawn}
    fact = re.compile(r"(\d+(?: [+-] \d+)+ = \d+)")
    for a in range(100):
        for b in range(100):
            traces = [add_trace(a, b)] + ([sub_trace(a, b)] if a >= b else [])
            for trace in traces:
                for step in fact.findall(trace):
                    assert step in drawn_text, (a, b, step)


def test_train_mixes_arith_drills_in_after_the_drill_phase(tmp_path: Path) -> None:
    log = train(
        tmp_path / "out",
        steps=4,
        spec=micro_spec(),
        curriculum="v1",
        eval_per_task=1,
        progress=False,
        threads=1,
        copy_drill_steps=2,
        arith_drill_share=0.3,
    )
    assert log["arith_drill_share"] == 0.3
    assert "drill_arith" in log["final_loss_per_task"]


def test_trace_drills_are_the_curriculums_traces_labelled_on_the_trace(tokenizer: Tekkenizer) -> None:
    rng = random.Random(5)
    encode = _encode(tokenizer)
    ops = set()
    for _ in range(100):
        example = arith_drill.trace_drill(rng, encode)
        assert example.tokens[0] == arith_drill.ARITH_TAG and len(example.labels) == len(example.tokens)
        labelled = [i for i, y in enumerate(example.labels) if y >= 0]
        assert all(example.labels[i] == example.tokens[i + 1] for i in labelled)
        targets = "".join(tokenizer.decode([example.tokens[i + 1]]) for i in labelled)
        text = tokenizer.decode(example.tokens[1:])
        pairs = re.findall(r"(\d+) ([+-]) (\d+): ", text)
        assert 2 <= len(pairs) <= 4
        traces = []
        for a, op, b in pairs:
            a, b = int(a), int(b)
            assert not split.heldout_pair(a, b), (a, b)
            traces.append(add_trace(a, b) if op == "+" else sub_trace(a, b))
            ops.add(op)
        assert targets == "".join(traces)  # exactly the traces, nothing of the questions
    assert ops == {"+", "-"}


def test_arith_batch_mixes_trace_and_fact_drills(tokenizer: Tekkenizer) -> None:
    batch = arith_drill.arith_batch(random.Random(2), _encode(tokenizer), 4000)
    texts = [tokenizer.decode(e.tokens[1:]) for e in batch]
    assert any("Units:" in t for t in texts) and any("Units:" not in t for t in texts)
