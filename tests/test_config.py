"""Config-time decisions: the one softmax scale per checkpoint directory, quantisation schemes refused by name, and
generation_config.json's sampling defaults."""

from __future__ import annotations

import json
import logging
import math

import pytest

from small4.config import ConfigError, load_model_config, parse_mistral_params, read_generation_config
from small4.weights.tiny import make_tiny
from small4.weights.tiny_quant import nvfp4_quantization_config

PLAIN = (16 + 16) ** -0.5  # the tiny spec's qk_head_dim is 32
MSCALE2 = (0.1 * math.log(128.0) + 1.0) ** 2  # 2.2058: YaRN mscale^2 for factor 128, mscale_all_dim 1


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("release"), layout="release", seed=0)


def _write(path, data) -> None:
    path.write_text(json.dumps(data))


def test_release_directory_uses_the_plain_scale_and_says_why(release_dir, caplog):
    with caplog.at_level(logging.INFO, logger="small4.config"):
        cfg = load_model_config(release_dir)
    assert cfg.layout == "hf" and not cfg.text.yarn_softmax_mscale
    assert cfg.text.softmax_scale == pytest.approx(PLAIN)
    assert cfg.text.rope.softmax_mscale == pytest.approx(MSCALE2)  # what transformers would multiply by
    assert "params.json yarn.apply_scale: false" in caplog.text and "without YaRN mscale^2" in caplog.text


def test_config_json_alone_uses_the_plain_scale(tmp_path):
    model_dir = make_tiny(tmp_path, layout="hf", seed=0)  # rope mscale_all_dim 1, no params.json
    cfg = load_model_config(model_dir)
    assert cfg.text.rope.mscale_all_dim == 1.0 and cfg.text.softmax_scale == pytest.approx(PLAIN)


def test_params_json_apply_scale_decides_even_beside_config_json(release_dir, tmp_path):
    for name in ("config.json", "params.json"):
        (tmp_path / name).write_text((release_dir / name).read_text())
    params = json.loads((tmp_path / "params.json").read_text())
    params["yarn"]["apply_scale"] = True
    _write(tmp_path / "params.json", params)
    cfg = load_model_config(tmp_path)
    assert cfg.layout == "hf" and cfg.text.yarn_softmax_mscale
    assert cfg.text.softmax_scale == pytest.approx(PLAIN * MSCALE2)
    assert parse_mistral_params(params).text.softmax_scale == pytest.approx(PLAIN * MSCALE2)


@pytest.mark.parametrize(("mode", "scale"), [("on", PLAIN * MSCALE2), ("off", PLAIN), ("auto", PLAIN)])
def test_override_forces_the_scale_both_ways(release_dir, mode, scale):
    assert load_model_config(release_dir, mode).text.softmax_scale == pytest.approx(scale)


def test_override_off_beats_apply_scale_true(tmp_path):
    model_dir = make_tiny(tmp_path, layout="mistral", seed=0)  # the default tiny params say apply_scale true
    assert load_model_config(model_dir).text.softmax_scale == pytest.approx(PLAIN * MSCALE2)
    assert load_model_config(model_dir, "off").text.softmax_scale == pytest.approx(PLAIN)
    with pytest.raises(ConfigError, match="auto, on or off"):
        load_model_config(model_dir, "yes")


def _params_with_quant(tmp_path, quant: dict):
    model_dir = make_tiny(tmp_path, layout="mistral", seed=0)
    params = json.loads((model_dir / "params.json").read_text())
    params["quantization_config"] = quant
    _write(model_dir / "params.json", params)
    return model_dir


@pytest.mark.parametrize("scheme", ["int-quantized", "pack-quantized", "float-quantized", "mxfp4-pack-quantized"])
def test_unsupported_compressed_tensors_scheme_fails_at_config_time(tmp_path, scheme):
    quant = nvfp4_quantization_config()
    quant["format"] = scheme
    quant["config_groups"]["group_0"]["format"] = scheme
    with pytest.raises(ConfigError) as err:
        load_model_config(_params_with_quant(tmp_path, quant))
    assert str(err.value).startswith(f"compressed-tensors scheme '{scheme}' is not supported")


def test_nvfp4_config_is_read(tmp_path):
    cfg = load_model_config(_params_with_quant(tmp_path, nvfp4_quantization_config()))
    assert cfg.quant.method == "nvfp4"
    assert "lm_head" in cfg.quant.modules_to_not_convert and cfg.quant.targets


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda g: g["weights"].update(num_bits=8), "weights"),
        (lambda g: g["weights"].update(group_size=32), "weights"),
        (lambda g: g["weights"].update(strategy="channel"), "weights"),
        (lambda g: g.update(input_activations={"num_bits": 8, "type": "float", "group_size": None}), "input_act"),
    ],
)
def test_nvfp4_arguments_other_than_nvfp4_are_named(tmp_path, edit, field):
    quant = nvfp4_quantization_config()
    edit(quant["config_groups"]["group_0"])
    with pytest.raises(ConfigError, match=f"group_0.{field}"):
        load_model_config(_params_with_quant(tmp_path, quant))


def test_unknown_quant_method_is_named(tmp_path):
    model_dir = make_tiny(tmp_path, layout="hf", seed=0)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    _write(model_dir / "config.json", cfg)
    with pytest.raises(ConfigError, match="quantization method 'awq' is not supported"):
        load_model_config(model_dir)


def test_bad_weight_block_size_is_named(tmp_path):
    model_dir = make_tiny(tmp_path, layout="hf", quant="fp8-block", seed=0)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [128]
    _write(model_dir / "config.json", cfg)
    with pytest.raises(ConfigError, match="weight_block_size"):
        load_model_config(model_dir)


def test_generation_config_defaults(release_dir, tmp_path):
    assert read_generation_config(release_dir) == {"temperature": 0.7, "top_p": 0.95}
    assert read_generation_config(tmp_path) == {}
    _write(tmp_path / "generation_config.json", {"temperature": 0.3, "top_k": 20, "max_new_tokens": 9, "do_sample": 1})
    assert read_generation_config(tmp_path) == {"temperature": 0.3, "top_k": 20}
    _write(tmp_path / "generation_config.json", {"top_p": 3})
    with pytest.raises(ConfigError, match="generation_config.top_p"):
        read_generation_config(tmp_path)
