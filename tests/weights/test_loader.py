"""Checkpoint loading: bad files fail with one clear line naming the tensor; FP8 kept or dequantised agree;
checkpoints written by transformers' save_pretrained load too."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from small4.config import ConfigError, parse_hf_config, parse_mistral_params
from small4.kernels.fp8 import FP8_DTYPE
from small4.model.context import AttentionMetadata
from small4.weights.loader import CheckpointError, load_model
from small4.weights.tiny import TinySpec, hf_config, make_tiny

SMALL = TinySpec(num_layers=1, num_experts=4, num_bpe_ranks=300)


def _logits(model, n: int = 40) -> torch.Tensor:
    ids = torch.arange(1000, 1000 + n) % model.config.text.vocab_size
    return model.compute_logits(model(ids, torch.arange(n), AttentionMetadata.for_prefill([n])))


def _rewrite_first_shard(model_dir, edit) -> None:
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    sd = load_file(str(shard))
    edit(sd)
    save_file(sd, str(shard))


@pytest.fixture
def tiny_hf(tmp_path):
    return make_tiny(tmp_path / "m", layout="hf", spec=SMALL)


def _load_error(model_dir) -> str:
    with pytest.raises((CheckpointError, ConfigError)) as err:
        load_model(model_dir, dtype=torch.float32, progress=False)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_tensor_is_named(tiny_hf):
    _rewrite_first_shard(tiny_hf, lambda sd: sd.pop("lm_head.weight"))
    assert _load_error(tiny_hf) == "missing tensor lm_head"


def test_unexpected_tensor_is_named(tiny_hf):
    _rewrite_first_shard(tiny_hf, lambda sd: sd.update({"lm_head.bias": torch.zeros(3)}))
    assert "unexpected tensor lm_head.bias" in _load_error(tiny_hf)


def test_wrong_shape_is_named(tiny_hf):
    name = "lm_head.weight"
    _rewrite_first_shard(tiny_hf, lambda sd: sd.update({name: sd[name][:-1].clone()}))
    assert f"tensor {name}: shape" in _load_error(tiny_hf)


def test_unknown_dtype_is_named(tiny_hf):
    name = "lm_head.weight"
    _rewrite_first_shard(tiny_hf, lambda sd: sd.update({name: sd[name].to(torch.int32)}))
    assert f"tensor {name}: unsupported dtype" in _load_error(tiny_hf)


def test_truncated_shard_is_named(tiny_hf):
    shard = sorted(tiny_hf.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert shard.name in _load_error(tiny_hf)


def test_missing_shard_named_by_index(tiny_hf):
    sorted(tiny_hf.glob("model-*.safetensors"))[-1].unlink()
    assert "does not exist" in _load_error(tiny_hf)


def test_fp8_weight_without_scale(tmp_path):
    model_dir = make_tiny(tmp_path, layout="mistral", fp8=True, spec=SMALL)
    shard = sorted(model_dir.glob("consolidated-*.safetensors"))[-1]
    sd = load_file(str(shard))
    scale = next(k for k in sd if k.endswith(".qscale_weight"))
    del sd[scale]
    save_file(sd, str(shard))
    assert "FP8 scale is missing" in _load_error(model_dir)


def test_bad_config_names_field(tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    cfg["text_config"]["num_experts_per_tok"] = 99
    (tiny_hf / "config.json").write_text(json.dumps(cfg))
    assert "num_experts_per_tok" in _load_error(tiny_hf)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(model_type="llama"), "model_type"),
        (lambda c: c["text_config"].update(head_dim=7), "head_dim"),
        (lambda c: c["text_config"].update(n_group=2), "n_group"),
        (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act"),
        (lambda c: c["text_config"]["rope_parameters"].update(rope_type="longrope"), "rope_type"),
        (lambda c: c.update(quantization_config={"quant_method": "gptq"}), "quant_method"),
        (lambda c: c["text_config"].update(kv_lora_rank=0), "kv_lora_rank"),
    ],
)
def test_config_errors_name_the_field(edit, field):
    cfg = hf_config(SMALL, fp8=False)
    edit(cfg)
    with pytest.raises(ConfigError, match=field):
        parse_hf_config(cfg)


def test_native_config_errors_name_the_field():
    from small4.weights.tiny import mistral_params

    params = mistral_params(SMALL, fp8=False)
    params["moe"]["num_expert_groups"] = 4
    with pytest.raises(ConfigError, match="moe.num_expert_groups"):
        parse_mistral_params(params)
    params = mistral_params(SMALL, fp8=False)
    params["quantization"] = {"qformat_weight": "int4"}
    with pytest.raises(ConfigError, match="qformat_weight"):
        parse_mistral_params(params)


@pytest.mark.parametrize("layout", ["hf", "mistral"])
@torch.no_grad()
def test_keep_fp8_matches_dequantised(tmp_path, layout):
    model_dir = make_tiny(tmp_path, layout=layout, fp8=True, spec=SMALL)
    dense = load_model(model_dir, dtype=torch.float32, progress=False)
    kept = load_model(model_dir, dtype=torch.float32, keep_fp8=True, progress=False)
    attn = kept.layers[0].self_attn
    assert attn.kv_b_proj.weight.dtype == FP8_DTYPE and attn.kv_b_proj.input_scale is not None
    experts = kept.layers[0].mlp.experts
    assert experts.w13.dtype == FP8_DTYPE and tuple(experts.w13_scale.shape) == (SMALL.num_experts, 2, 1)
    assert kept.layers[0].mlp.shared_experts.gate_up.weight_scale.shape == (2, 1)
    assert kept.lm_head.weight.dtype == torch.float32 and kept.layers[0].mlp.gate.weight.dtype == torch.float32
    assert torch.allclose(_logits(dense), _logits(kept), atol=1e-5, rtol=0)


@torch.no_grad()
def test_loads_transformers_save_pretrained(tmp_path):
    """A checkpoint written by transformers itself (its naming and sharding), not only by make-tiny."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    ref = Mistral3ForConditionalGeneration(Mistral3Config(**hf_config(SMALL, fp8=False))).float().eval()
    for p in ref.parameters():
        p.normal_(0, 0.2)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_model(tmp_path, dtype=torch.float32, progress=False)
    # config.json only: small4 uses the plain softmax scale where transformers multiplies by YaRN's mscale^2
    # (README, "small4 and transformers"); the reference is set to the plain scale to compare the rest.
    for layer in ref.model.language_model.layers:
        layer.self_attn.scaling = layer.self_attn.qk_head_dim**-0.5
    ids = torch.arange(1000, 1040)
    expected = ref(input_ids=ids[None]).logits[0]
    assert (_logits(ours) - expected).abs().max().item() <= 1e-4
