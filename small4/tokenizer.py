"""The engine's tokenizer: a thin facade over mistral-common's tekken tokenizer.

The engine, sampler and detokenizer only see this class, so they never reach into mistral-common
internals (``instruct_tokenizer.tokenizer`` and friends). Chat rendering still needs the full
``MistralTokenizer`` (validation, normalisation, tools, images, model settings); it is exposed as
``mistral`` for that purpose.
"""

from __future__ import annotations

from pathlib import Path

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

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

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load from a ``tekken.json`` path or from a model directory holding one."""
        return cls(MistralTokenizer.from_file(resolve_tekken_path(path)))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Plain-text encoding; special-token text such as "[INST]" is encoded as ordinary bytes."""
        return self._tekken.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; special tokens are dropped, or kept as their text (e.g. "[THINK]")."""
        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self._tekken.decode(list(ids), special_token_policy=policy)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, which may be a partial UTF-8 sequence; specials give their text.

        An incremental detokenizer concatenates these and decodes only complete UTF-8 sequences.
        """
        self._check_id(token_id)
        return self._tekken.id_to_byte_piece(token_id, special_token_policy=SpecialTokenPolicy.KEEP)

    def is_special(self, token_id: int) -> bool:
        """True for ids in the reserved special range (0..num_special_tokens-1)."""
        return 0 <= token_id < self.num_special_tokens

    def special_id(self, name: str) -> int:
        """Id of a special token by its text, e.g. "[THINK]" -> 34; ValueError if unknown."""
        return self._tekken.get_special_token(name)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
