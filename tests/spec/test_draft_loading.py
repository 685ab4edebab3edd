"""The EAGLE draft's two layouts and two precisions load to the same draft; mismatches fail naming the field."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from small4.config import ConfigError
from small4.config.hf import parse_hf_config
from small4.model.context import AttentionMetadata
from small4.spec.loading import load_draft
from small4.weights.loader import CheckpointError
from small4.weights.tiny import TinySpec, hf_config
from small4.weights.tiny_draft import DraftSpec, make_tiny_draft

TARGET = parse_hf_config(hf_config(TinySpec(), fp8=False)).text
DRAFT = DraftSpec(num_layers=2, intermediate_size=96)


def _draft_output(draft, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T, H = 9, TARGET.hidden_size
    embeds, hidden = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    with torch.no_grad():
        return draft(embeds, hidden, torch.arange(1, T + 1), AttentionMetadata.for_prefill([5, 4]))


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    out = {}
    for layout in ("release", "hf"):
        for quant in ("none", "fp8"):
            make_tiny_draft(root / f"{layout}-{quant}", layout=layout, quant=quant, seed=7, draft=DRAFT)
            out[layout, quant] = root / f"{layout}-{quant}"
    return out


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_release_and_hf_layouts_load_to_identical_drafts(drafts, quant):
    a = load_draft(drafts["release", quant], TARGET, dtype=torch.float32)
    b = load_draft(drafts["hf", quant], TARGET, dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) == 2 + 2 * 11
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert torch.equal(_draft_output(a), _draft_output(b))


def test_fp8_draft_is_the_bf16_draft_within_e4m3_rounding(drafts):
    exact = load_draft(drafts["release", "none"], TARGET, dtype=torch.float32)
    fp8 = load_draft(drafts["release", "fp8"], TARGET, dtype=torch.float32)
    for name, w in exact.state_dict().items():
        q = fp8.state_dict()[name]
        if w.dim() == 1:  # norms are not quantised
            assert torch.equal(q, w), name
            continue
        # e4m3: 3 mantissa bits, so each value is within 2^-4 of itself (relative), or within half the smallest
        # subnormal step (scale * 2^-10) near zero
        scale = w.abs().max() / 448.0
        assert ((q - w).abs() <= w.abs() * 2**-4 + scale * 2**-9).all(), name
    out, ref = _draft_output(fp8), _draft_output(exact)
    # two random layers compound the per-weight rounding: measured 0.074 relative (seed 7)
    assert ((out - ref).norm() / ref.norm()).item() < 0.12


def test_fp8_kept_with_scales_computes_what_the_dequantised_draft_does(drafts):
    dequantised = load_draft(drafts["hf", "fp8"], TARGET, dtype=torch.float32)
    kept = load_draft(drafts["hf", "fp8"], TARGET, dtype=torch.float32, keep_fp8=True)
    assert kept.fc.weight.dtype == torch.float8_e4m3fn and kept.fc.weight_scale is not None
    assert kept.layers[1].mlp.gate_up.weight_scale.shape == (2, 1)  # w1 and w3 keep their own scales
    assert kept.layers[0].self_attn.o_proj.input_scale is not None
    assert torch.equal(_draft_output(kept), _draft_output(dequantised))


def test_a_draft_for_another_target_names_the_field(tmp_path):
    make_tiny_draft(tmp_path, layout="release", target=TinySpec(kv_lora_rank=16), draft=DRAFT)
    with pytest.raises(ConfigError, match=r"'kv_lora_rank': the draft has 16, its target 32"):
        load_draft(tmp_path, TARGET)
    make_tiny_draft(tmp_path / "hf", layout="hf", target=TinySpec(num_bpe_ranks=1000), draft=DRAFT)
    with pytest.raises(ConfigError, match=r"'vocab_size': the draft has 2000, its target 3000"):
        load_draft(tmp_path / "hf", TARGET)


@pytest.mark.parametrize(
    ("layout", "file", "drop", "named"),
    [
        ("release", "consolidated.safetensors", "layers.1.feed_forward.w3.weight", "layers.1.feed_forward.w3"),
        ("hf", "model.safetensors", "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.self_attn.kv_b_proj"),
        ("release", "consolidated.safetensors", "eagle_linear.qscale_weight", "eagle_linear.weight"),
    ],
)
def test_a_missing_tensor_is_named(tmp_path, layout, file, drop, named):
    make_tiny_draft(tmp_path, layout=layout, quant="fp8" if "qscale" in drop else "none", draft=DRAFT)
    tensors = load_file(str(tmp_path / file))
    del tensors[drop]
    save_file(tensors, str(tmp_path / file))
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_draft(tmp_path, TARGET)


def test_unexpected_and_shared_tensors(tmp_path):
    make_tiny_draft(tmp_path, layout="release", draft=DRAFT)
    tensors = load_file(str(tmp_path / "consolidated.safetensors"))
    # a copy of the target's embedding / head is skipped (the target's are used), an unknown tensor is not
    tensors["tok_embeddings.weight"] = torch.zeros(TARGET.vocab_size, TARGET.hidden_size, dtype=torch.bfloat16)
    tensors["output.weight"] = torch.zeros(TARGET.vocab_size, TARGET.hidden_size, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "consolidated.safetensors"))
    assert load_draft(tmp_path, TARGET).config.num_layers == 2
    tensors["layers.2.attention_norm.weight"] = torch.ones(TARGET.hidden_size, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.2\.attention_norm\.weight"):
        load_draft(tmp_path, TARGET)


def test_a_target_checkpoint_is_not_taken_for_a_draft(tmp_path):
    make_tiny_draft(tmp_path, layout="release", draft=DRAFT)
    params = json.loads((tmp_path / "params.json").read_text())
    params["moe"] = {"num_experts": 8}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="'moe'"):
        load_draft(tmp_path, TARGET)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(TinySpec(), fp8=False)))
    with pytest.raises(ConfigError, match="'architectures'"):
        load_draft(tmp_path, TARGET)


def test_save_draft_writes_the_released_layout_load_draft_reads(drafts, tmp_path):
    from small4.spec.loading import save_draft

    draft = load_draft(drafts["hf", "none"], TARGET)
    save_draft(draft, tmp_path)
    again = load_draft(tmp_path, TARGET)
    assert json.loads((tmp_path / "params.json").read_text())["hidden_dim"] == DRAFT.intermediate_size
    for name, w in draft.state_dict().items():
        assert torch.equal(again.state_dict()[name], w), name


def test_make_tiny_draft_command(tmp_path):
    from small4.cli import main

    assert main(["make-tiny-draft", str(tmp_path), "--layout", "hf", "--quant", "fp8", "--layers", "2"]) == 0
    assert load_draft(tmp_path, TARGET, keep_fp8=True).layers[1].self_attn.q_b_proj.weight.dtype == torch.float8_e4m3fn


def test_fp8_with_dynamic_activations_needs_no_activation_scales(drafts, tmp_path):
    make_tiny_draft(tmp_path, layout="release", quant="fp8", seed=7, draft=DRAFT)
    params = json.loads((tmp_path / "params.json").read_text())
    params["quantization"]["qscheme_act"] = "NO_SCALES"
    (tmp_path / "params.json").write_text(json.dumps(params))
    tensors = load_file(str(tmp_path / "consolidated.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if not k.endswith("qscale_act")}, str(tmp_path / "consolidated.safetensors")
    )
    a = load_draft(tmp_path, TARGET, dtype=torch.float32)
    b = load_draft(drafts["release", "fp8"], TARGET, dtype=torch.float32)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_fp8_follows_the_target_model(drafts, tmp_path):
    """With a loaded target, the draft takes its dtype and keeps FP8 exactly when the target kept its own."""
    from small4.weights.loader import load_model
    from small4.weights.tiny import make_tiny

    make_tiny(tmp_path, layout="hf", quant="fp8")
    kept = load_model(tmp_path, dtype=torch.float32, keep_fp8=True, progress=False)
    draft = load_draft(drafts["release", "fp8"], kept)
    assert draft.fc.weight.dtype == torch.float8_e4m3fn and draft.norm.weight.dtype == torch.float32
    plain = load_model(tmp_path, dtype=torch.bfloat16, progress=False)
    draft = load_draft(drafts["release", "fp8"], plain)
    assert draft.fc.weight.dtype == torch.bfloat16 and draft.fc.weight_scale is None
