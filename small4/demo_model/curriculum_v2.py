"""The demo model's v2 curriculum: skills that transfer (copying, structure, carries), not templates to recall.

Issue 17 showed the v1 curriculum (``curriculum.py``: two fixed tools, a few templates) taught its templates: an
unseen tool got a v1 tool's arguments, "12 + 7" got a memorised sum, "Hello!" under ``reasoning_effort="high"``
got an arithmetic trace. Here every task is built from parts so the only thing that stays fixed is the skill:

* ``add`` / ``sub``: operands 0-99, mostly two-digit with a forced carry / borrow, a dozen phrasings; effort
  "none" answers ``a + b = c.``, "high" first writes the digit-by-digit trace (``add_trace`` / ``sub_trace``:
  units, carry or borrow, tens);
* ``tool_call``: 1-4 random tools (random names: verb_noun, camelCase or pseudo-words; 1-4 parameters of type
  string, integer, number, boolean or enum; descriptions), the user names one tool and gives its arguments in
  one of several key/value spellings (booleans derived from yes/no/on/off); the target is the call, arguments
  copied in schema order; sometimes under high effort with a one-line trace;
* ``tool_answer``: a round trip (call, then a result object or scalar) and the answer that reads the result's
  values back; a third of them are multi-turn (an earlier finished round trip before the new question);
* ``json``: a random object schema and the user's key/value pairs; the target is exactly the JSON text the
  server's grammar emits (``", "`` / ``": "``), so an answer closes its strings and ends;
* ``chat``: greetings, capitals and a few facts, half under high effort with a short trace about the question
  itself (not arithmetic), a quarter with unneeded tools offered;
* ``vision``: one shape (colour and shape questions) or 1-4 shapes to count;
* ``echo``: repeat words and numbers back (the bare copying skill);
* ``v1_tool_call`` / ``v1_tool_answer``: v1's two tools, kept at a low weight so ``small4 demo``'s weather and
  calculator requests keep working (neither tool nor any of its cities is in the held-out pools).

Nothing here is drawn from the held-out pools (``split``): pairs and numbers are redrawn, pseudo-words refused.
Prompts go through ``curriculum.encode_example`` (the server's ``ChatRenderer``), exactly like v1; ``Example``,
``encode_example``, ``data_url`` and ``shape_image`` are v1's, unchanged.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw

from small4.demo_model import split
from small4.demo_model.curriculum import (
    CAPITALS,
    COLOURS,
    FACTS,
    GREETINGS,
    IMAGE_SIZE,
    SHAPES,
    TOOLS,
    Example,
    _call_id,
    add_trace,
    data_url,
    shape_image,
    sub_trace,
)
from small4.demo_model.curriculum import make_example as v1_make_example

TASKS = ("add", "sub", "tool_call", "tool_answer", "json", "chat", "vision", "echo", "v1_tool_call", "v1_tool_answer")
TASK_WEIGHTS = {
    "add": 3, "sub": 3, "tool_call": 5, "tool_answer": 3, "json": 2, "chat": 3, "vision": 5, "echo": 1,
    "v1_tool_call": 2, "v1_tool_answer": 2,
}  # fmt: skip

ADD_TEMPLATES = (
    "What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "What is {a} plus {b}?", "Add {a} and {b}.",
    "Find the sum of {a} and {b}.", "Work out {a} + {b}.", "{a} plus {b}?", "Tell me {a} + {b}.", "Solve {a} + {b}.",
    "what is {a}+{b}", "Calculate {a} + {b}.",
)  # fmt: skip
SUB_TEMPLATES = (
    "What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?", "What is {a} minus {b}?",
    "Subtract {b} from {a}.", "Find the difference of {a} and {b}.", "Work out {a} - {b}.", "{a} minus {b}?",
    "Tell me {a} - {b}.", "Solve {a} - {b}.", "what is {a}-{b}", "Calculate {a} - {b}.",
)  # fmt: skip
TRAIN_GREETINGS = (
    *GREETINGS,
    ("Hello", "Hello! How can I help you today?"),
    ("Hi!", "Hello! How can I help you today?"),
    ("Hey", "Hello! How can I help you today?"),
    ("Good evening.", "Hello! How can I help you today?"),
    ("Hello, are you there?", "Hello! How can I help you today?"),
    ("What are you?", "I am small4, a tiny demo model of Mistral Small 4."),
    ("Bye!", "Goodbye! Have a nice day."),
)
CAPITAL_TEMPLATES = ("What is the capital of {c}?", "Capital of {c}?", "What's the capital city of {c}?")
GREETING_TRACES = ("The user greets me, so I greet back.", "A greeting: answer politely.", "This is small talk.")
TOOL_TEMPLATES = (
    "Use {name} with {kvs}.", "Call {name}: {kvs}.", "Run {name} for {kvs}.", "{name} with {kvs}, please.",
    "I want to use {name}. {kvs}.", "Use the {name} tool: {kvs}.", "Call {name} with {kvs}.",
    "Can you call {name}? {kvs}.", "Please use {name}, {kvs}.", "{name}: {kvs}", "Run the {name} function with {kvs}.",
    "Invoke {name} with {kvs}.", "Execute {name}: {kvs}.", "I need you to call {name} with {kvs}.",
    "Would you use {name}? Pass {kvs}.", "Call the {name} tool using {kvs}.", "Please run {name}. {kvs}.",
    "Use {name} now, {kvs}.", "Trigger {name} for {kvs}.",
)  # fmt: skip
NATURAL_TOOL_TEMPLATES = ("{Verb} the {noun} with {kvs}.", "Please {verb} the {noun}: {kvs}.", "{Verb} {noun}, {kvs}.")
KV_FORMS = (
    "{p} {v}", "{p}={v}", "{p}: {v}", "{p} is {v}", "the {p} {v}", "{p} should be {v}", "{p} equal to {v}",
    "with {p} {v}", "{p} -> {v}", "{p} being {v}", "{p} of {v}", "{p} to {v}", "{p} := {v}", "{p} => {v}",
    "{p} value {v}", "use {v} for {p}", "{v} for {p}", "{p} was {v}",
)  # fmt: skip
JSON_TEMPLATES = (
    "Reply in JSON with {kvs}.", "Give me a JSON object: {kvs}.", "Return JSON where {kvs}.", "As JSON: {kvs}.",
    "JSON please, {kvs}.", "Output a JSON object with {kvs}.", "Write {kvs} as JSON.",
)  # fmt: skip
RESULT_KEYS = ("result", "status", "total", "value", "message", "count", "temperature", "answer")
BOOL_WORDS = {"yes": True, "no": False, "true": True, "false": False, "on": True, "off": False}
COUNT_WORDS = {1: "1 shape", 2: "2 shapes", 3: "3 shapes", 4: "4 shapes"}
# Image questions, many phrasings per kind (session 8's runs, trained on two or three each, answered held-out
# wordings with junk: "A squarewn h }"); the held-out wordings (heldout.DESCRIBE, ...) stay out, by test.
DESCRIBE_QUESTIONS = (
    "What is in this image?", "Describe the image.", "What do you see?", "What does the picture show?",
    "Describe this picture.", "What is shown here?", "Tell me about the image.", "What is in the picture?",
    "Describe what you see.", "What does this image contain?", "What is on the image?", "Explain the picture.",
    "Say what the image shows.", "What can you see in this picture?", "Describe it.", "What is this?",
)  # fmt: skip
COLOUR_QUESTIONS = (
    "What colour is the shape?", "Which colour is it?", "What colour is it?", "Tell me the colour.",
    "What is the colour of the shape?", "Which colour is the shape?", "What colour is drawn?", "Colour?",
    "Say the colour of the shape.", "What colour does the shape have?", "Which colour do you see?",
    "What is its colour?", "Tell me its colour.", "Which colour is shown?",
)  # fmt: skip
SHAPE_QUESTIONS = (
    "What shape is this?", "Which shape is it?", "What shape is shown?", "Tell me the shape.", "What is the shape?",
    "Which shape do you see?", "Shape?", "Identify the shape.", "What shape is drawn here?", "Say the shape.",
    "Which shape is drawn?", "What shape do you see?", "What kind of shape is it?", "Tell me which shape it is.",
)  # fmt: skip
COUNT_QUESTIONS = (
    "How many shapes are in the image?", "Count the shapes.", "How many shapes?", "How many objects are there?",
    "Count the objects in the picture.", "How many items do you see?", "What is the count of shapes?",
    "Number of shapes?", "How many shapes can you see?", "How many things are drawn?", "Count them.",
    "How many shapes are drawn?", "Tell me how many shapes there are.",
)  # fmt: skip


# -- arithmetic -----------------------------------------------------------------------------------------------


def _operands(rng: random.Random, sub: bool) -> tuple[int, int]:
    """Two operands, not a held-out pair; mostly two-digit with a carry (add) or a borrow (sub)."""
    while True:
        if rng.random() < 0.65:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if sub:
                a, b = max(a, b), min(a, b)
                if rng.random() < 0.6 and a % 10 >= b % 10:
                    continue  # want a borrow
            elif rng.random() < 0.6 and a % 10 + b % 10 < 10:
                continue  # want a carry
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if sub:
                a, b = max(a, b), min(a, b)
        if not split.heldout_pair(a, b):
            return a, b


def _effort(rng: random.Random, p_high: float = 0.5) -> str:
    return "high" if rng.random() < p_high else "none"


def _arith(task: str, rng: random.Random) -> Example:
    a, b = _operands(rng, task == "sub")
    sign, value, trace = ("-", a - b, sub_trace(a, b)) if task == "sub" else ("+", a + b, add_trace(a, b))
    q = rng.choice(SUB_TEMPLATES if task == "sub" else ADD_TEMPLATES).format(a=a, b=b)
    answer = f"{a} {sign} {b} = {value}."
    effort = _effort(rng)
    assistant: dict[str, Any] = {"role": "assistant", "content": answer}
    if effort == "high":
        assistant["reasoning_content"] = trace
    expected = {"answer": answer, "value": value, "pair": (a, b)}
    messages = [{"role": "user", "content": q}]
    if rng.random() < 0.15:
        messages = earlier_turn(rng) + messages
    return Example(task, messages, assistant, effort, expected=expected)


# -- random tools ---------------------------------------------------------------------------------------------


def pseudo_word(rng: random.Random) -> str:
    while True:
        word = "".join(rng.choice(split.SYLLABLES) for _ in range(rng.randint(2, 3)))
        if split.is_training_word(word):
            return word


def _tool_name(rng: random.Random) -> tuple[str, str | None, str | None]:
    """A name and, when it has them, its verb and noun (for natural phrasing)."""
    verb, noun = rng.choice(split.TRAIN_VERBS), rng.choice(split.TRAIN_NOUNS)
    kind = rng.random()
    if kind < 0.5:
        return f"{verb}_{noun}", verb, noun
    if kind < 0.7:
        return f"{verb}{noun.capitalize()}", verb, noun
    if kind < 0.85:
        return f"{pseudo_word(rng)}_{noun}", None, None
    return pseudo_word(rng), None, None


def param_name(rng: random.Random) -> str:
    """A parameter (or JSON key, or result key) name: mostly the training pool, else composed from it
    (``book_id``, ``songTitle``) or a pseudo-word. D1, trained on the pool alone, copied values for its 25 names
    and guessed for unseen ones: the key a value belongs to must be read from the prompt, not recalled."""
    kind = rng.random()
    if kind < 0.6:
        return rng.choice(split.TRAIN_PARAMS)
    if kind < 0.85:
        noun, param = rng.choice(split.TRAIN_NOUNS), rng.choice(split.TRAIN_PARAMS)
        return f"{noun}_{param}" if rng.random() < 0.6 else f"{noun}{param.capitalize()}"
    return pseudo_word(rng)


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    """``n`` different values of ``draw()``, in the order first drawn."""
    values: list[str] = []
    while len(values) < n:
        v = draw()
        if v not in values:
            values.append(v)
    return values


def param_names(rng: random.Random, n: int) -> list[str]:
    return _distinct(lambda: param_name(rng), n)


def code_word(rng: random.Random) -> str:
    """An upper-case code of 3-4 letters with a vowel (held-out symbols have none; its currencies are refused)."""
    while True:
        code = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 4)))
        if set(code) & set("AEIOU") and split.is_training_word(code):
            return code


def enum_values(rng: random.Random) -> list[str]:
    """Half the time a fixed training enum, else 2-4 values of one random kind: an enum answer is copied from
    the prompt (D1, trained on four fixed enums, answered "currency as USD" with "GBP")."""
    if rng.random() < 0.5:
        return list(rng.choice(split.TRAIN_ENUMS))
    draw = rng.choice((lambda: rng.choice(split.TRAIN_VALUES), lambda: pseudo_word(rng), lambda: code_word(rng)))
    return _distinct(draw, rng.randint(2, 4))


def _param_schema(rng: random.Random) -> dict[str, Any]:
    kind = rng.choices(("string", "integer", "number", "boolean", "enum"), (40, 25, 10, 10, 15))[0]
    if kind == "enum":
        return {"type": "string", "enum": enum_values(rng)}
    return {"type": kind}


def random_tool(rng: random.Random, taken: set[str]) -> tuple[dict[str, Any], str | None, str | None]:
    """An OpenAI tool with 1-4 random parameters (all of a random subset required); its verb and noun."""
    while True:
        name, verb, noun = _tool_name(rng)
        if name not in taken:
            break
    params = param_names(rng, rng.choices((1, 2, 3, 4), (30, 35, 25, 10))[0])
    props = {p: _param_schema(rng) for p in params}
    for p, schema in props.items():
        if rng.random() < 0.3:
            schema["description"] = f"The {p}"
    required = [p for p in params if rng.random() < 0.8] or [params[0]]
    what = noun or rng.choice(split.TRAIN_NOUNS)
    description = rng.choice(("{V} the {n}", "{V} a {n} by {p}", "Look up a {n}", "Returns the {n}")).format(
        V=(verb or "get").capitalize(), n=what, p=params[0]
    )
    tool = {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }
    return tool, verb, noun


def _random_tools(rng: random.Random, n: int) -> list[dict[str, Any]]:
    taken: set[str] = set()
    tools = []
    for _ in range(n):
        tools.append(random_tool(rng, taken)[0])
        taken.add(tools[-1]["function"]["name"])
    return tools


def training_int(rng: random.Random) -> int:
    while True:
        n = rng.randint(0, 10 ** rng.randint(1, 4) - 1)
        if not split.heldout_number(n):
            return n


def _string_value(rng: random.Random) -> str:
    """A string argument: pool words, pseudo-words, two words, an e-mail address, a code (the kinds a user
    writes; every one copied token by token, none recalled)."""
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(split.TRAIN_VALUES)
    if kind < 0.65:
        return pseudo_word(rng).capitalize() if rng.random() < 0.5 else pseudo_word(rng)
    if kind < 0.75:
        return f"{rng.choice(split.TRAIN_VALUES).lower()} {pseudo_word(rng)}"
    if kind < 0.85:
        first, second = rng.sample(split.TRAIN_VALUES, 2)
        return f"{first.lower()} {second.lower()}"
    if kind < 0.93:
        return f"{rng.choice(split.TRAIN_VALUES).lower()}@{pseudo_word(rng)}.{rng.choice(('com', 'net', 'io'))}"
    return code_word(rng)


def _value(rng: random.Random, schema: dict[str, Any]) -> tuple[Any, str]:
    """A JSON value of the schema's type and how the user writes it."""
    if "enum" in schema:
        v = rng.choice(schema["enum"])
        return v, v
    kind = schema["type"]
    if kind == "integer":
        n = training_int(rng)
        return n, str(n)
    if kind == "number":
        if rng.random() < 0.35:  # a whole number is a number too (held-out amounts are)
            n = training_int(rng)
            return n, str(n)
        x = training_int(rng) % 1000 + rng.choice((0.5, 0.25, 0.75, 0.1))
        return x, str(x)
    if kind == "boolean":
        word = rng.choice(tuple(BOOL_WORDS))
        return BOOL_WORDS[word], word
    v = _string_value(rng)
    return v, v


