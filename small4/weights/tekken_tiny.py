"""A tiny, offline ``tekken.json`` with the exact layout of the Mistral Small 4 (v15) tokenizer.

Tests and tiny random-weight models need a tokenizer that mistral-common loads *unchanged* as the
real model's one (``InstructTokenizerV15`` over a ``Tekkenizer``), so that chat rendering, tool
calls, ``[THINK]``, model settings and image tokens behave exactly as with the real checkpoint,
but with a small vocabulary (fast to load, small embedding tables). No model hub is reachable,
so the BPE ranks are cut from the tekken file that ships inside the mistral-common package.

Layout of the written json (top-level keys, in this order)::

    config                  pattern, num_vocab_tokens, default_vocab_size,
                            default_num_special_tokens (1000), version ("v15")
    vocab                   the first ``num_bpe_ranks`` {rank, token_bytes, token_str} entries (or, with
                            ``spaceless``, the first of those without a space, renumbered)
    special_tokens          1000 {rank, token_str, is_control} entries, ids 0..999
    image                   image_patch_size 14, max_image_size 1540, spatial_merge_size 2
    model_settings_builder  reasoning_effort: enum of "none" | "high", default "none"
"""

from __future__ import annotations

import base64
import copy
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

NUM_SPECIAL_TOKENS = 1000

# Ids 0..37 of the real Small 4 tokenizer. 0..19 are the historical tekken specials, 20..31 are
# unnamed reserved slots in Mistral's text models (fillers ``<SPECIAL_N>``), 32..37 the tool-call,
# reasoning and model-settings tokens. Everything above 37 is a ``<SPECIAL_N>`` filler too.
NAMED_SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: "[THINK]",
    35: "[/THINK]",
    36: "[MODEL_SETTINGS]",
    37: "[/MODEL_SETTINGS]",
}

# Pixtral-style vision front end of Small 4: 14 px patches, 2x2 patch merge, longest side 1540 px.
IMAGE_CONFIG: dict[str, int] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}

# Small 4 only knows two reasoning modes; anything else must be refused by mistral-common itself.
MODEL_SETTINGS_BUILDER: dict[str, Any] = {
    "reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]},
}

_SOURCE_TEKKEN = "tekken_240911.json"


def special_tokens() -> list[dict[str, Any]]:
    """The 1000 special-token entries, written out in full so nothing depends on loader fillers."""
    return [
        {"rank": i, "token_str": NAMED_SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL_TOKENS)
    ]


@lru_cache(maxsize=1)
def _source_tekken() -> dict[str, Any]:
    """Parse mistral-common's bundled tekken file once per process (it is ~19 MB)."""
    source = resources.files("mistral_common").joinpath("data", _SOURCE_TEKKEN)
    with source.open("r", encoding="utf-8") as f:
        return json.load(f)


def _truncated_vocab(num_bpe_ranks: int) -> list[dict[str, Any]]:
    """First ``num_bpe_ranks`` ranks: the 256 single bytes, then merges of lower ranks only.

    Keeping a prefix of the rank list keeps a valid byte-level BPE: every byte stays encodable,
    so any UTF-8 text round-trips (rare characters just split into more tokens).
    """
    vocab = _source_tekken()["vocab"]
    if not 256 <= num_bpe_ranks <= len(vocab):
        raise ValueError(f"num_bpe_ranks must be in [256, {len(vocab)}], got {num_bpe_ranks}")
    return [dict(entry) for entry in vocab[:num_bpe_ranks]]


def _is_spaceless_piece(entry: dict[str, Any]) -> bool:
    raw = base64.b64decode(entry["token_bytes"])
    return len(raw) == 1 or (b" " not in raw and raw.isascii())


def _spaceless_vocab(num_bpe_ranks: int) -> list[dict[str, Any]]:
    """The first ``num_bpe_ranks`` source ranks that are single bytes or ASCII pieces without a space, renumbered.

    A word then never carries its leading space (" Perth" is " " + "Perth"'s pieces), so a value copied from
    prose into JSON (``"Perth"``) or back is the same tokens, and a tiny model can copy it with a plain
    induction head instead of learning a space-stripping map for every piece (the demo model, issue 17).
    The relative order of the kept ranks is the source's and every kept piece is a merge of kept pieces (a
    piece without a space is never built from one with a space), so it stays a valid byte-level BPE.
    """
    kept = [dict(e) for e in _source_tekken()["vocab"] if _is_spaceless_piece(e)][:num_bpe_ranks]
    if len(kept) < num_bpe_ranks:
        raise ValueError(f"only {len(kept)} spaceless pieces, got num_bpe_ranks={num_bpe_ranks}")
    for rank, entry in enumerate(kept):
        entry["rank"] = rank
    return kept


def tiny_tekken_dict(num_bpe_ranks: int = 2000, spaceless: bool = False) -> dict[str, Any]:
    """The json document for a tiny v15 tokenizer (see the module docstring for the layout).

    ``spaceless`` keeps only pieces without a space (``_spaceless_vocab``); the default is a prefix of the real
    ranks.
    """
    vocab = _spaceless_vocab(num_bpe_ranks) if spaceless else _truncated_vocab(num_bpe_ranks)
    return {
        "config": {
            "pattern": _source_tekken()["config"]["pattern"],
            "num_vocab_tokens": num_bpe_ranks,
            "default_vocab_size": NUM_SPECIAL_TOKENS + num_bpe_ranks,
            "default_num_special_tokens": NUM_SPECIAL_TOKENS,
            "version": "v15",
        },
        "vocab": vocab,
        "special_tokens": special_tokens(),
        "image": dict(IMAGE_CONFIG),
        "model_settings_builder": copy.deepcopy(MODEL_SETTINGS_BUILDER),
    }


def write_tiny_tekken(path: Path, num_bpe_ranks: int = 2000, spaceless: bool = False) -> int:
    """Write a tiny Small-4-compatible ``tekken.json`` to ``path``; return the total vocab size.

    mistral-common only recognises a tekken file when its name contains "tekken" and ends in
    ".json", so pass e.g. ``model_dir / "tekken.json"``. The bytes are identical on every call.
    """
    path = Path(path)
    doc = tiny_tekken_dict(num_bpe_ranks, spaceless)
    text = json.dumps(doc, ensure_ascii=True, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("ascii") + b"\n")
    return doc["config"]["default_vocab_size"]
