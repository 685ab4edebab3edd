"""Each rank reads its own slices of the checkpoint and nothing more (bytes counted as they come off the files).

The expectation is worked out here from the tensor names alone: with TP=2 + EP every split tensor (attention
q_b / kv_b / o, embeddings, lm_head, routed and shared experts, and every per-expert scale) costs a rank half its
bytes, everything else (norms, router, q_a / kv_a, per-tensor scales, vision) its whole bytes.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from small4.config import load_model_config
from small4.parallel.config import ParallelConfig
from small4.parallel.loading import load_sharded_model
from small4.parallel.plan import ShardPlan
from small4.weights.loader import list_shards, load_model
from small4.weights.names import is_vision
from small4.weights.tiny import make_tiny

SPLIT = re.compile(
    r"(q_b_proj|wq_b|kv_b_proj|wkv_b|o_proj|\.wo\.|embed_tokens|tok_embeddings|lm_head|^output|experts\.)"
)


def _tensor_bytes(model_dir) -> dict[str, int]:
    out = {}
    for shard in list_shards(model_dir):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.numel() * t.element_size()
    return out


def _is_split(name: str, scalar: bool) -> bool:
    """A per-tensor scale (one float32) is read whole, unless it belongs to one (native) expert."""
    if name.startswith(("model.vision_tower", "model.multi_modal_projector", "vision_", "patch_merger", "pre_mm")):
        return False
    per_expert = re.search(r"experts\.\d+\.", name) is not None  # native: another rank's experts are never read
    return bool(SPLIT.search(name)) and (per_expert or not scalar)


@pytest.mark.parametrize("layout,quant", [("hf", "none"), ("hf", "fp8"), ("mistral", "fp8"), ("mistral", "nvfp4")])
def test_each_rank_reads_only_its_share(tmp_path, layout, quant):
    model_dir = make_tiny(tmp_path / "tiny", layout=layout, quant=quant)
    config = load_model_config(model_dir)
    sizes = _tensor_bytes(model_dir)
    split = sum(b for n, b in sizes.items() if _is_split(n, scalar=b <= 4))
    whole = sum(sizes.values()) - split
    full = load_model(model_dir, torch.float32, progress=False)
    for rank in range(2):
        plan = ShardPlan(config.text, ParallelConfig(2, 2), rank)
        model, loader = load_sharded_model(model_dir, plan, dtype=torch.float32)
        print(f"{layout} {quant} rank {rank}: read {loader.bytes_read} of {sum(sizes.values())} bytes")
        assert loader.bytes_read == whole + split // 2
        # and the slices are the right ones: rank r's routed experts are experts [4r, 4r + 4) of the full model
        E = config.text.num_experts // 2
        local, glob = model.layers[1].mlp.experts, full.layers[1].mlp.experts
        torch.testing.assert_close(
            local.dense(torch.float32)[0], glob.dense(torch.float32)[0][rank * E : (rank + 1) * E]
        )
        V = config.text.vocab_size // 2
        torch.testing.assert_close(model.lm_head.weight, full.lm_head.weight[rank * V : (rank + 1) * V])
    # a worker rank leaves the vision tower out (rank 0 encodes the images): it does not read those bytes either
    vision = sum(b for n, b in sizes.items() if is_vision(n))
    assert vision > 0
    model, loader = load_sharded_model(model_dir, ShardPlan(config.text, ParallelConfig(2, 2), 1), vision=False)
    assert model.vision is None and loader.bytes_read == whole - vision + split // 2


@pytest.mark.parametrize("split", [ParallelConfig(2, 1), ParallelConfig(2, 2)], ids=["tp2", "tp2+ep"])
def test_nvfp4_experts_are_cut_in_packed_bytes_and_scale_blocks(tmp_path, split):
    """NVFP4 experts kept 4-bit: under TP each rank's gate and up rows and its down projection's input columns
    (bytes of two values, scale blocks of 16) of every expert, under EP whole experts; divisors replicated."""
    model_dir = make_tiny(tmp_path / "tiny", layout="mistral", quant="nvfp4")
    config = load_model_config(model_dir)
    full = load_model(model_dir, torch.float32, keep_nvfp4=True, progress=False).layers[1].mlp.experts
    I = config.text.moe_intermediate_size
    for rank in range(2):
        plan = ShardPlan(config.text, split, rank)
        model, _ = load_sharded_model(model_dir, plan, dtype=torch.float32, keep_nvfp4=True)
        local = model.layers[1].mlp.experts
        e, i = slice(plan.experts.start, plan.experts.stop), plan.inter
        rows = torch.cat([torch.arange(i.start, i.stop), torch.arange(I + i.start, I + i.stop)])  # gate, up
        for name, want in [
            ("w13_packed", full.w13_packed[e][:, rows]),
            ("w13_block_scale", full.w13_block_scale[e][:, rows]),
            ("w2_packed", full.w2_packed[e][..., i.start // 2 : i.stop // 2]),
            ("w2_block_scale", full.w2_block_scale[e][..., i.start // 16 : i.stop // 16]),
            ("w13_global", full.w13_global[e]),
            ("w2_global", full.w2_global[e]),
        ]:
            got = getattr(local, name)
            assert got.shape == want.shape and bool((got.view(torch.uint8) == want.view(torch.uint8)).all()), name
        w13, w2 = full.dense(torch.float32)
        got13, got2 = local.dense(torch.float32)
        torch.testing.assert_close(got13, w13[e][:, rows], rtol=0, atol=0)
        torch.testing.assert_close(got2, w2[e][..., i.start : i.stop], rtol=0, atol=0)


def test_nvfp4_split_inside_a_scale_block_is_refused(tmp_path):
    from small4.config import ConfigError

    model_dir = make_tiny(tmp_path / "tiny", layout="mistral", quant="nvfp4")
    config = load_model_config(model_dir)
    with pytest.raises(ConfigError, match="16-value scale blocks"):  # 32 columns over 4 ranks: 8 each
        load_sharded_model(model_dir, ShardPlan(config.text, ParallelConfig(4, 1), 0), dtype=torch.float32)
