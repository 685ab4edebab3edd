"""`small4 eval-demo`: the demo model on held-out cases from a generator of its own, through the real server.

The in-distribution accuracies of ``train.evaluate`` come from the training generators (another seed), so they
overstate what a user sees (issue 17). This generator shares no template, tool, parameter name, string value,
operand pair or tool-argument number with the training curricula (``split`` holds the pools; the test draws
thousands of both and checks). Every case is a real OpenAI request to ``small4 serve`` (in-process, uvicorn on
loopback, the openai client), checked on what the client gets back:

* ``add_none`` / ``add_high`` / ``sub_none`` / ``sub_high``: two-digit operands with a carry / borrow, held-out
  pairs, other phrasings; the last number of the answer must be the result;
* ``tool_named``: 1-4 unseen tools (``search_flights``, ``convert_currency``, ...), the user names one and its
  arguments in other key/value spellings; one call, the exact name, arguments valid for the schema
  (``jsonschema``) and equal to the values in the prompt (``tool_named_name``: the name alone, likewise for the
  two below);
* ``tool_natural``: the same, asked in plain words without the parameter names (harder; not in the thresholds);
* ``tool_required``: ``tool_choice="required"`` with one unseen tool: a valid call that ends (not a runaway number);
* ``tool_answer``: a round trip with an unseen tool and result; the answer must contain every value of the result;
* ``json_schema`` (strict schema, unseen keys): parses, is valid and ends with ``stop`` in at most half of
  ``max_tokens``; ``json_values``: and holds the prompt's values;
* ``greeting`` / ``capital``: unseen phrasings; ``chat_high``: either under ``reasoning_effort="high"``: a
  non-empty answer that is a greeting / names the capital;
* ``vision_colour`` / ``vision_shape`` / ``vision_count``: other questions on fresh images.

``run_heldout`` returns ``{"rates": {skill: rate}, "n": ..., "samples": ...}``; the command writes it into the
checkpoint's ``training_log.json`` under ``heldout_v2``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from small4.demo_model import split
from small4.demo_model.curriculum import CAPITALS, COLOURS, SHAPES, data_url, shape_image
from small4.demo_model.curriculum_v2 import count_image

GENERATOR = "heldout v2 (small4/demo_model/heldout.py)"
MAX_TOKENS = 128  # a spaceless-tokenizer trace plus its answer is ~70 tokens

ADD_TEMPLATES = (
    "What's {a} + {b}?", "How much is {a} plus {b}?", "Please work out {a} plus {b}.", "Sum up {a} and {b}.",
    "{a} + {b} equals?",
)  # fmt: skip
SUB_TEMPLATES = (
    "What's {a} - {b}?", "How much is {a} minus {b}?", "Please work out {a} minus {b}.", "Take {b} away from {a}.",
    "{a} - {b} equals?",
)  # fmt: skip
TOOL_TEMPLATES = (
    "Please invoke {name} where {kvs}.", "Could you run {name}? Use {kvs}.", "Go ahead and call {name} using {kvs}.",
    "{name} please: {kvs}.", "I need {name} for {kvs}.",
)  # fmt: skip
KV_FORMS = ("{p} set to {v}", "{p} = {v}", "{p} as {v}")
JSON_TEMPLATES = (
    "Answer with a JSON object holding {kvs}.", "I need JSON output: {kvs}.", "Format this as JSON - {kvs}.",
)  # fmt: skip
GREETINGS = ("Good morning!", "Hi there, how are you?", "Greetings!", "Howdy!", "Hello friend.", "Hiya!")
GREETING_WORDS = ("hello", "hi", "welcome", "help", "good", "nice", "small4")
CAPITAL_TEMPLATES = ("Which city is the capital of {c}?", "Name the capital of {c}.", "Tell me the capital of {c}.")
DESCRIBE = ("Tell me what this picture shows.", "What is drawn here?")
ASK_COLOUR = ("Name the colour of the shape.", "What colour do you see?")
ASK_SHAPE = ("Name the shape.", "What kind of shape is drawn?")
ASK_COUNT = ("How many objects can you see?", "What is the number of shapes?")
MONTHS = ("March", "June", "August", "October")
BOOL_SAY = {True: "yes", False: "no"}


def _fn(name: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": props, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


_S, _I, _N, _B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
TOOLS = {
    "search_flights": _fn(
        "search_flights", "Search flights", {"origin": _S, "destination": _S, "passengers": _I}, ["origin"]
    ),
    "convert_currency": _fn(
        "convert_currency",
        "Convert money",
        {"amount": _N, "currency": {"type": "string", "enum": list(split.HELDOUT_CURRENCIES)}},
        ["amount", "currency"],
    ),
    "translate_phrase": _fn(
        "translate_phrase",
        "Translate a sentence",
        {"sentence": _S, "language": {"type": "string", "enum": list(split.HELDOUT_LANGUAGES)}},
        ["sentence", "language"],
    ),
    "get_forecast": _fn("get_forecast", "Weather forecast", {"location": _S, "days": _I}, ["location", "days"]),
    "solve_formula": _fn("solve_formula", "Evaluate a formula", {"formula": _S}, ["formula"]),
    "reserve_table": _fn(
        "reserve_table", "Book a restaurant table", {"guests": _I, "date": _S, "urgent": _B}, ["guests", "date"]
    ),
    "quote_share": _fn("quote_share", "Share price", {"symbol": _S}, ["symbol"]),
    "mail_contact": _fn("mail_contact", "Send an email", {"email": _S, "topic": _S}, ["email", "topic"]),
}
NATURAL = {  # plain-words requests: (template, the arguments it states)
    "search_flights": ("Find flights from {origin} to {destination}.", ("origin", "destination")),
    "convert_currency": ("Convert {amount} {currency}.", ("amount", "currency")),
    "get_forecast": ("What is the forecast for {location} for the next {days} days?", ("location", "days")),
    "translate_phrase": ("Translate {sentence} into {language}.", ("sentence", "language")),
    "quote_share": ("What does {symbol} trade at?", ("symbol",)),
}


@dataclass(frozen=True)
class Case:
    """One OpenAI chat request (keyword arguments of ``chat.completions.create``) and what its answer must be."""

    skill: str
    request: dict[str, Any]
    expected: dict[str, Any] = field(default_factory=dict)


# -- values ---------------------------------------------------------------------------------------------------


def heldout_int(rng: random.Random, lo: int = 10, hi: int = 999) -> int:
    """A number training never writes as a tool argument (counts of 2-9 and days of a month are not held out)."""
    while True:
        n = rng.randint(lo, hi)
        if split.heldout_number(n):
            return n


def _value(rng: random.Random, param: str, schema: dict[str, Any]) -> tuple[Any, str]:
    """A held-out value for ``param`` and how the user writes it."""
    if "enum" in schema:
        v = rng.choice(schema["enum"])
        return v, v
    kind = schema["type"]
    if kind == "integer":
        n = rng.randint(2, 9) if param in ("days", "guests", "passengers") else heldout_int(rng)  # counts: any
        return n, str(n)
    if kind == "number":
        n = heldout_int(rng)
        return n, str(n)
    if kind == "boolean":
        b = rng.random() < 0.5
        return b, BOOL_SAY[b]
    if param == "formula":
        v = f"{heldout_int(rng)} * {rng.randint(2, 9)}"
    elif param == "date":
        v = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"
    elif param == "symbol":
        v = "".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(3))
    elif param == "email":
        v = f"{rng.choice(split.HELDOUT_PEOPLE).lower()}@example.org"
    elif param == "sentence":
        v = f"{rng.choice(split.HELDOUT_THINGS)} {rng.choice(split.HELDOUT_THINGS)}"
    else:
        v = rng.choice(split.HELDOUT_PLACES)
    return v, v


def _kvs(rng: random.Random, pairs: list[tuple[str, str]]) -> str:
    form = rng.choice(KV_FORMS)
    return ", ".join(form.format(p=p, v=v) for p, v in pairs)


def _args(rng: random.Random, tool: dict[str, Any], names: tuple[str, ...] | None = None) -> dict[str, Any]:
    params = tool["function"]["parameters"]
    keep = names or [p for p in params["properties"] if p in params["required"] or rng.random() < 0.5]
    return {p: _value(rng, p, params["properties"][p]) for p in params["properties"] if p in keep}


def _tool_set(rng: random.Random, name: str) -> list[dict[str, Any]]:
    others = rng.sample([n for n in TOOLS if n != name], rng.randint(0, 3))
    names = [name, *others]
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


# -- cases ----------------------------------------------------------------------------------------------------


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _arith_case(rng: random.Random, op: str, effort: str) -> Case:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if op == "sub":
            a, b = max(a, b), min(a, b)
            hard = a % 10 < b % 10
        else:
            hard = a % 10 + b % 10 >= 10
        if hard and a != b and split.heldout_pair(a, b):
            break
    q = rng.choice(SUB_TEMPLATES if op == "sub" else ADD_TEMPLATES).format(a=a, b=b)
    value = a - b if op == "sub" else a + b
    request = {"messages": _user(q), "reasoning_effort": effort}
    return Case(f"{op}_{effort}", request, {"value": value, "pair": (a, b)})


def _tool_named_case(rng: random.Random) -> Case:
    name = rng.choice(tuple(TOOLS))
    args = _args(rng, TOOLS[name])
    q = rng.choice(TOOL_TEMPLATES).format(name=name, kvs=_kvs(rng, [(p, s) for p, (_, s) in args.items()]))
    request = {"messages": _user(q), "tools": _tool_set(rng, name)}
    return Case("tool_named", request, {"name": name, "arguments": {p: v for p, (v, _) in args.items()}})


def _tool_natural_case(rng: random.Random, required: bool) -> Case:
    name = rng.choice(tuple(NATURAL))
    template, names = NATURAL[name]
    args = _args(rng, TOOLS[name], names)
    q = template.format(**{p: s for p, (_, s) in args.items()})
    tools = [TOOLS[name]] if required else _tool_set(rng, name)
    request: dict[str, Any] = {"messages": _user(q), "tools": tools}
    if required:
        request["tool_choice"] = "required"
    expected = {"name": name, "arguments": {p: v for p, (v, _) in args.items()}}
    return Case("tool_required" if required else "tool_natural", request, expected)


def _tool_answer_case(rng: random.Random) -> Case:
    named = _tool_named_case(rng)
    call_id = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(9))
    fn = {"name": named.expected["name"], "arguments": json.dumps(named.expected["arguments"])}
    keys = rng.sample(split.HELDOUT_RESULT_KEYS, rng.randint(1, 2))
    result = {k: heldout_int(rng) if rng.random() < 0.5 else rng.choice(split.HELDOUT_VALUES) for k in keys}
    messages = [
        *named.request["messages"],
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": fn}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
    ]
    request = {"messages": messages, "tools": named.request["tools"]}
    return Case("tool_answer", request, {"uses": [str(v) for v in result.values()]})


def _json_case(rng: random.Random) -> Case:
    keys = rng.sample(split.HELDOUT_PARAMS, rng.randint(1, 3))
    kinds = [rng.choice((_S, _I, _B)) for _ in keys]
    props = {k: dict(kind) for k, kind in zip(keys, kinds, strict=True)}
    values = {k: _value(rng, k, props[k]) for k in keys}
    schema = {"type": "object", "properties": props, "required": keys, "additionalProperties": False}
    q = rng.choice(JSON_TEMPLATES).format(kvs=_kvs(rng, [(k, s) for k, (_, s) in values.items()]))
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    expected = {"schema": schema, "object": {k: v for k, (v, _) in values.items()}}
    return Case("json_schema", {"messages": _user(q), "response_format": fmt}, expected)


def _chat_case(rng: random.Random, effort: str) -> Case:
    if rng.random() < 0.5:
        q, expected = rng.choice(GREETINGS), {"any_of": GREETING_WORDS}
        skill = "greeting"
    else:
        country = rng.choice(tuple(CAPITALS))
        q, expected = rng.choice(CAPITAL_TEMPLATES).format(c=country), {"any_of": (CAPITALS[country].lower(),)}
        skill = "capital"
    return Case(
        "chat_high" if effort == "high" else skill, {"messages": _user(q), "reasoning_effort": effort}, expected
    )


def _image_case(rng: random.Random, skill: str) -> Case:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    if skill == "vision_count":
        n = rng.randint(1, 4)
        img, q, expected = count_image(colour, shape, n, rng), rng.choice(ASK_COUNT), {"count": n}
    else:
        img = shape_image(colour, shape, rng)
        asks = {"vision_colour": ASK_COLOUR, "vision_shape": ASK_SHAPE, "vision_describe": DESCRIBE}[skill]
        q, expected = rng.choice(asks), {"colour": colour, "shape": shape}
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": q}]
    return Case(skill, {"messages": [{"role": "user", "content": content}]}, expected)


SKILLS = (
    "add_none", "add_high", "sub_none", "sub_high", "tool_named", "tool_natural", "tool_required", "tool_answer",
    "json_schema", "greeting", "capital", "chat_high", "vision_describe", "vision_colour", "vision_shape",
    "vision_count",
)  # fmt: skip


def _make(skill: str, rng: random.Random) -> Case:
    if skill[:4] in ("add_", "sub_"):
        return _arith_case(rng, skill[:3], skill[4:])
    if skill.startswith("vision_"):
        return _image_case(rng, skill)
    if skill in ("greeting", "capital", "chat_high"):
        while True:  # chat_high mixes both; the others keep their own kind
            case = _chat_case(rng, "high" if skill == "chat_high" else "none")
            if case.skill == skill:
                return case
    return {
        "tool_named": _tool_named_case,
        "tool_natural": lambda r: _tool_natural_case(r, required=False),
        "tool_required": lambda r: _tool_natural_case(r, required=True),
        "tool_answer": _tool_answer_case,
        "json_schema": _json_case,
    }[skill](rng)


def heldout_cases(seed: int, per_skill: int, skills: tuple[str, ...] = SKILLS) -> list[Case]:
    """``per_skill`` cases of every skill; the same seed gives the same cases."""
    rng = random.Random(f"heldout-v2-{seed}")
    return [_make(skill, rng) for skill in skills for _ in range(per_skill)]


# -- checks ---------------------------------------------------------------------------------------------------


def valid(instance: Any, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(instance, schema)
    except jsonschema.ValidationError:
        return False
    return True


def check(case: Case, reply: dict[str, Any]) -> dict[str, bool]:
    """Named 0/1 checks of one reply (``content``, ``reasoning``, ``tool_calls`` [(name, arguments text)],
    ``finish_reason``, ``completion_tokens``)."""
    exp, content = case.expected, (reply["content"] or "").strip()
    lower = content.lower()
    if case.skill[:4] in ("add_", "sub_"):
        numbers = re.findall(r"-?\d+", content)
        return {case.skill: bool(numbers) and int(numbers[-1]) == exp["value"]}
    if case.skill.startswith("tool_") and case.skill != "tool_answer":
        calls = reply["tool_calls"]
        ok = named = len(calls) == 1 and calls[0][0] == exp["name"]
        if ok:
            try:
                args = json.loads(calls[0][1])
            except json.JSONDecodeError:
                args = None
            schema = TOOLS[exp["name"]]["function"]["parameters"]
            ok = isinstance(args, dict) and valid(args, schema) and args == exp["arguments"]
        if case.skill == "tool_required":
            ok = ok and reply["finish_reason"] == "tool_calls"
        return {case.skill: ok, f"{case.skill}_name": named}  # the name alone: progress short of the skill
    if case.skill == "tool_answer":
        return {"tool_answer": bool(content) and all(u in content for u in exp["uses"])}
    if case.skill == "json_schema":
        try:
            obj = json.loads(content)
        except json.JSONDecodeError:
            obj = None
        ends = reply["finish_reason"] == "stop" and reply["completion_tokens"] <= MAX_TOKENS // 2
        ok = obj is not None and valid(obj, exp["schema"]) and ends
        return {"json_schema": ok, "json_values": ok and obj == exp["object"]}
    if case.skill in ("greeting", "capital", "chat_high"):
        words = set(re.findall(r"[a-z0-9]+", lower))
        return {case.skill: bool(content) and any(w in words for w in exp["any_of"])}
    if case.skill == "vision_count":
        numbers = re.findall(r"\d+", content)
        return {"vision_count": bool(numbers) and int(numbers[0]) == exp["count"]}
    words = set(re.findall(r"[a-z]+", lower))
    if case.skill == "vision_colour":
        return {"vision_colour": exp["colour"] in words}
    if case.skill == "vision_shape":
        return {"vision_shape": exp["shape"] in words}
    return {"vision_describe": exp["colour"] in words and exp["shape"] in words}


# -- the server -----------------------------------------------------------------------------------------------


@contextmanager
def serving(model_dir: Path) -> Iterator[str]:
    """``small4 serve MODEL_DIR`` in this process (uvicorn in a thread on a free loopback port); yields the base
    URL, stops the server on exit."""
    import argparse
    import socket
    import threading

    from small4.server.health import wait_healthy
    from small4.server.serve import add_serve_arguments, build_from_args, make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", str(model_dir), "--port", str(port), "--served-model-name", "demo", "--no-web-ui"]
    parser = argparse.ArgumentParser(prog="small4 serve")
    add_serve_arguments(parser)
    args = parser.parse_args(argv[1:])
    app, ctx = build_from_args(args)
    server = make_server(app, ctx, "127.0.0.1", port, args.shutdown_timeout)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, alive=thread.is_alive, timeout_s=120)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def ask(client: Any, case: Case) -> dict[str, Any]:
    """One case as a greedy request; the reply as the client sees it."""
    r = client.chat.completions.create(model="demo", max_tokens=MAX_TOKENS, temperature=0, **case.request)
    choice = r.choices[0]
    msg = choice.message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    return {
        "content": msg.content,
        "reasoning": getattr(msg, "reasoning_content", None),
        "tool_calls": calls,
        "finish_reason": choice.finish_reason,
        "completion_tokens": r.usage.completion_tokens,
    }


def _prompt_text(case: Case) -> str:
    content = case.request["messages"][0]["content"]
    return content if isinstance(content, str) else "<image> " + content[-1]["text"]


def run_heldout(
    model_dir: Path, seed: int = 0, per_skill: int = 40, workers: int = 8, skills: tuple[str, ...] = SKILLS
) -> dict[str, Any]:
    """The held-out cases through a fresh in-process server on ``model_dir``; per-skill rates and samples."""
    import openai

    cases = heldout_cases(seed, per_skill, skills)
    start = time.monotonic()
    with serving(Path(model_dir)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        with ThreadPoolExecutor(workers) as pool:
            replies = list(pool.map(lambda c: ask(client, c), cases))
    results: dict[str, list[bool]] = defaultdict(list)
    samples: list[dict[str, Any]] = []
    for case, reply in zip(cases, replies, strict=True):
        checks = check(case, reply)
        for k, v in checks.items():
            results[k].append(bool(v))
        if sum(s["skill"] == case.skill for s in samples) < 2:
            samples.append({"skill": case.skill, "prompt": _prompt_text(case), "reply": reply, "checks": checks})
    return {
        "generator": GENERATOR,
        "seed": seed,
        "per_skill": per_skill,
        "max_tokens": MAX_TOKENS,
        "rates": {k: round(sum(v) / len(v), 3) for k, v in sorted(results.items())},
        "n": {k: len(v) for k, v in sorted(results.items())},
        "wall_s": round(time.monotonic() - start, 1),
        "samples": samples,
    }


def record(model_dir: Path, result: dict[str, Any]) -> Path:
    """Puts ``result`` under ``heldout_v2`` in the checkpoint's ``training_log.json`` (created if missing)."""
    path = Path(model_dir) / "training_log.json"
    log = json.loads(path.read_text()) if path.is_file() else {}
    log["heldout_v2"] = result
    path.write_text(json.dumps(log, indent=2, ensure_ascii=False))
    return path


def main(args: argparse.Namespace) -> int:
    from small4.weights.embedded import embedded_model_dir

    model_dir = Path(args.model or embedded_model_dir())
    result = run_heldout(model_dir, seed=args.seed, per_skill=args.per_skill)
    for skill, rate in result["rates"].items():
        print(f"  {skill:20s} {rate:.3f}  (n={result['n'][skill]})")
    if not args.no_write:
        print(f"wrote heldout_v2 into {record(model_dir, result)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-demo", help="held-out evaluation of a demo checkpoint through the real server")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--seed", type=int, default=0, help="held-out draw (training never sees any of them)")
    p.add_argument("--per-skill", type=int, default=40)
    p.add_argument("--no-write", action="store_true", help="print only; leave training_log.json alone")
    p.set_defaults(func=main)
