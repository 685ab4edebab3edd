"""The engine's tokenizer: a thin facade over mistral-common's tekken tokenizer.

The engine, sampler and detokenizer only see this class, so they never reach into mistral-common
internals (``instruct_tokenizer.tokenizer`` and friends). Chat rendering still needs the full
``MistralTokenizer`` (validation, normalisation, tools, images, model settings); it is exposed as
``mistral`` for that purpose.

mistral-common is imported when a tokenizer is first built, not with this module: the engine, the model runner and
the benchmarks import without it (a bare CUDA image has only torch and triton). ``TekkenVocab`` reads a
``tekken.json``'s token bytes with the standard library alone, for benchmarks that only detokenize.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TEKKEN_FILENAME = "tekken.json"


def resolve_tekken_path(path: str | Path) -> Path:
    """Accept either a ``tekken.json`` file or a model directory that contains one."""
    path = Path(path)
    if path.is_dir():
        path = path / TEKKEN_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no tekken tokenizer file at {path}")
    return path


class Tokenizer:
    """Text <-> token ids for Mistral Small 4, plus the per-token bytes a streaming detokenizer needs."""

    def __init__(self, mistral: MistralTokenizer) -> None:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        inner = mistral.instruct_tokenizer.tokenizer
        if not isinstance(inner, Tekkenizer):
            raise TypeError(f"expected a tekken tokenizer, got {type(inner).__name__}")
        self.mistral = mistral
        self._tekken = inner
        self.vocab_size: int = inner.n_words
        self.num_special_tokens: int = inner.num_special_tokens
        self.bos_id: int = inner.bos_id
        self.eos_id: int = inner.eos_id
        self.pad_id: int = inner.pad_id
        self._keep, self._ignore = SpecialTokenPolicy.KEEP, SpecialTokenPolicy.IGNORE

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load from a ``tekken.json`` path or from a model directory holding one."""
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        return cls(MistralTokenizer.from_file(resolve_tekken_path(path)))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Plain-text encoding; special-token text such as "[INST]" is encoded as ordinary bytes."""
        return self._tekken.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; special tokens are dropped, or kept as their text (e.g. "[THINK]")."""
        policy = self._ignore if skip_special_tokens else self._keep
        return self._tekken.decode(list(ids), special_token_policy=policy)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, which may be a partial UTF-8 sequence; specials give their text.

        An incremental detokenizer concatenates these and decodes only complete UTF-8 sequences.
        """
        self._check_id(token_id)
        return self._tekken.id_to_byte_piece(token_id, special_token_policy=self._keep)

    def is_special(self, token_id: int) -> bool:
        """True for ids in the reserved special range (0..num_special_tokens-1)."""
        return 0 <= token_id < self.num_special_tokens

    def special_id(self, name: str) -> int:
        """Id of a special token by its text, e.g. "[THINK]" -> 34; ValueError if unknown."""
        return self._tekken.get_special_token(name)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")


class TekkenVocab:
    """Token ids and bytes without mistral-common: what the engine's detokenizer reads (``token_bytes``,
    ``is_special``, the special ids, ``vocab_size``). No encoding: benchmarks feed token ids. Specials come first
    (ids ``0..len(specials)-1``), as in tekken."""

    def __init__(self, specials: list[str], pieces: list[bytes]) -> None:
        self.num_special_tokens = len(specials)
        self.vocab_size = len(specials) + len(pieces)
        self._special_text = [t.encode() for t in specials]
        self._bytes = pieces
        ids = {t: i for i, t in enumerate(specials)}
        self.bos_id: int = ids["<s>"]
        self.eos_id: int = ids["</s>"]
        self.pad_id: int = ids["<pad>"]

    @classmethod
    def from_file(cls, path: str | Path) -> TekkenVocab:
        """The ids and bytes of a ``tekken.json`` (a file or a model directory holding one)."""
        doc = json.loads(resolve_tekken_path(path).read_text())
        config = doc["config"]
        num_special = config["default_num_special_tokens"]
        specials = [t["token_str"] for t in sorted(doc["special_tokens"], key=lambda t: t["rank"])[:num_special]]
        inner = config["default_vocab_size"] - num_special
        pieces = [base64.b64decode(t["token_bytes"]) for t in doc["vocab"][:inner]]
        if len(pieces) != inner:
            raise ValueError(f"{path}: {len(pieces)} vocabulary entries, the config says {inner}")
        return cls(specials, pieces)

    def token_bytes(self, token_id: int) -> bytes:
        """As ``Tokenizer.token_bytes``: a special token gives its text."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        if token_id < self.num_special_tokens:
            return self._special_text[token_id]
        return self._bytes[token_id - self.num_special_tokens]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special_tokens
