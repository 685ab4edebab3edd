"""Vision tensors load into the vision tower in both layouts and fail by name like text ones; a text-only config
skips them; projector biases load when the config has them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from small4.weights.loader import CheckpointError, load_model
from small4.weights.tiny import TinySpec, hf_config, make_tiny

SMALL = TinySpec(num_layers=1, num_experts=4, num_bpe_ranks=300)


def _edit_shards(model_dir, edit) -> None:
    """Applies ``edit(sd)`` to the shard holding the tensors it touches (tries every shard, keeps changes)."""
    for shard in sorted(model_dir.glob("*.safetensors")):
        sd = load_file(str(shard))
        before = {k: v.shape for k, v in sd.items()}
        edit(sd)
        if {k: v.shape for k, v in sd.items()} != before:
            save_file(sd, str(shard))
            return
    raise AssertionError("edit changed no shard")


def _load_error(model_dir) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(model_dir, dtype=torch.float32, progress=False)
    assert "\n" not in str(err.value)
    return str(err.value)


def _pop(name: str):
    def edit(sd):
        if name in sd:
            del sd[name]

    return edit


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("hf", "model.vision_tower.transformer.layers.0.attention.q_proj"),
        ("hf", "model.multi_modal_projector.patch_merger.merging_layer"),
        ("mistral", "vision_encoder.transformer.layers.0.attention.wk"),
        ("mistral", "vision_language_adapter.w_in"),
    ],
)
def test_missing_vision_tensor_is_named(tmp_path, layout, name):
    model_dir = make_tiny(tmp_path, layout=layout, spec=SMALL)
    _edit_shards(model_dir, _pop(name + ".weight"))
    assert _load_error(model_dir) == f"missing tensor {name}"


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("hf", f"model.vision_tower.transformer.layers.{SMALL.vision_layers}.attention.q_proj.weight"),
        ("hf", "model.multi_modal_projector.linear_1.bias"),  # the config says no projector bias
        ("hf", "model.vision_tower.post_norm.weight"),
        ("hf", "vision_encoder.ln_pre.weight"),  # a native name in an HF checkpoint
        ("mistral", "vision_encoder.transformer.layers.0.attention.q_proj.weight"),  # an HF name in native files
        ("mistral", "vision_language_adapter.w_in.bias"),
    ],
)
def test_unexpected_vision_tensor_is_named(tmp_path, layout, name):
    model_dir = make_tiny(tmp_path, layout=layout, spec=SMALL)
    _edit_shards(model_dir, lambda sd: sd.update({name: torch.zeros(SMALL.vision_hidden, SMALL.vision_hidden)}))
    assert f"unexpected tensor {name}" in _load_error(model_dir)


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("hf", "model.vision_tower.patch_conv.weight"),
        ("mistral", "vision_encoder.transformer.layers.0.attention.wq.weight"),
    ],
)
def test_wrong_vision_shape_is_named(tmp_path, layout, name):
    model_dir = make_tiny(tmp_path, layout=layout, spec=SMALL)

    def edit(sd):
        if name in sd:
            sd[name] = sd[name][:-1].clone()

    _edit_shards(model_dir, edit)
    assert f"tensor {name}: shape" in _load_error(model_dir)


def test_text_only_config_skips_vision_tensors(tmp_path):
    model_dir = make_tiny(tmp_path, layout="hf", spec=SMALL)
    text_only = hf_config(SMALL, fp8=False)["text_config"]
    (model_dir / "config.json").write_text(json.dumps(text_only))
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    assert model.vision is None
    assert not any(name.startswith("vision.") for name, _ in model.named_parameters())


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_vision_weights_land_in_the_tower(tmp_path, layout):
    """The checkpoint's vision tensors are the tower's parameters (native q/k rows reordered to rotate-half)."""
    model_dir = make_tiny(tmp_path, layout=layout, spec=SMALL, dtype=torch.float32)
    model = load_model(model_dir, dtype=torch.float32, progress=False)
    sd = {}
    for shard in model_dir.glob("*.safetensors"):
        sd.update(load_file(str(shard)))
    tower, proj = model.vision.encoder, model.vision.projector
    if layout == "hf":
        assert torch.equal(tower.patch_conv.weight, sd["model.vision_tower.patch_conv.weight"])
        q = sd["model.vision_tower.transformer.layers.0.attention.q_proj.weight"]
        assert torch.equal(proj.linear_2.weight, sd["model.multi_modal_projector.linear_2.weight"])
    else:
        assert torch.equal(tower.patch_conv.weight, sd["vision_encoder.patch_conv.weight"])
        native_q = sd["vision_encoder.transformer.layers.0.attention.wq.weight"]
        head_dim = SMALL.vision_hidden // SMALL.vision_heads
        # head h, rope pair i: native rows 2i / 2i+1 -> internal rows i / i + head_dim/2
        q = torch.empty_like(native_q)
        for h in range(SMALL.vision_heads):
            for i in range(head_dim // 2):
                q[h * head_dim + i] = native_q[h * head_dim + 2 * i]
                q[h * head_dim + head_dim // 2 + i] = native_q[h * head_dim + 2 * i + 1]
        assert torch.equal(proj.linear_2.weight, sd["vision_language_adapter.w_out.weight"])
    assert torch.equal(tower.transformer.layers[0].attention.q_proj.weight, q)


@torch.no_grad()
def test_projector_bias_loads_from_transformers_save_pretrained(tmp_path):
    """multimodal_projector_bias: a transformers-written checkpoint with projector biases gives its features."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    cfg = hf_config(SMALL, fp8=False)
    cfg["multimodal_projector_bias"] = True
    torch.manual_seed(0)
    ref = Mistral3ForConditionalGeneration(Mistral3Config(**cfg)).float().eval()
    for p in ref.parameters():
        p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32, progress=False)
    assert ours.vision.projector.linear_1.bias is not None
    images = [torch.randn(3, 56, 84), torch.randn(3, 28, 56)]
    pixel_values = torch.zeros(2, 3, 56, 84)
    pixel_values[0], pixel_values[1, :, :28, :56] = images[0], images[1]
    expected = ref.get_image_features(pixel_values=pixel_values, image_sizes=torch.tensor([[56, 84], [28, 56]]))
    for got, want in zip(ours.vision(images), expected.pooler_output, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4

    shard = next(tmp_path.glob("*.safetensors"))
    sd = load_file(str(shard))
    # transformers writes the legacy prefixes (multi_modal_projector.*, vision_tower.*); errors use the current ones
    del sd["multi_modal_projector.linear_1.bias"]
    save_file(sd, str(shard), metadata={"format": "pt"})
    assert _load_error(tmp_path) == "missing tensor model.multi_modal_projector.linear_1.bias"
