"""The release's layouts: its exact spellings, and the same weights read three ways (config.json only, params.json
only, both side by side) give identical logits, because the softmax scale no longer depends on which file is read.

Before this, the config.json reading multiplied the softmax scale by YaRN's mscale^2 (x2.2058) and the params.json
reading (apply_scale false) did not; ``test_forced_mscale_is_what_differed`` shows that difference is not small.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from small4.model.context import AttentionMetadata
from small4.weights.loader import load_model
from small4.weights.tiny import make_tiny


def _logits(model) -> torch.Tensor:
    ids = torch.randint(1000, model.config.text.vocab_size, (48,), generator=torch.Generator().manual_seed(4))
    return model.compute_logits(model(ids, torch.arange(48), AttentionMetadata.for_prefill([48])))


def _split(release, tmp_path):
    """Copies of the release directory with only the HF file set, and only the native one."""
    hf, native = tmp_path / "hf-only", tmp_path / "native-only"
    for d in (hf, native):
        d.mkdir()
    for f in release.iterdir():
        if f.name.startswith("model") or f.name == "config.json":
            shutil.copy(f, hf)
        elif f.name.startswith("consolidated") or f.name == "params.json":
            shutil.copy(f, native)
        else:
            shutil.copy(f, hf)
            shutil.copy(f, native)
    return hf, native


@pytest.fixture(scope="module", params=["none", "fp8"])
def release(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(f"release-{request.param}"), layout="release", quant=request.param)


@torch.no_grad()
def test_three_readings_of_the_same_weights_give_identical_logits(release, tmp_path):
    hf, native = _split(release, tmp_path)
    both = load_model(release, dtype=torch.float32, progress=False)
    assert both.config.layout == "hf"
    hf_only = load_model(hf, dtype=torch.float32, progress=False)
    native_only = load_model(native, dtype=torch.float32, progress=False)
    assert native_only.config.layout == "mistral"
    expected = _logits(both)
    assert torch.equal(_logits(hf_only), expected)
    assert torch.equal(_logits(native_only), expected)


@torch.no_grad()
def test_forced_mscale_is_what_differed(release):
    plain = load_model(release, dtype=torch.float32, progress=False)
    forced = load_model(release, dtype=torch.float32, progress=False, attention_scale_mscale="on")
    diff = (_logits(plain) - _logits(forced)).abs().max().item()
    assert diff > 0.1


def _tensor_info(model_dir, pattern: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    info = {}
    for shard in sorted(model_dir.glob(pattern)):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                info[name] = (t.dtype, tuple(t.shape))
    return info


def test_release_spellings(tmp_path):
    d = make_tiny(tmp_path, layout="release", quant="fp8")
    hf = _tensor_info(d, "model-*.safetensors")
    E = 8
    assert "language_model.lm_head.weight" in hf and "language_model.model.embed_tokens.weight" in hf
    assert any(n.startswith("vision_tower.") for n in hf) and any(n.startswith("multi_modal_projector.") for n in hf)
    assert not any(n.startswith("model.") for n in hf)
    attn = "language_model.model.layers.0.self_attn.q_a_proj"
    assert hf[attn + ".weight"][0] == torch.float8_e4m3fn and hf[attn + ".weight_scale_inv"] == (torch.bfloat16, ())
    experts = "language_model.model.layers.0.mlp.experts."
    assert hf[experts + "gate_up_proj_scale_inv"] == (torch.bfloat16, (E, 1, 1))
    assert hf[experts + "down_proj_scale_inv"] == (torch.bfloat16, (E, 1, 1))
    assert hf[experts + "gate_up_proj_activation_scale"] == (torch.bfloat16, (E,))
    text = json.loads((d / "config.json").read_text())["text_config"]
    rope = text["rope_parameters"]
    assert rope["type"] == rope["rope_type"] == "yarn" and rope["mscale"] == rope["mscale_all_dim"] == 1.0
    assert text["max_position_embeddings"] == 1048576
    params = json.loads((d / "params.json").read_text())
    assert params["yarn"]["apply_scale"] is False and params["llama_4_scaling"]["beta"] == 0.1
    assert {"expert_hidden_dim", "num_experts", "num_experts_per_tok", "routed_scale", "num_shared_experts"} <= set(
        params["moe"]
    )
    native = _tensor_info(d, "consolidated-*.safetensors")
    assert native["layers.0.experts.3.w1.qscale_weight"] == (torch.bfloat16, ())
    assert (d / "generation_config.json").is_file()


def test_nvfp4_release_is_the_native_set_alone(tmp_path):
    d = make_tiny(tmp_path, layout="release", quant="nvfp4")
    assert not (d / "config.json").exists()
    params = json.loads((d / "params.json").read_text())
    assert params["quantization_config"]["format"] == "nvfp4-pack-quantized" and not params["yarn"]["apply_scale"]
    native = _tensor_info(d, "consolidated-*.safetensors")
    base = "layers.1.experts.7.w3."
    assert native[base + "weight_packed"] == (torch.uint8, (32, 32))
    assert native[base + "weight_scale"] == (torch.float8_e4m3fn, (32, 4))
    assert native[base + "weight_global_scale"] == (torch.float32, (1,))
    assert native[base + "input_global_scale"] == (torch.float32, (1,))
    assert native["layers.1.attention.wq_a.weight"][0] == torch.bfloat16
    model = load_model(d, dtype=torch.float32, progress=False)
    assert torch.isfinite(_logits(model)).all()


def test_make_tiny_command_writes_the_release_and_quantised_layouts(tmp_path, capsys):
    from small4.cli import main

    assert main(["make-tiny", str(tmp_path / "r"), "--layout", "release"]) == 0
    assert (tmp_path / "r" / "config.json").is_file() and (tmp_path / "r" / "params.json").is_file()
    assert main(["make-tiny", str(tmp_path / "n"), "--layout", "mistral", "--quant", "nvfp4"]) == 0
    assert json.loads((tmp_path / "n" / "params.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors"
    )
    assert main(["make-tiny", str(tmp_path / "b"), "--quant", "nvfp4"]) == 1  # NVFP4 tiny is native-layout only
    assert "mistral layout" in capsys.readouterr().err
