"""The v2 curriculum and the held-out generator: encoding, disjoint pools, the checks, an end-to-end eval."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from small4.chat.parse import OutputParser
from small4.demo_model import curriculum as v1
from small4.demo_model import curriculum_v2 as v2
from small4.demo_model import heldout, split
from small4.demo_model.curriculum import encode_example
from small4.demo_model.train import (
    batch_examples,
    batch_loss,
    initial_model,
    load_renderer,
    micro_spec,
    save_checkpoint,
    write_sized_shards,
)
from small4.weights.embedded import SHIPPED_DEMO_DIR
from small4.weights.loader import load_model
from small4.weights.tekken_tiny import write_tiny_tekken


@pytest.fixture(scope="module")
def renderer(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    write_tiny_tekken(d / "tekken.json", 2000)
    return load_renderer(d)


def _decode(renderer, ids: list[int]) -> str:
    return renderer.tokenizer.instruct_tokenizer.tokenizer.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


# -- what a training / held-out draw contains -------------------------------------------------------------------


def _texts(messages: list[dict]) -> list[str]:
    out = []
    for m in messages:
        if m["role"] == "user":
            c = m["content"]
            out.append(c if isinstance(c, str) else c[-1]["text"])
    return out


def _scalars(value, strings: set, ints: set) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _scalars(v, strings, ints)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        ints.add(value)
    elif isinstance(value, str):
        strings.add(value)


def _features(messages: list[dict], tools: list[dict] | None, args: list[dict]) -> dict[str, set]:
    f = {"prompts": set(_texts(messages)), "names": set(), "params": set(), "strings": set(), "ints": set()}
    for t in tools or []:
        f["names"].add(t["function"]["name"])
        f["params"].update(t["function"]["parameters"]["properties"])
    for a in args:
        _scalars(a, f["strings"], f["ints"])
    return f


def _merge(into: dict[str, set], f: dict[str, set]) -> None:
    for k, v in f.items():
        into.setdefault(k, set()).update(v)


def _training_features(module, n: int, seed: int) -> tuple[dict[str, set], set]:
    feats: dict[str, set] = {}
    pairs: set = set()
    for ex in module.sample_examples(seed, n):
        args = [json.loads(c["function"]["arguments"]) for m in ex.messages for c in m.get("tool_calls") or []]
        args += [json.loads(c["function"]["arguments"]) for c in ex.assistant.get("tool_calls") or []]
        args += [json.loads(m["content"]) for m in ex.messages if m["role"] == "tool" and m["content"][:1] == "{"]
        if ex.task == "json":
            args.append(ex.expected["object"])
            feats.setdefault("params", set()).update(ex.expected["schema"]["properties"])
        _merge(feats, _features(ex.messages, ex.tools, args))
        if "pair" in ex.expected:
            pairs.add(ex.expected["pair"])
    return feats, pairs


def _heldout_features(cases: list[heldout.Case]) -> tuple[dict[str, set], set]:
    feats: dict[str, set] = {}
    pairs: set = set()
    for c in cases:
        msgs = c.request["messages"]
        args = [json.loads(k["function"]["arguments"]) for m in msgs for k in m.get("tool_calls") or []]
        args += [json.loads(m["content"]) for m in msgs if m["role"] == "tool"]
        args += [c.expected[k] for k in ("arguments", "object") if k in c.expected]
        if "schema" in c.expected:  # JSON keys count as parameter names
            feats.setdefault("params", set()).update(c.expected["schema"]["properties"])
        _merge(feats, _features(msgs, c.request.get("tools"), args))
        if "pair" in c.expected:
            pairs.add(c.expected["pair"])
    return feats, pairs


def test_heldout_never_draws_a_training_case() -> None:
    """Over thousands of draws: no shared prompt, tool name, parameter, string or integer argument, operand pair."""
    cases = heldout.heldout_cases(seed=3, per_skill=150)
    held, held_pairs = _heldout_features(cases)
    assert len(held_pairs) > 200 and all(split.heldout_pair(a, b) for a, b in held_pairs)
    assert held["ints"] and all(split.heldout_number(n) for n in held["ints"] if n >= 10)  # 2-9: counts
    for module, n in ((v2, 4000), (v1, 2000)):
        train, train_pairs = _training_features(module, n, seed=11)
        assert train["prompts"] and not held["prompts"] & train["prompts"]
        assert train["names"] and not held["names"] & train["names"]
        assert train["params"] and not held["params"] & train["params"]
        assert not {s for s in held["strings"] if len(s) > 3} & train["strings"]
        if module is v2:  # v1 (the shipped model's curriculum) drew every pair and every number
            assert train_pairs and not train_pairs & held_pairs
            assert train["ints"] and not {n for n in train["ints"] if n >= 10 and split.heldout_number(n)}
    for a, b in ((v2.ADD_TEMPLATES, heldout.ADD_TEMPLATES), (v2.TOOL_TEMPLATES, heldout.TOOL_TEMPLATES)):
        assert not set(a) & set(b)
    assert not set(v2.KV_FORMS) & set(heldout.KV_FORMS)
    image_questions = (
        (v2.DESCRIBE_QUESTIONS, heldout.DESCRIBE), (v2.COLOUR_QUESTIONS, heldout.ASK_COLOUR),
        (v2.SHAPE_QUESTIONS, heldout.ASK_SHAPE), (v2.COUNT_QUESTIONS, heldout.ASK_COUNT),
    )  # fmt: skip
    every_heldout_question = {q.lower() for _, held_qs in image_questions for q in held_qs}
    for train_qs, _ in image_questions:
        assert len(train_qs) >= 10 and not {q.lower() for q in train_qs} & every_heldout_question
    assert not {w.lower() for w in split.TRAIN_VALUES} & {w.lower() for w in split.HELDOUT_VALUES}


def test_heldout_cases_are_deterministic_and_valid() -> None:
    a, b = heldout.heldout_cases(5, 3), heldout.heldout_cases(5, 3)
    assert [c.request for c in a] == [c.request for c in b]
    assert [c.request for c in heldout.heldout_cases(6, 3)] != [c.request for c in a]
    for c in a:
        if "arguments" in c.expected:  # what the checker wants is itself valid for the tool's schema
            schema = heldout.TOOLS[c.expected["name"]]["function"]["parameters"]
            assert heldout.valid(c.expected["arguments"], schema)
        if c.skill in ("add_none", "add_high"):
            x, y = c.expected["pair"]
            assert x % 10 + y % 10 >= 10 and c.expected["value"] == x + y
        if c.skill in ("sub_none", "sub_high"):
            x, y = c.expected["pair"]
            assert x % 10 < y % 10 and c.expected["value"] == x - y


def _reply(content=None, calls=(), finish="stop", tokens=10) -> dict:
    return {
        "content": content,
        "reasoning": None,
        "tool_calls": list(calls),
        "finish_reason": finish,
        "completion_tokens": tokens,
    }


def test_checks_accept_right_and_refuse_wrong_replies() -> None:
    by_skill = {c.skill: c for c in heldout.heldout_cases(9, 1)}
    add = by_skill["add_none"]
    x, y = add.expected["pair"]
    assert heldout.check(add, _reply(f"{x} + {y} = {x + y}."))["add_none"]
    assert not heldout.check(add, _reply(f"{x} + {y} = {x + y + 10}."))["add_none"]
    assert not heldout.check(add, _reply(None))["add_none"]
    tool = by_skill["tool_named"]
    name, args = tool.expected["name"], tool.expected["arguments"]
    assert heldout.check(tool, _reply(calls=[(name, json.dumps(args))], finish="tool_calls"))["tool_named"]
    assert not heldout.check(tool, _reply(calls=[(name[1:], json.dumps(args))]))["tool_named"]
    wrong = {k: ("x" if not isinstance(v, str) else v + "x") for k, v in args.items()}
    assert not heldout.check(tool, _reply(calls=[(name, json.dumps(wrong))]))["tool_named"]
    req = by_skill["tool_required"]
    good = [(req.expected["name"], json.dumps(req.expected["arguments"]))]
    assert heldout.check(req, _reply(calls=good, finish="tool_calls"))["tool_required"]
    assert not heldout.check(req, _reply(calls=good, finish="length"))["tool_required"]
    js = by_skill["json_schema"]
    text = json.dumps(js.expected["object"])
    assert heldout.check(js, _reply(text)) == {"json_schema": True, "json_values": True}
    assert not heldout.check(js, _reply(text, finish="length", tokens=64))["json_schema"]
    assert not heldout.check(js, _reply(text[:-1]))["json_schema"]
    answer = by_skill["tool_answer"]
    assert heldout.check(answer, _reply(" and ".join(answer.expected["uses"]) + "."))["tool_answer"]
    assert not heldout.check(answer, _reply("It is sunny."))["tool_answer"]
    assert not heldout.check(by_skill["chat_high"], _reply(""))["chat_high"]
    count = by_skill["vision_count"]
    assert heldout.check(count, _reply(f"There are {count.expected['count']} shapes."))["vision_count"]


def test_eval_runs_end_to_end_through_the_server(tmp_path: Path) -> None:
    """A handful of held-out cases on the shipped model through a real in-process server, written to the log."""
    model = tmp_path / "demo"
    shutil.copytree(SHIPPED_DEMO_DIR, model)
    skills = ("greeting", "capital", "tool_named", "json_schema", "vision_colour")
    result = heldout.run_heldout(model, seed=1, per_skill=1, skills=skills)
    assert set(result["rates"]) == {*skills, "json_values", "tool_named_name"}
    assert all(0.0 <= r <= 1.0 for r in result["rates"].values())
    assert result["n"]["greeting"] == 1 and result["samples"][0]["reply"]["finish_reason"] in ("stop", "length")
    heldout.record(model, result)
    log = json.loads((model / "training_log.json").read_text())
    assert log["heldout_v2"]["rates"] == result["rates"] and "accuracy" in log  # the rest of the log kept


# -- the v2 curriculum ------------------------------------------------------------------------------------------


def test_v2_deterministic_and_covers_every_task() -> None:
    a = v2.sample_examples(7, 60)
    assert [x.messages for x in a] == [x.messages for x in v2.sample_examples(7, 60)]
    assert {x.task for x in v2.sample_examples(0, 300)} == set(v2.TASKS)


@pytest.mark.parametrize("task", v2.TASKS)
def test_v2_targets_encode_and_parse_back(renderer, task: str) -> None:
    rng = random.Random(task)
    for _ in range(8):
        ex = v2.make_example(task, rng)
        enc = encode_example(renderer, ex)
        assert (
            enc.prompt == renderer.render(ex.messages, tools=ex.tools, reasoning_effort=ex.reasoning_effort).token_ids
        )
        parser = OutputParser(reasoning=ex.reasoning_effort != "none", tools=ex.tools is not None)
        parser.feed(_decode(renderer, enc.target[:-1]))
        parser.finish()
        assert parser.content == (ex.assistant.get("content") or "")
        assert parser.reasoning_content == ex.assistant.get("reasoning_content", "")
        calls = [(c.name, json.loads(c.arguments)) for c in parser.tool_calls]
        assert calls == [
            (c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in ex.assistant.get("tool_calls") or []
        ]
        if task == "tool_call":
            (name, args), tool = calls[0], next(t for t in ex.tools if t["function"]["name"] == calls[0][0])
            assert heldout.valid(args, tool["function"]["parameters"]) and name == ex.expected["name"]
            assert list(args) == [p for p in tool["function"]["parameters"]["properties"] if p in args]  # grammar order
        if task == "json":
            assert heldout.valid(json.loads(ex.assistant["content"]), ex.expected["schema"])
        if task == "add":
            x, y = ex.expected["pair"]
            assert ex.assistant["content"] == f"{x} + {y} = {x + y}." and not split.heldout_pair(x, y)


def test_showcase_tools_keep_the_needed_tool_and_vary_how_they_are_sent(renderer) -> None:
    """The demo's calculator / get_weather in subsets, orders and SDK serialisations (strict, closed, titled): the
    called tool is always on offer, and every form renders through the server's renderer."""
    rng = random.Random(3)
    names, strict, titled = set(), 0, 0
    for _ in range(200):
        ex = v2.make_example(rng.choice(("v1_tool_call", "v1_tool_answer")), rng)
        offered = {t["function"]["name"]: t["function"] for t in ex.tools}
        called = next(c["function"]["name"] for m in [*ex.messages, ex.assistant] for c in m.get("tool_calls") or [])
        assert called in offered
        names.add(tuple(sorted(offered)))
        for fn in offered.values():
            if fn.get("strict"):
                strict += 1
                assert fn["parameters"]["additionalProperties"] is False
                titled += all("title" in p for p in fn["parameters"]["properties"].values())
        encode_example(renderer, ex)
    assert {("calculator",), ("get_weather",), ("calculator", "get_weather")} <= names and strict and titled == strict
    assert any(len(names_) > 2 for names_ in names)  # sometimes beside random tools


