"""Images of a request as the engine sees them: pixels, content hashes, and where their embeddings go.

The vision encoder runs once per request, the first time a scheduled chunk covers one of its ``[IMG]`` slots
(a chunk boundary may fall inside an image: the whole request's images are encoded, the chunk takes the rows it
needs). Embeddings stay cached until the request ends, so recompute after preemption does not re-encode. Prefix
caching keys ``[IMG]`` tokens by the image's content hash, which the server computes from the bytes it received.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class ImageInput:
    pixels: torch.Tensor | np.ndarray  # [C, H, W], already resized and normalised by mistral-common
    content_hash: bytes  # hash of the encoded image bytes, computed by the server


@dataclass
class MultiModalInputs:
    """The images of one prompt and the prompt positions of their ``[IMG]`` slots, in order."""

    images: list[ImageInput]
    slot_positions: list[int]  # sorted prompt indices of [IMG] tokens, image after image
    embeddings: torch.Tensor | None = field(default=None, repr=False)  # [len(slot_positions), hidden] once encoded

    @classmethod
    def build(
        cls,
        prompt: list[int],
        images: list[ImageInput],
        image_token_id: int,
        tokens_per_image: Callable[[int, int], int],
    ) -> MultiModalInputs:
        """Checks that the prompt has exactly as many ``[IMG]`` slots as the images produce embeddings."""
        slots = [i for i, t in enumerate(prompt) if t == image_token_id]
        expected = sum(tokens_per_image(img.pixels.shape[-2], img.pixels.shape[-1]) for img in images)
        if len(slots) != expected:
            raise ValueError(f"prompt has {len(slots)} image tokens but its {len(images)} image(s) give {expected}")
        return cls(images, slots)

    def block_hash_extras(self, prompt_len: int, tokens_per_image: Callable[[int, int], int]) -> list[bytes | None]:
        """Per prompt token: the content hash of the image whose slot it is, else None."""
        extras: list[bytes | None] = [None] * prompt_len
        k = 0
        for img in self.images:
            for _ in range(tokens_per_image(img.pixels.shape[-2], img.pixels.shape[-1])):
                extras[self.slot_positions[k]] = img.content_hash
                k += 1
        return extras

    def slots_in(self, start: int, end: int) -> tuple[int, int]:
        """Range [lo, hi) of slot ordinals whose prompt position lies in [start, end)."""
        return bisect.bisect_left(self.slot_positions, start), bisect.bisect_left(self.slot_positions, end)
