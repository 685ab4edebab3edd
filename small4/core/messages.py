"""The typed messages between the API process and the engine core: small dataclasses <-> msgpack maps.

Every message is one msgpack map with ``v`` (``WIRE_VERSION``) and ``op``; ``decode`` checks both, every field's
presence and type, and rebuilds the dataclass, raising ``MessageError`` on anything else (never pickle: a peer
can send only data, never code). Requests carry token ids, ``SamplingParams`` (every dataclass field by name, so
a field added to ``SamplingParams`` crosses without an edit here), the grammar as its ``GrammarSpec`` (the lark
text; the core compiles it and builds the matcher) and images as raw bytes + dtype + shape. Outputs travel batched:
one ``StepBatch`` per loop iteration of the core (a step and the commands applied before it), holding every
request's deltas, the adds it accepted or refused, the step failures and the stats.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from small4.engine.async_engine import EngineStats
from small4.engine.multimodal import ImageInput
from small4.engine.outputs import RequestOutput
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

    return msgpack.packb({"v": WIRE_VERSION, "op": _OP_OF[type(msg)], **_to_wire(msg)}, use_bin_type=True)


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
def _to_wire(obj: Any) -> Any:
    if isinstance(obj, ImageInput):
        return _image_to_wire(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_wire(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    return obj


def _from_wire(cls: type, raw: Any) -> Any:
    """Rebuild dataclass ``cls`` from a map, checking each value against the field's type hint."""
    if not isinstance(raw, dict):
        raise MessageError(f"{cls.__name__} must be a map")
    hints, names = _schema(cls)
    unknown = set(raw) - names
    if unknown:
        raise MessageError(f"{cls.__name__} has unknown fields {sorted(unknown)}")
    values = {name: _check(hints[name], raw[name], f"{cls.__name__}.{name}") for name in names if name in raw}
    return cls(**values)


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str]]:
    """A dataclass's resolved field types and names, once per class (``get_type_hints`` evaluates annotations)."""
    return typing.get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def _check(hint: Any, value: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (lists to tuples, maps to dataclasses), or ``MessageError``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check(arm, value, where)
            except MessageError as e:
                errors.append(str(e))
        raise MessageError("; ".join(errors) or f"{where} may not be None")
    if hint is ImageInput:
        return _image_from_wire(value, where)
    if dataclasses.is_dataclass(hint):
        return _from_wire(hint, value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise MessageError(f"{where} must be a list")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(args[0], v, where) for v in value)
        if origin is tuple:
            if len(value) != len(args):
                raise MessageError(f"{where} must have {len(args)} items")
            return tuple(_check(a, v, where) for a, v in zip(args, value, strict=True))
        return [_check(args[0], v, where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageError(f"{where} must be a map")
        kt, vt = args or (Any, Any)
        return {_check(kt, k, where): _check(vt, v, where) for k, v in value.items()}
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise MessageError(f"{where} must be int")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise MessageError(f"{where} must be {hint.__name__}, not {type(value).__name__}")
    return value


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
