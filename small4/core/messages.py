"""The typed messages between the API process and the engine core: small dataclasses <-> msgpack maps.

Every message is one msgpack map with ``v`` (``WIRE_VERSION``) and ``op``; ``decode`` checks both, every field's
presence and type, and rebuilds the dataclass, raising ``MessageError`` on anything else (never pickle: a peer
can send only data, never code). Requests carry token ids, ``SamplingParams`` (every dataclass field by name, so
a field added to ``SamplingParams`` crosses without an edit here), the grammar as its ``GrammarSpec`` (the lark
text; the core compiles it and builds the matcher) and images as raw bytes + dtype + shape. Outputs (and their
logprobs) are arrays in field order, the hot path's compact form. Outputs travel batched:
one ``StepBatch`` per loop iteration of the core (a step and the commands applied before it), holding every
request's deltas, the adds it accepted or refused, the step failures and the stats.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from small4.engine.async_engine import EngineStats
from small4.engine.multimodal import ImageInput
from small4.engine.outputs import RequestOutput
from small4.engine.sampler import TokenLogprobs
from small4.engine.sampling_params import SamplingParams
from small4.engine.token_mask import GrammarSpec

WIRE_VERSION = 1
# image dtypes that may cross (mistral-common gives float32 arrays); anything else is refused on receipt
_IMAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


class MessageError(ValueError):
    """A message that does not follow the schema: wrong version, unknown op, a missing or mistyped field."""


# ---- client -> core -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: GrammarSpec | None = None
    block_hash_extras: list[bytes | None] | None = None
    images: list[ImageInput] | None = None


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class AbortAll:
    pass


@dataclass(frozen=True)
class Stop:
    abort_all: bool = False


# ---- core -> client -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """Sent once the engine is built: what the server reads of it (``engine.engine.*`` in-process)."""

    pid: int
    max_model_len: int
    max_num_seqs: int
    max_cached_tokens: int


@dataclass(frozen=True)
class Rejection:
    request_id: str
    error: str  # "value": a ValueError (the server's 400); anything else: "runtime"
    message: str


@dataclass(frozen=True)
class StepFailure:
    request_ids: list[str]
    message: str


@dataclass(frozen=True)
class StepBatch:
    accepted: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[StepFailure] = field(default_factory=list)
    stats: EngineStats | None = None


@dataclass(frozen=True)
class CoreExit:
    """The core's last message: ``error`` None after a clean stop, else why its loop died."""

    error: str | None = None


Message = AddRequest | Abort | AbortAll | Stop | Ready | StepBatch | CoreExit
_OPS: dict[str, type] = {
    "add": AddRequest,
    "abort": Abort,
    "abort_all": AbortAll,
    "stop": Stop,
    "ready": Ready,
    "batch": StepBatch,
    "exit": CoreExit,
}
_OP_OF = {cls: op for op, cls in _OPS.items()}


def encode(msg: Message) -> bytes:
    import msgpack

    body = {"v": WIRE_VERSION, "op": _OP_OF[type(msg)], **_encoder(type(msg))(msg)}
    return msgpack.packb(body, use_bin_type=True, default=_default)


def decode(data: bytes) -> Message:
    """The message in ``data``; ``MessageError`` if it is not one of ours, whole and well typed."""
    import msgpack

    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for garbage
        raise MessageError(f"not a msgpack message: {e}") from None
    if not isinstance(raw, dict):
        raise MessageError("a message is a map")
    if raw.pop("v", None) != WIRE_VERSION:
        raise MessageError(f"wire version must be {WIRE_VERSION}")
    cls = _OPS.get(raw.pop("op", None))
    if cls is None:
        raise MessageError("unknown op")
    try:
        return _from_wire(cls, raw)
    except MessageError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise MessageError(f"bad {cls.__name__}: {e}") from None