def test_v2_tool_calls_copy_their_arguments_from_the_prompt() -> None:
    rng = random.Random(0)
    for _ in range(300):
        ex = v2.make_example("tool_call", rng)
        prompt = ex.messages[-1]["content"]
        for value in ex.expected["arguments"].values():
            if not isinstance(value, bool):
                assert str(value) in prompt, (value, prompt)


def test_v2_names_enums_and_turns_reach_beyond_the_pools() -> None:
    """Parameter names and enum values are not only the fixed pools (a model trained on those recalled, and gave
    held-out tools the wrong enum value); some chats and sums follow an earlier finished exchange."""
    rng = random.Random(1)
    params: set[str] = set()
    enums: set[tuple] = set()
    for _ in range(400):
        for tool in v2.make_example("tool_call", rng).tools:
            props = tool["function"]["parameters"]["properties"]
            params.update(props)
            enums.update(tuple(s["enum"]) for s in props.values() if "enum" in s)
    assert set(split.TRAIN_PARAMS) < params and len(params - set(split.TRAIN_PARAMS)) > 100
    assert set(split.TRAIN_ENUMS) < enums and len(enums - set(split.TRAIN_ENUMS)) > 20
    for task, lo, hi in (("chat", 25, 80), ("add", 8, 50)):
        examples = [v2.make_example(task, rng) for _ in range(200)]
        earlier = [ex.messages for ex in examples if len(ex.messages) == 3]
        assert lo < len(earlier) < hi
        assert all([m["role"] for m in msgs] == ["user", "assistant", "user"] for msgs in earlier)


