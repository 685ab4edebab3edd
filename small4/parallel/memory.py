"""`small4 plan`: what one rank holds, before anything is launched. Pure arithmetic over the real module shapes.

The model is built on the meta device (no memory) and put through the same ``parallelize`` transform a rank
uses, so the per-rank parameter shapes are exactly the ones that would be loaded. Bytes: FP8 checkpoints keep
attention and expert matrices in e4m3 on a GPU (1 byte, plus one float32 scale each), everything else (norms,
router, embeddings, lm_head, vision tower) in the serving dtype. The latent cache is replicated on every rank
(every rank attends over all tokens with its own heads): ``num_layers x (kv_lora_rank + qk_rope_head_dim)``
values per token, so the context that fits is what memory leaves after the weights and the activation reserve.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from small4.config import ModelConfig, load_model_config, parse_bytes
from small4.model.layers import Linear
from small4.model.mistral4 import Mistral4Model
from small4.model.moe import RoutedExperts
from small4.parallel.config import ParallelConfig
from small4.parallel.plan import ShardPlan
from small4.parallel.tp import parallelize

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}


@dataclass(frozen=True)
class RankPlan:
    tensor_parallel_size: int
    expert_parallel_size: int
    parameters: int  # this rank's share
    total_parameters: int  # the whole model
    weight_bytes: int  # this rank's
    activation_reserve_bytes: int
    cache_bytes_per_token: int  # every rank holds the whole latent cache
    usable_bytes: int  # gpu_memory x utilisation
    cache_tokens: int  # latent-cache tokens that fit beside the weights (0: the weights do not fit)
    max_context: int  # min(cache_tokens, max_position_embeddings)

    @property
    def fits(self) -> bool:
        return self.cache_tokens > 0


def _weight_bytes(model: Mistral4Model, fp8: bool, dtype_bytes: int) -> tuple[int, int]:
    """(parameters, bytes) of a (meta) model: quantisable decoder matrices at 1 byte + a scale when ``fp8``."""
    params = bytes_ = 0
    for name, module in model.named_modules():
        quantised = fp8 and not name.startswith("vision") and isinstance(module, Linear | RoutedExperts)
        for p in module.parameters(recurse=False):
            params += p.numel()
            bytes_ += p.numel() * (1 if quantised else dtype_bytes)
            if quantised:  # per-tensor (per expert and half for experts) float32 scales
                bytes_ += 4 * (p.shape[0] * 2 if isinstance(module, RoutedExperts) else 1)
    return params, bytes_


def activation_reserve(config: ModelConfig, max_num_batched_tokens: int) -> int:
    """The head-room ``ModelRunner._activation_reserve`` keeps for one step (the same formula)."""
    t = config.text
    return (
        max_num_batched_tokens
        * 4
        * (t.vocab_size + 8 * t.hidden_size + 4 * t.moe_intermediate_size * t.num_experts_per_tok)
    )


def plan_rank(
    config: ModelConfig,
    parallel: ParallelConfig,
    gpu_memory: int,
    utilization: float = 0.9,
    dtype: str = "bfloat16",
    kv_cache_dtype: str = "auto",
    max_num_batched_tokens: int = 8192,
) -> RankPlan:
    """The heaviest rank's numbers: rank 0's (the same shards as every rank, plus the vision tower, which only
    rank 0 holds)."""
    fp8 = config.quant.method == "fp8"
    with torch.device("meta"):
        full = Mistral4Model(config)
        total, _ = _weight_bytes(full, fp8, _ITEMSIZE[dtype])
        model = parallelize(Mistral4Model(config), ShardPlan(config.text, parallel, 0))
    params, weight_bytes = _weight_bytes(model, fp8, _ITEMSIZE[dtype])
    t = config.text
    per_token = t.num_layers * t.latent_dim * _ITEMSIZE[dtype if kv_cache_dtype == "auto" else kv_cache_dtype]
    usable = int(gpu_memory * utilization)
    reserve = activation_reserve(config, max_num_batched_tokens)
    tokens = max(0, (usable - weight_bytes - reserve) // per_token)
    return RankPlan(
        parallel.tensor_parallel_size,
        parallel.expert_parallel_size,
        params,
        total,
        weight_bytes,
        reserve,
        per_token,
        usable,
        tokens,
        min(tokens, t.max_position_embeddings),
    )


def format_plan(plan: RankPlan, world_size: int) -> str:
    gb = 1e9
    lines = [
        f"ranks: {world_size} (tensor parallel {plan.tensor_parallel_size}, expert parallel "
        f"{plan.expert_parallel_size})",
        f"parameters: {plan.total_parameters / 1e9:.1f}B in all, {plan.parameters / 1e9:.2f}B per rank",
        f"weights per rank: {plan.weight_bytes / gb:.2f} GB",
        f"activation reserve per rank: {plan.activation_reserve_bytes / gb:.2f} GB",
        f"usable memory per rank: {plan.usable_bytes / gb:.2f} GB",
        f"latent cache: {plan.cache_bytes_per_token} bytes per token, replicated on every rank",
    ]
    if not plan.fits:
        lines.append("does NOT fit: the weights and the activation reserve exceed the usable memory")
    else:
        lines.append(f"latent-cache tokens that fit: {plan.cache_tokens:,}")
        lines.append(f"largest context: {plan.max_context:,} tokens")
    return "\n".join(lines)


def _plan_command(args: argparse.Namespace) -> int:
    config = load_model_config(Path(args.model))
    tp = args.tensor_parallel_size
    parallel = ParallelConfig(tp, tp if args.enable_expert_parallel else 1)
    plan = plan_rank(
        config,
        parallel,
        args.gpu_memory,
        args.gpu_memory_utilization,
        args.dtype,
        args.kv_cache_dtype,
        args.max_num_batched_tokens,
    )
    print(json.dumps({"world_size": parallel.world_size, **asdict(plan)}) if args.json else format_plan(plan, tp))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-rank weight bytes, latent-cache tokens and the largest context that fit")
    p.add_argument("model", help="checkpoint directory (only its config is read)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--gpu-memory", type=parse_bytes, default=parse_bytes("80GiB"), help="per GPU, e.g. 80GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float32", "fp8"], default="auto")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan_command)