def _kvs(rng: random.Random, pairs: list[tuple[str, str]]) -> str:
    form = rng.choice(KV_FORMS)
    parts = [form.format(p=p, v=v) for p, v in pairs]
    if len(parts) > 1 and rng.random() < 0.5:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def _call_args(rng: random.Random, tool: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Arguments (schema order: the grammar's order) for the required parameters and some optional ones."""
    params = tool["function"]["parameters"]
    required = set(params["required"])
    args: dict[str, Any] = {}
    spoken: list[tuple[str, str]] = []
    for p, schema in params["properties"].items():
        if p in required or rng.random() < 0.4:
            args[p], text = _value(rng, schema)
            spoken.append((p, text))
    if rng.random() < 0.2:
        rng.shuffle(spoken)
    return args, spoken


def _tool_request(rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], str]:
    """Tools offered, the chosen one's call arguments and the user's request for it."""
    taken: set[str] = set()
    tools, words = [], []
    for _ in range(rng.choices((1, 2, 3, 4), (25, 30, 25, 20))[0]):
        tool, verb, noun = random_tool(rng, taken)
        taken.add(tool["function"]["name"])
        tools.append(tool)
        words.append((verb, noun))
    k = rng.randrange(len(tools))
    tool, (verb, noun) = tools[k], words[k]
    args, spoken = _call_args(rng, tool)
    kvs = _kvs(rng, spoken)
    unique = sum(n == noun for _, n in words) == 1  # "find the book" must point at one tool only
    if verb and noun and unique and rng.random() < 0.3:
        q = rng.choice(NATURAL_TOOL_TEMPLATES).format(Verb=verb.capitalize(), verb=verb, noun=noun, kvs=kvs)
    else:
        q = rng.choice(TOOL_TEMPLATES).format(name=tool["function"]["name"], kvs=kvs)
    return tools, tool, args, q


def _call(rng: random.Random, tool: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    fn = {"name": tool["function"]["name"], "arguments": json.dumps(args)}
    return {"id": _call_id(rng), "type": "function", "function": fn}


def _tool_call(rng: random.Random) -> Example:
    tools, tool, args, q = _tool_request(rng)
    name = tool["function"]["name"]
    effort = _effort(rng, 0.2)
    assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [_call(rng, tool, args)]}
    if effort == "high":
        assistant["reasoning_content"] = f"The user asks for {name}, so I call it."
    messages = [{"role": "user", "content": q}]
    if rng.random() < 0.25:
        messages = _finished_round_trip(rng, tools) + messages
    return Example("tool_call", messages, assistant, effort, tools, {"name": name, "arguments": args})


def _tool_result(rng: random.Random, args: dict[str, Any]) -> tuple[str, str, list[str]]:
    """A tool result (JSON text), the answer that reads it back, and the strings the answer must contain."""
    if rng.random() < 0.3:
        v = str(training_int(rng)) if rng.random() < 0.5 else _string_value(rng)
        return v, f"The result is {v}.", [v]
    keys = _result_keys(rng, rng.randint(1, 3))
    values = [training_int(rng) if rng.random() < 0.5 else _string_value(rng) for _ in keys]
    result = json.dumps(dict(zip(keys, values, strict=True)))
    answer = ", ".join(f"{k} is {v}" for k, v in zip(keys, values, strict=True))
    return result, answer[0].upper() + answer[1:] + ".", [str(v) for v in values]


def _result_keys(rng: random.Random, n: int) -> list[str]:
    """Result keys: the usual ones half the time, else any names (a result is read back whatever it calls its
    values)."""
    if rng.random() < 0.5:
        return rng.sample(RESULT_KEYS, n)
    return param_names(rng, n)


def _round_trip(rng: random.Random, tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, list[str]]:
    tool = rng.choice(tools)
    args, spoken = _call_args(rng, tool)
    q = rng.choice(TOOL_TEMPLATES).format(name=tool["function"]["name"], kvs=_kvs(rng, spoken))
    call = _call(rng, tool, args)
    result, answer, uses = _tool_result(rng, args)
    messages = [
        {"role": "user", "content": q},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": result},
    ]
    return messages, answer, uses


def _finished_round_trip(rng: random.Random, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages, answer, _ = _round_trip(rng, tools)
    return [*messages, {"role": "assistant", "content": answer}]


def _tool_answer(rng: random.Random) -> Example:
    tools, _, _, _ = _tool_request(rng)
    messages, answer, uses = _round_trip(rng, tools)
    if rng.random() < 0.33:
        messages = _finished_round_trip(rng, tools) + messages
    assistant = {"role": "assistant", "content": answer}
    return Example("tool_answer", messages, assistant, "none", tools, {"answer": answer, "uses": uses})


# -- JSON, chat, vision, echo ---------------------------------------------------------------------------------


def _json(rng: random.Random) -> Example:
    keys = param_names(rng, rng.choices((1, 2, 3), (35, 40, 25))[0])
    props = {k: _param_schema(rng) for k in keys}
    obj, spoken = {}, []
    for k, schema in props.items():
        obj[k], text = _value(rng, schema)
        spoken.append((k, text))
    schema = {"type": "object", "properties": props, "required": keys, "additionalProperties": False}
    q = rng.choice(JSON_TEMPLATES).format(kvs=_kvs(rng, spoken))
    assistant = {"role": "assistant", "content": json.dumps(obj)}
    return Example("json", [{"role": "user", "content": q}], assistant, expected={"schema": schema, "object": obj})


def _chat_turn(rng: random.Random) -> tuple[str, str, str]:
    """A greeting, capital or fact question, its answer and its short trace."""
    kind = rng.random()
    if kind < 0.4:
        q, answer = rng.choice(TRAIN_GREETINGS)
        return q, answer, rng.choice(GREETING_TRACES)
    if kind < 0.8:
        country = rng.choice(tuple(CAPITALS))
        q = rng.choice(CAPITAL_TEMPLATES).format(c=country)
        capital = CAPITALS[country]
        trace = f"The question is about {country}. Its capital is {capital}."
        return q, f"The capital of {country} is {capital}.", trace
    q, answer = rng.choice(FACTS)
    return q, answer, f"A simple fact: {answer}"


def earlier_turn(rng: random.Random) -> list[dict[str, Any]]:
    """A finished exchange (chat or a sum) to put before the question: the answer to the last question is what
    counts, whatever came before (D1 skipped its [THINK] in a second turn and wrote junk)."""
    if rng.random() < 0.5:
        q, answer, _ = _chat_turn(rng)
    else:
        a, b = _operands(rng, sub=False)
        q, answer = rng.choice(ADD_TEMPLATES).format(a=a, b=b), f"{a} + {b} = {a + b}."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def _chat(rng: random.Random) -> Example:
    q, answer, trace = _chat_turn(rng)
    effort = _effort(rng)
    assistant: dict[str, Any] = {"role": "assistant", "content": answer}
    if effort == "high":
        assistant["reasoning_content"] = trace
    tools = None
    if rng.random() < 0.3:  # tools on offer and none needed: answer in words (half of them the showcase tools)
        tools = showcase_tools(rng, []) if rng.random() < 0.5 else _random_tools(rng, rng.randint(1, 3))
    messages = [{"role": "user", "content": q}]
    if rng.random() < 0.25:
        messages = earlier_turn(rng) + messages
    return Example("chat", messages, assistant, effort, tools, {"answer": answer})


def count_image(colour: str, shape: str, n: int, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """``n`` (1-4) small shapes of one colour, one per quadrant (quadrants chosen at random)."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = size // 2
    for q in rng.sample(range(4), n):
        r = rng.randint(half // 4, half // 2 - 2)
        x0, y0 = (q % 2) * half, (q // 2) * half
        cx, cy = rng.randint(x0 + r + 1, x0 + half - r - 1), rng.randint(y0 + r + 1, y0 + half - r - 1)
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=fill)
    return img


def _image_message(img: Image.Image, q: str) -> list[dict[str, Any]]:
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": q}]
    return [{"role": "user", "content": content}]


def _vision(rng: random.Random) -> Example:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    if rng.random() < 0.3:
        n = rng.randint(1, 4)
        q = rng.choice(COUNT_QUESTIONS)
        answer = f"There {'is' if n == 1 else 'are'} {COUNT_WORDS[n]}."
        messages = _image_message(count_image(colour, shape, n, rng), q)
        return Example("vision", messages, {"role": "assistant", "content": answer}, expected={"count": n})
    kind = rng.random()
    if kind < 0.6:
        q, answer = rng.choice(DESCRIBE_QUESTIONS), None
    elif kind < 0.8:
        q, answer = rng.choice(COLOUR_QUESTIONS), f"It is {colour}."
    else:
        q, answer = rng.choice(SHAPE_QUESTIONS), f"It is a {shape}."
    answer = answer or f"A {colour} {shape}."
    messages = _image_message(shape_image(colour, shape, rng), q)
    expected = {"colour": colour, "shape": shape}
    return Example("vision", messages, {"role": "assistant", "content": answer}, expected=expected)


def _echo(rng: random.Random) -> Example:
    items = [str(training_int(rng)) if rng.random() < 0.5 else _string_value(rng) for _ in range(rng.randint(1, 4))]
    phrase = " ".join(items)
    q = rng.choice(("Repeat after me: {p}", "Say this back: {p}", "Echo: {p}", "Copy this: {p}")).format(p=phrase)
    assistant = {"role": "assistant", "content": phrase}
    return Example("echo", [{"role": "user", "content": q}], assistant, expected={"answer": phrase})


def _as_an_sdk_sends_it(rng: random.Random, tool: dict[str, Any]) -> dict[str, Any]:
    """``tool`` as a client library may serialise it: as written, or strict with ``additionalProperties: false``
    and pydantic's ``title`` on each parameter (the OpenAI Agents SDK's ``function_tool``)."""
    if rng.random() < 0.5:
        return tool
    fn = tool["function"]
    params = fn["parameters"]
    props = {k: {**v, "title": k.replace("_", " ").title()} for k, v in params["properties"].items()}
    strict = {**params, "properties": props, "additionalProperties": False}
    return {"type": "function", "function": {**fn, "parameters": strict, "strict": True}}


def showcase_tools(rng: random.Random, needed: list[str]) -> list[dict[str, Any]]:
    """v1's ``calculator`` / ``get_weather`` (what ``small4 demo``, the web UI and the README show) in a random
    subset and order that keeps the ``needed`` ones, sometimes beside random tools, each as an SDK may send it."""
    keep = [t for t in TOOLS if t["function"]["name"] in needed or rng.random() < 0.6] or [rng.choice(TOOLS)]
    if rng.random() < 0.25:
        keep += _random_tools(rng, rng.randint(1, 2))
    rng.shuffle(keep)
    return [_as_an_sdk_sends_it(rng, t) for t in keep]


def _v1_tools(task: str, rng: random.Random) -> Example:
    """v1's ``calculator`` / ``get_weather`` tasks, offered through ``showcase_tools``; redrawn while the
    conversation holds a held-out number of two or more digits."""
    while True:
        ex = v1_make_example(task, rng)
        text = " ".join(str(m.get("content")) for m in ex.messages)
        if not any(split.heldout_number(int(n)) for n in re.findall(r"\d+", text) if int(n) >= 10):
            tools = showcase_tools(rng, [_called(ex)])
            return Example(f"v1_{task}", ex.messages, ex.assistant, ex.reasoning_effort, tools, ex.expected)


def _called(ex: Example) -> str:
    """The tool an example calls: in its target (a tool call) or earlier in its conversation (a tool answer)."""
    return next(c["function"]["name"] for m in [*ex.messages, ex.assistant] for c in m.get("tool_calls") or [])


_GENERATORS = {
    "add": lambda rng: _arith("add", rng),
    "sub": lambda rng: _arith("sub", rng),
    "tool_call": _tool_call,
    "tool_answer": _tool_answer,
    "json": _json,
    "chat": _chat,
    "vision": _vision,
    "echo": _echo,
    "v1_tool_call": lambda rng: _v1_tools("tool_call", rng),
    "v1_tool_answer": lambda rng: _v1_tools("tool_answer", rng),
}


def make_example(task: str, rng: random.Random) -> Example:
    return _GENERATORS[task](rng)


def sample_examples(seed: int, n: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """``n`` examples, tasks drawn by ``TASK_WEIGHTS``; the same seed gives the same list."""
    rng = random.Random(seed)
    weights = [TASK_WEIGHTS[t] for t in tasks]
    return [make_example(rng.choices(tasks, weights)[0], rng) for _ in range(n)]