def test_v2_micro_training_lowers_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = micro_spec()
    write_tiny_tekken(tmp_path / "tekken.json", spec.num_bpe_ranks)
    model = initial_model(spec, 0)
    batch = batch_examples(load_renderer(tmp_path), random.Random(0), 900, curriculum=v2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss, _ = batch_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sized_shards_stay_under_the_limit_and_load(tmp_path: Path) -> None:
    spec = micro_spec()
    model = initial_model(spec, 0).eval()
    save_checkpoint(model, spec, tmp_path)  # the writer's own index and config
    from small4.demo_model.train import export_hf_state_dict

    for old in tmp_path.glob("model-*.safetensors"):
        old.unlink()
    files = write_sized_shards(export_hf_state_dict(model, spec), tmp_path, shard_bytes=40_000)
    assert len(files) > 3
    biggest = max(t.numel() * 2 for t in export_hf_state_dict(model, spec).values())
    assert all((tmp_path / f).stat().st_size <= max(40_000, biggest) + 20_000 for f in files)
    loaded = load_model(tmp_path, dtype=torch.float32, progress=False)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p.detach().bfloat16().float())


def test_train_demo_v2_runs_to_its_held_out_log(tmp_path: Path) -> None:
    """``small4 train-demo`` (v2 by default) end to end on the micro shapes: train until ``--minutes`` is spent
    (after the first step), save, held-out eval through the server, log."""
    from small4.cli import build_parser
    from small4.demo_model.train import check_sizes

    out = tmp_path / "v2"
    argv = ["train-demo", "--out", str(out), "--size", "micro", "--steps", "50", "--minutes", "0.0001"]
    args = build_parser("train-demo").parse_args([*argv, "--token-budget", "600", "--heldout-per-skill", "1"])
    assert args.curriculum == "v2" and args.func(args) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 1 and log["curriculum"] == "v2" and log["minutes_budget"] == 0.0001
    assert log["accuracy"] is None and log["spec"]["hidden_size"] == micro_spec().hidden_size
    assert set(heldout.SKILLS) <= set(log["heldout_v2"]["rates"]) and log["heldout_v2"]["n"]["tool_named"] == 1
    assert check_sizes(out) > 0
