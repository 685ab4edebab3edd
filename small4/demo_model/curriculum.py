"""The demo model's curriculum: small chat tasks, rendered exactly as the server renders requests.

Every example is an OpenAI-shaped request (messages, tools, reasoning effort) plus the assistant turn the model
should answer with. The prompt tokens are ``ChatRenderer.render(...)``, the very ids the server feeds the engine;
the target tokens are mistral-common's own encoding of the assistant turn at the end of a conversation
(``InstructTokenizer.encode_assistant_message``: ``[THINK]trace[/THINK]`` when there is reasoning, the text, the
``[TOOL_CALLS]name[ARGS]{json}`` calls, then EOS). The loss mask is 1 exactly on the target tokens.

Tasks (``TASKS``):

* ``add`` / ``sub`` / ``order``: 1-2 digit arithmetic and ordering three numbers, with reasoning effort "none"
  (answer only) or "high" (a short digit-by-digit ``[THINK]`` trace first);
* ``tool_call``: a ``calculator`` and a ``get_weather`` tool are offered and the question needs one of them: the
  target is the call; ``tool_answer``: the call and its result are in the history and the target answer uses it;
* ``vision``: a generated 56x56 image (a coloured circle, square or triangle on white) as a data URL; the target
  names colour and shape;
* ``chat``: greetings and a few short factual templates (sometimes with the tools offered but not needed);
* ``echo``: "repeat after me" with random numbers and words: the copying skill that arithmetic, ordering and tool
  arguments all need, taught on its own.

Everything is deterministic given the seed.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mistral_common.protocol.instruct.messages import AssistantMessage
from PIL import Image, ImageDraw

from small4.chat.render import ChatRenderer

TASKS = ("add", "sub", "order", "tool_call", "tool_answer", "vision", "chat", "echo")
TASK_WEIGHTS = {"add": 3, "sub": 3, "order": 2, "tool_call": 3, "tool_answer": 3, "vision": 4, "chat": 2, "echo": 2}

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS = [CALCULATOR, GET_WEATHER]

CITIES = ("Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Lisbon", "Vienna", "Oslo", "Cairo", "Lima", "Seoul")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (20, 40, 220),
    "yellow": (240, 210, 0),
    "purple": (140, 30, 170),
    "orange": (250, 130, 0),
}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 56
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Egypt": "Cairo",
    "Peru": "Lima",
}
GREETINGS = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi", "Hello! How can I help you today?"),
    ("Hey there!", "Hello! How can I help you today?"),
    ("Who are you?", "I am small4, a tiny demo model of Mistral Small 4."),
    ("What is your name?", "I am small4, a tiny demo model of Mistral Small 4."),
    ("Thank you!", "You are welcome!"),
    ("Thanks a lot.", "You are welcome!"),
    ("Goodbye!", "Goodbye! Have a nice day."),
)
FACTS = (
    ("What colour is the sky?", "The sky is blue."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many legs does a cat have?", "A cat has 4 legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
)


@dataclass(frozen=True)
class Example:
    """One request and its expected assistant turn (OpenAI shapes) plus what evaluation checks."""

    task: str
    messages: list[dict[str, Any]]
    assistant: dict[str, Any]
    reasoning_effort: str = "none"
    tools: list[dict[str, Any]] | None = None
    expected: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedExample:
    """Prompt + target token ids; ``mask[i]`` is 1 exactly on the assistant's tokens (target incl. EOS)."""

    example: Example
    tokens: list[int]
    mask: list[int]
    prompt_len: int
    images: list[Any]  # mistral-common image arrays [C, H, W], in [IMG]-slot order
    labels: list[int] | None = None  # explicit per-position targets (-100: none); the copy drills' (copy_drill.py)

    @property
    def prompt(self) -> list[int]:
        return self.tokens[: self.prompt_len]

    @property
    def target(self) -> list[int]:
        return self.tokens[self.prompt_len :]


def pack_until(draw: Callable[[], EncodedExample], token_budget: int) -> list[EncodedExample]:
    """Examples from ``draw`` until the next would take the packed batch past ``token_budget`` (at least one)."""
    batch: list[EncodedExample] = []
    total = 0
    while True:
        enc = draw()
        if batch and total + len(enc.tokens) > token_budget:
            return batch
        batch.append(enc)
        total += len(enc.tokens)