# ---- dataclasses <-> plain maps -------------------------------------------------------------------------------
def _default(obj: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: a dataclass becomes its map (or array), one level deep
    (msgpack walks lists, tuples and maps in C and comes back here for nested dataclasses), an image its bytes."""
    kind = type(obj)
    if kind is ImageInput:
        return _image_to_wire(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _encoder(kind)(obj)
    raise TypeError(f"{kind.__name__} cannot cross the wire")


@functools.cache
def _encoder(cls: type) -> typing.Callable[[Any], Any]:
    """A dataclass's fields in one ``attrgetter`` call: a tuple (an array) or a map."""
    names = _names(cls)
    if not names:
        return lambda obj: () if cls in _ARRAY_LIKE else {}
    if len(names) == 1:
        return lambda obj: (getattr(obj, names[0]),) if cls in _ARRAY_LIKE else {names[0]: getattr(obj, names[0])}
    get = operator.attrgetter(*names)
    if cls in _ARRAY_LIKE:
        return get
    return lambda obj: dict(zip(names, get(obj), strict=True))


# Sent by the hundred per step: arrays in field order (vLLM's array_like structs), not maps. Both ends run the same
# dataclass, so a field added to it crosses without an edit; WIRE_VERSION guards against a mismatched peer.
_ARRAY_LIKE = frozenset({RequestOutput, TokenLogprobs})


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _from_wire(cls: type, raw: Any) -> Any:
    """Rebuild dataclass ``cls`` from a map (an array for ``_ARRAY_LIKE``), checking each value against the field's
    type hint."""
    if cls in _ARRAY_LIKE:
        checks, _ = _schema(cls)
        if type(raw) is not list or len(raw) != len(checks):
            raise MessageError(f"{cls.__name__} must be a list of its {len(checks)} fields")
        return cls(*[check(v, where) for (_, where, check), v in zip(checks, raw, strict=True)])
    if type(raw) is not dict:
        raise MessageError(f"{cls.__name__} must be a map")
    checks, names = _schema(cls)
    if not raw.keys() <= names:
        raise MessageError(f"{cls.__name__} has unknown fields {sorted(set(raw) - names)}")
    return cls(**{name: check(raw[name], where) for name, where, check in checks if name in raw})


@functools.cache
def _schema(cls: type) -> tuple[tuple[tuple[str, str, Any], ...], frozenset[str]]:
    """Per field of a dataclass: its name, where to say an error is, and its value checker; built once per class
    (``get_type_hints`` evaluates the annotations, the checkers are closures per hint)."""
    hints = typing.get_type_hints(cls)
    checks = tuple((name, f"{cls.__name__}.{name}", _checker(hints[name])) for name in _names(cls))
    return checks, frozenset(_names(cls))


Checker = typing.Callable[[Any, str], Any]


@functools.cache
def _checker(hint: Any) -> Checker:
    """A function ``(value, where) -> value`` converted to ``hint`` (lists to tuples, maps to dataclasses) that
    raises ``MessageError`` for a value of another shape."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda v, where: v
    if origin in (typing.Union, types.UnionType):
        return _union_checker(args)
    if hint is ImageInput:
        return _image_from_wire
    if dataclasses.is_dataclass(hint):
        return lambda v, where: _from_wire(hint, v)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return _sequence_checker(_checker(args[0]) if args else None, args[0] if args else None, origin)
    if origin is tuple:
        items = [_checker(a) for a in args]

        def fixed(v: Any, where: str) -> tuple:
            if type(v) is not list or len(v) != len(items):
                raise MessageError(f"{where} must be a list of {len(items)} items")
            return tuple(c(x, where) for c, x in zip(items, v, strict=True))

        return fixed
    if origin is dict:
        key, value = (_checker(a) for a in (args or (Any, Any)))

        def mapping(v: Any, where: str) -> dict:
            if type(v) is not dict:
                raise MessageError(f"{where} must be a map")
            return {key(k, where): value(x, where) for k, x in v.items()}

        return mapping
    return _scalar_checker(hint)


def _union_checker(args: tuple[Any, ...]) -> Checker:
    optional = type(None) in args
    arms = [_checker(a) for a in args if a is not type(None)]

    def union(v: Any, where: str) -> Any:
        if v is None and optional:
            return None
        errors = []
        for arm in arms:
            try:
                return arm(v, where)
            except MessageError as e:
                errors.append(str(e))
        raise MessageError("; ".join(errors) or f"{where} may not be None")

    return union


def _sequence_checker(item: Checker | None, item_hint: Any, origin: Any) -> Checker:
    exact = item_hint if item_hint in (int, str) else None  # the hot cases (token ids): one type test per item

    def sequence(v: Any, where: str) -> Any:
        if type(v) is not list:
            raise MessageError(f"{where} must be a list")
        if exact is not None:
            if not all(type(x) is exact for x in v):
                raise MessageError(f"{where} items must be {exact.__name__}")
            out = v
        else:
            out = v if item is None else [item(x, where) for x in v]
        return tuple(out) if origin is tuple else out

    return sequence


def _scalar_checker(hint: Any) -> Checker:
    if hint is float:

        def number(v: Any, where: str) -> float:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise MessageError(f"{where} must be float, not {type(v).__name__}")

        return number
    if typing.get_origin(hint) is typing.Literal:
        allowed = typing.get_args(hint)

        def literal(v: Any, where: str) -> Any:
            if v not in allowed:
                raise MessageError(f"{where} must be one of {list(allowed)}")
            return v

        return literal
    if not isinstance(hint, type):  # a hint this schema does not know: the dataclass's own validation decides
        return lambda v, where: v

    def exact(v: Any, where: str) -> Any:
        if type(v) is not hint:  # bool is not an int here, an int not a bool
            raise MessageError(f"{where} must be {hint.__name__}, not {type(v).__name__}")
        return v

    return exact


def _image_to_wire(image: ImageInput) -> dict[str, Any]:
    pixels = image.pixels if isinstance(image.pixels, torch.Tensor) else torch.from_numpy(np.asarray(image.pixels))
    pixels = pixels.detach().cpu().contiguous()
    dtype = str(pixels.dtype).removeprefix("torch.")
    data = pixels.view(torch.uint8).numpy().tobytes() if pixels.numel() else b""
    return {"data": data, "dtype": dtype, "shape": list(pixels.shape), "content_hash": image.content_hash}


def _image_from_wire(raw: Any, where: str) -> ImageInput:
    if not isinstance(raw, dict) or set(raw) != {"data", "dtype", "shape", "content_hash"}:
        raise MessageError(f"{where} must be a map of data, dtype, shape, content_hash")
    dtype = _IMAGE_DTYPES.get(raw["dtype"])
    shape, data = raw["shape"], raw["data"]
    if dtype is None:
        raise MessageError(f"{where}: image dtype must be one of {sorted(_IMAGE_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) and len(shape) == 3):
        raise MessageError(f"{where}: image shape must be [C, H, W]")
    if not isinstance(data, bytes) or not isinstance(raw["content_hash"], bytes):
        raise MessageError(f"{where}: data and content_hash must be bytes")
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise MessageError(f"{where}: {len(data)} bytes do not hold a {dtype} image of shape {shape}")
    pixels = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
    return ImageInput(pixels, raw["content_hash"])


__all__ = [
    "WIRE_VERSION",
    "Abort",
    "AbortAll",
    "AddRequest",
    "CoreExit",
    "MessageError",
    "Ready",
    "Rejection",
    "StepBatch",
    "StepFailure",
    "Stop",
    "decode",
    "encode",
]
