"""small4's vision tower + image-embedding merge against transformers' Mistral3ForConditionalGeneration.

Both models get the same pixels: mistral-common encodes a chat message with PIL images using the tiny tekken
(its own resizing and normalisation, its own [IMG]/[IMG_BREAK]/[IMG_END] layout); transformers takes them as one
zero-padded batch plus ``image_sizes``, small4 as a list of [C, H, W] tensors. HF files are read by
transformers itself; native files through a conversion written in the test (q/k rows re-ordered by hand).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from PIL import Image

from conftest import (
    hf_config_of,
    native_text_to_hf,
    native_vision_to_hf,
    plain_softmax_scale,
    read_checkpoint,
    reference_model,
)
from small4.model.context import AttentionMetadata
from small4.tokenizer import Tokenizer
from small4.weights.loader import load_model
from small4.weights.tiny import TinySpec, hf_config, make_tiny

SPEC = TinySpec(vision_layers=2)
NEW_TOKENS = 16


def _image(height: int, width: int, seed: int) -> Image.Image:
    """A smooth gradient plus noise, so that patches differ from one another."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 255 / height, xx * 255 / width, (yy + xx) * 127 / (height + width)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _chunks(case: str) -> list:
    if case == "one-image":
        return [ImageChunk(image=_image(50, 70, seed=1))]
    if case == "two-images":
        return [ImageChunk(image=_image(40, 60, seed=2)), ImageChunk(image=_image(100, 45, seed=3))]
    assert case == "text-around-image"
    return [TextChunk(text="what is in this picture"), ImageChunk(image=_image(80, 60, seed=4)), TextChunk(text="ok")]


@pytest.fixture(scope="module", params=["hf", "mistral"])
def models(request, tmp_path_factory):
    layout = request.param
    model_dir = make_tiny(tmp_path_factory.mktemp(f"vision-{layout}"), layout=layout, seed=11, spec=SPEC)
    ours = load_model(model_dir, dtype=torch.float32, progress=False)
    if layout == "hf":
        from transformers import Mistral3ForConditionalGeneration

        ref = Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert hf_config_of(model_dir)["vision_feature_layer"] == -1
        # config.json only: small4 uses the plain softmax scale where transformers multiplies by mscale^2
        assert not ours.config.text.yarn_softmax_mscale
        plain_softmax_scale(ref)
    else:
        sd = {k: v.float() for k, v in read_checkpoint(model_dir).items()}
        hf_sd = native_text_to_hf(sd, SPEC.num_layers, SPEC.num_experts)
        hf_sd.update(native_vision_to_hf(sd, SPEC.vision_layers, SPEC.vision_heads))
        ref = reference_model(hf_config(SPEC, fp8=False), hf_sd, with_vision=True)
    return ours, ref, Tokenizer.from_file(model_dir).mistral


def _encode(tokenizer, case: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    request = ChatCompletionRequest(messages=[UserMessage(content=_chunks(case))])
    encoded = tokenizer.encode_chat_completion(request)
    return torch.tensor(encoded.tokens), [torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in encoded.images]


def _hf_pixels(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input: images zero-padded into one [B, C, Hmax, Wmax] batch, and their real sizes [B, 2]."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    pixel_values = torch.zeros(len(images), images[0].shape[0], height, width)
    for b, image in enumerate(images):
        pixel_values[b, :, : image.shape[1], : image.shape[2]] = image
    return pixel_values, torch.tensor([list(i.shape[1:]) for i in images])


def _our_embeds(model, ids: torch.Tensor, images: list[torch.Tensor]) -> torch.Tensor:
    per_image = model.vision(images)
    assert [len(e) for e in per_image] == [model.config.vision.tokens_per_image(i.shape[1], i.shape[2]) for i in images]
    positions = (ids == model.config.vision.image_token_id).nonzero().squeeze(1)  # [N] the [IMG] slots
    assert len(positions) == sum(len(e) for e in per_image)
    return model.embed(ids, torch.cat(per_image), positions)


CASES = ["one-image", "two-images", "text-around-image"]


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_prompt_logits_match_reference(models, case):
    ours, ref, tokenizer = models
    ids, images = _encode(tokenizer, case)
    assert len(images) == (2 if case == "two-images" else 1)
    pixel_values, image_sizes = _hf_pixels(images)
    expected = ref(input_ids=ids[None], pixel_values=pixel_values, image_sizes=image_sizes).logits[0]
    embeds = _our_embeds(ours, ids, images)
    hidden = ours(ids, torch.arange(len(ids)), AttentionMetadata.for_prefill([len(ids)]), inputs_embeds=embeds)
    diff = (ours.compute_logits(hidden) - expected).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_greedy_continuation_matches_reference(models, case, paged_greedy):
    ours, ref, tokenizer = models
    ids, images = _encode(tokenizer, case)
    pixel_values, image_sizes = _hf_pixels(images)
    expected = ref.generate(
        ids[None],
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )[0, len(ids) :].tolist()
    got = paged_greedy(ours).generate(ids.tolist(), NEW_TOKENS, inputs_embeds=_our_embeds(ours, ids, images))
    assert got == expected


@torch.no_grad()
def test_images_together_equal_images_alone(models):
    """Block-diagonal attention: encoding several images in one sequence equals encoding each on its own."""
    ours, _, tokenizer = models
    _, images = _encode(tokenizer, "two-images")
    assert images[0].shape != images[1].shape
    together, grids = ours.vision.encoder(images)
    alone = [ours.vision.encoder([image]) for image in images]
    assert grids == [g for _, (g,) in alone]
    assert (together - torch.cat([x for x, _ in alone])).abs().max().item() <= 1e-5
    for joint, image in zip(ours.vision(images), images, strict=True):
        assert (joint - ours.vision([image])[0]).abs().max().item() <= 1e-5


def test_embed_overwrites_only_image_rows(models):
    ours, _, _ = models
    ids = torch.tensor([1, 10, 10, 5, 10])
    positions = torch.tensor([1, 2, 4])
    image_embeds = torch.randn(3, SPEC.hidden_size)
    x = ours.embed(ids, image_embeds, positions)
    assert torch.equal(x[positions], image_embeds)
    assert torch.equal(x[[0, 3]], ours.embed_tokens(ids[[0, 3]]))
    assert torch.equal(ours.embed(ids), ours.embed_tokens(ids))
    with pytest.raises(ValueError):
        ours.embed(ids, image_embeds, positions[:2])