def encode_example(renderer: ChatRenderer, example: Example) -> EncodedExample:
    """Prompt as the server renders it, target as mistral-common encodes a final assistant turn."""
    rendered = renderer.render(example.messages, tools=example.tools, reasoning_effort=example.reasoning_effort)
    instruct = renderer.tokenizer.instruct_tokenizer
    target = instruct.encode_assistant_message(
        AssistantMessage.from_openai(example.assistant), is_before_last_user_message=False
    )
    tokens = list(rendered.token_ids) + list(target)
    mask = [0] * len(rendered.token_ids) + [1] * len(target)
    return EncodedExample(example, tokens, mask, len(rendered.token_ids), list(rendered.images))


# -- generators -------------------------------------------------------------------------------------------


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))


def _effort(rng: random.Random) -> str:
    return "high" if rng.random() < 0.5 else "none"


def _digits(n: int) -> tuple[int, int]:
    return n // 10, n % 10


def add_trace(a: int, b: int) -> str:
    (a1, a0), (b1, b0) = _digits(a), _digits(b)
    units = a0 + b0
    carry = units // 10
    head = f"Units: {a0} + {b0} = {units}"
    head += f", write {units % 10} carry 1." if carry else "."
    tens = a1 + b1 + carry
    tail = f" Tens: {a1} + {b1} + 1 = {tens}." if carry else f" Tens: {a1} + {b1} = {tens}."
    return head + tail + f" So {a + b}."


def sub_trace(a: int, b: int) -> str:
    (a1, a0), (b1, b0) = _digits(a), _digits(b)
    if a0 >= b0:
        head = f"Units: {a0} - {b0} = {a0 - b0}. Tens: {a1} - {b1} = {a1 - b1}."
    else:
        head = f"Units: borrow, {a0 + 10} - {b0} = {a0 + 10 - b0}. Tens: {a1} - 1 - {b1} = {a1 - 1 - b1}."
    return head + f" So {a - b}."


def _with_effort(task: str, question: str, answer: str, trace: str, rng: random.Random) -> Example:
    """A reasoning task: the answer alone with effort "none", the trace then the answer with "high"."""
    effort = _effort(rng)
    assistant: dict[str, Any] = {"role": "assistant", "content": answer}
    if effort == "high":
        assistant["reasoning_content"] = trace
    return Example(task, [{"role": "user", "content": question}], assistant, effort, expected={"answer": answer})


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    while a + b > 99 and rng.random() < 0.5:
        a, b = rng.randint(0, 60), rng.randint(0, 39)
    q = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?")).format(a=a, b=b)
    return _with_effort("add", q, f"{a} + {b} = {a + b}.", add_trace(a, b), rng)


def _sub(rng: random.Random) -> Example:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    q = rng.choice(("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?")).format(a=a, b=b)
    return _with_effort("sub", q, f"{a} - {b} = {a - b}.", sub_trace(a, b), rng)


def _order(rng: random.Random) -> Example:
    nums = rng.sample(range(100), 3)
    q = rng.choice(("Sort from smallest to largest: {}.", "Order these numbers: {}.")).format(", ".join(map(str, nums)))
    s = sorted(nums)
    trace = f"The smallest is {s[0]}, the largest is {s[2]}, so {s[1]} is in the middle."
    return _with_effort("order", q, f"{s[0]}, {s[1]}, {s[2]}.", trace, rng)


def _expression(rng: random.Random) -> str:
    op = rng.choice(("+", "-", "*", "/"))
    return f"{rng.randint(10, 999)} {op} {rng.randint(2, 99)}"


def _calc_result(expr: str) -> str:
    a, op, b = expr.split()
    x, y = int(a), int(b)
    value = {"+": x + y, "-": x - y, "*": x * y, "/": round(x / y, 2)}[op]
    return str(value)


def _tool_request(rng: random.Random) -> tuple[str, str, dict[str, str]]:
    if rng.random() < 0.5:
        city = rng.choice(CITIES)
        q = rng.choice(("What is the weather in {c}?", "Weather in {c}?", "Is it sunny in {c} today?")).format(c=city)
        return q, "get_weather", {"city": city}
    expr = _expression(rng)
    q = rng.choice(("Use the calculator to compute {e}.", "What is {e}? Use the calculator.", "Calculate {e}.")).format(
        e=expr
    )
    return q, "calculator", {"expression": expr}


