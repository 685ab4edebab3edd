"""``train-demo --size copy``: the demo shapes with the spaceless tokenizer and a wider YaRN window, end to end."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path

from small4.demo_model.train import copy_spec, demo_spec, micro_spec, train, with_copy_features


def test_copy_spec_changes_only_the_tokenizer_and_the_rope_window() -> None:
    copy, demo = copy_spec(), demo_spec()
    assert copy.max_position_embeddings == demo.max_position_embeddings  # the same context
    assert (copy.spaceless_tokenizer, copy.yarn_original_max) == (True, 256)
    assert replace(copy, spaceless_tokenizer=False, yarn_original_max=32, yarn_factor=128.0) == demo


def test_train_writes_the_spaceless_tokenizer_and_the_rope_window(tmp_path: Path) -> None:
    spec = with_copy_features(micro_spec())
    log = train(tmp_path / "out", steps=2, spec=spec, curriculum="v1", eval_per_task=1, progress=False, threads=1)
    assert log["spec"]["spaceless_tokenizer"] is True
    rope = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["rope_parameters"]
    assert (rope["original_max_position_embeddings"], rope["factor"]) == (256, 16.0)
    vocab = json.loads((tmp_path / "out" / "tekken.json").read_text())["vocab"]
    pieces = [base64.b64decode(e["token_bytes"]) for e in vocab]
    assert all(len(p) == 1 or b" " not in p for p in pieces)  # the evaluation above ran through this tokenizer