def _tool_call(rng: random.Random) -> Example:
    q, name, args = _tool_request(rng)
    call = {"id": _call_id(rng), "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    effort = "high" if rng.random() < 0.25 else "none"
    assistant: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
    if effort == "high":
        assistant["reasoning_content"] = f"I should call {name}."
    return Example(
        "tool_call", [{"role": "user", "content": q}], assistant, effort, TOOLS, {"name": name, "arguments": args}
    )


def _tool_answer(rng: random.Random) -> Example:
    q, name, args = _tool_request(rng)
    call_id = _call_id(rng)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    if name == "get_weather":
        cond, temp = rng.choice(CONDITIONS), rng.randint(-5, 35)
        result = json.dumps({"city": args["city"], "condition": cond, "temperature_c": temp})
        answer = f"It is {cond} and {temp}°C in {args['city']}."
        uses = [cond, f"{temp}°C", args["city"]]
    else:
        value = _calc_result(args["expression"])
        result = value
        answer = f"{args['expression']} = {value}."
        uses = [value]
    messages = [
        {"role": "user", "content": q},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]
    assistant = {"role": "assistant", "content": answer}
    return Example("tool_answer", messages, assistant, "none", TOOLS, {"answer": answer, "uses": uses})


def shape_image(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A ``colour`` ``shape`` on white, with a random size and position (so held-out images are unseen)."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 2 - 4)
    cx, cy = rng.randint(r + 2, size - r - 2), rng.randint(r + 2, size - r - 2)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=fill)
    return img


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _vision(rng: random.Random) -> Example:
    colour, shape = rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
    url = data_url(shape_image(colour, shape, rng))
    q = rng.choice(("What is in this image?", "Describe the image.", "What do you see?"))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
    answer = f"A {colour} {shape}."
    return Example(
        "vision",
        [{"role": "user", "content": content}],
        {"role": "assistant", "content": answer},
        expected={"answer": answer, "colour": colour, "shape": shape},
    )


def _chat(rng: random.Random) -> Example:
    kind = rng.random()
    if kind < 0.4:
        q, answer = rng.choice(GREETINGS)
    elif kind < 0.8:
        country = rng.choice(tuple(CAPITALS))
        q = rng.choice(("What is the capital of {c}?", "Capital of {c}?")).format(c=country)
        answer = f"The capital of {country} is {CAPITALS[country]}."
    else:
        q, answer = rng.choice(FACTS)
    tools = TOOLS if rng.random() < 0.25 else None
    return Example(
        "chat",
        [{"role": "user", "content": q}],
        {"role": "assistant", "content": answer},
        tools=tools,
        expected={"answer": answer},
    )


def _echo(rng: random.Random) -> Example:
    words = (*CITIES, *COLOURS, *SHAPES, *CONDITIONS)
    items = [str(rng.randint(0, 999)) if rng.random() < 0.5 else rng.choice(words) for _ in range(rng.randint(1, 4))]
    phrase = " ".join(items)
    q = rng.choice(("Repeat after me: {p}", "Say this back: {p}", "Echo: {p}")).format(p=phrase)
    return Example(
        "echo", [{"role": "user", "content": q}], {"role": "assistant", "content": phrase}, expected={"answer": phrase}
    )


_GENERATORS = {
    "add": _add,
    "sub": _sub,
    "order": _order,
    "tool_call": _tool_call,
    "tool_answer": _tool_answer,
    "vision": _vision,
    "chat": _chat,
    "echo": _echo,
}


def make_example(task: str, rng: random.Random) -> Example:
    return _GENERATORS[task](rng)


def sample_examples(seed: int, n: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """``n`` examples, tasks drawn by ``TASK_WEIGHTS``; the same seed gives the same list."""
    rng = random.Random(seed)
    weights = [TASK_WEIGHTS[t] for t in tasks]
    return [make_example(rng.choices(tasks, weights)[0], rng) for _ in range(n)]


def eval_examples(seed: int, per_task: int) -> list[Example]:
    """``per_task`` examples of every task (and of both reasoning efforts for the arithmetic ones)."""
    rng = random.Random(seed)
    out: list[Example] = []
    for task in TASKS:
        if task in ("add", "sub", "order"):
            for effort in ("none", "high"):
                got = 0
                while got < per_task:
                    ex = make_example(task, rng)
                    if ex.reasoning_effort == effort:
                        out.append(ex)
                        got += 1
        else:
            out.extend(make_example(task, rng) for _ in range(per_task))
    return out
