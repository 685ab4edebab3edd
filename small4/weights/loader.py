"""Sharded safetensors -> a Mistral4Model, for the HF and the Mistral-native layouts.

Loading streams tensor by tensor, shard by shard, into parameters that were allocated once on the target device,
so the model never exists twice. FP8 weights are either dequantised (``keep_fp8=False``, the CPU path) or kept
FP8 with their scales for the GPU kernels. Every tensor must land somewhere and every parameter must be filled:
anything missing, unexpected, mis-shaped or of an unknown dtype fails with the tensor's name.

Vision tensors load into ``model.vision`` (always dequantised to the model dtype); native q/k rows are reordered
from interleaved to the rotate-half rope order the vision tower uses. A model built without a vision tower (a
text-only config) skips them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from small4.config import ModelConfig
from small4.model.mistral4 import Mistral4Model
from small4.model.vision import interleaved_to_rotate_half
from small4.weights.names import Destination, NameMapper, is_vision, split_role
from small4.weights.quant import FP8_DTYPE, dequantize_fp8

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: the message names the tensor or file."""


def list_shards(model_dir: Path) -> list[Path]:
    """Shard files from the index when there is one (HF or consolidated), else every *.safetensors."""
    for index_name in ("model.safetensors.index.json", "consolidated.safetensors.index.json"):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [model_dir / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{index_name} names shard {shard.name}, which does not exist")
            return shards
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{model_dir}: no .safetensors files")
    return shards


@dataclass
class _Pending:
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    name: str = ""


@dataclass
class _LoadState:
    pending: dict[str, _Pending] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)  # parameter -> elements written
    seen: set[str] = field(default_factory=set)  # destination keys, to catch a tensor given twice
    skipped_vision: int = 0


class WeightLoader:
    def __init__(self, model: Mistral4Model, config: ModelConfig, keep_fp8: bool = False) -> None:
        self.model, self.config, self.keep_fp8 = model, config, keep_fp8
        self.mapper = NameMapper(config)
        self.dtype = model.embed_tokens.weight.dtype
        self.modules = dict(model.named_modules())

    def load_dir(self, model_dir: Path, progress: bool = True) -> None:
        state = _LoadState()
        shards = list_shards(model_dir)
        for shard in tqdm(shards, desc="loading shards", unit="shard", disable=not progress):
            self._load_shard(shard, state)
        self._finish(state)

    def _load_shard(self, shard: Path, state: _LoadState) -> None:
        try:
            handle = safe_open(str(shard), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
            raise CheckpointError(f"{shard.name}: cannot read safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{shard.name}: tensor {name} cannot be read ({e})") from e
                self.load_tensor(name, tensor, state)

    def load_tensor(self, name: str, tensor: torch.Tensor, state: _LoadState) -> None:
        if is_vision(name) and self.model.vision is None:
            state.skipped_vision += 1
            return
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(f"tensor {name}: unsupported dtype {tensor.dtype}")
        if is_vision(name) and name.endswith(".bias"):
            self._load_bias(name, tensor, state)
            return
        base, role = split_role(name)
        dest = self.mapper.map(base)
        if dest is None or role == "unknown":
            raise CheckpointError(f"unexpected tensor {name}: no parameter of the model takes it")
        if role == "input_scale":
            self._store_input_scale(dest, tensor)
            return
        pending = state.pending.setdefault(base, _Pending(name=name))
        if role == "weight":
            pending.weight, pending.name = tensor, name
        else:
            pending.scale = tensor
        if pending.weight is None or (pending.weight.dtype == FP8_DTYPE and pending.scale is None):
            return
        del state.pending[base]
        self._store(dest, pending, state)

    def _load_bias(self, name: str, tensor: torch.Tensor, state: _LoadState) -> None:
        """Biases exist only in the vision projector (``multimodal_projector_bias`` / ``adapter_bias``)."""
        dest = self.mapper.map(name[: -len(".bias")])
        if dest is None or getattr(self.modules[dest.module], "bias", None) is None:
            raise CheckpointError(f"unexpected tensor {name}: no parameter of the model takes it")
        if tensor.dtype == FP8_DTYPE:
            raise CheckpointError(f"tensor {name}: unsupported dtype {tensor.dtype} for a bias")
        self._store(replace(dest, param="bias"), _Pending(weight=tensor, name=name), state)

    def _store(self, dest: Destination, pending: _Pending, state: _LoadState) -> None:
        module = self.modules[dest.module]
        param = getattr(module, dest.param)
        weight, scale = pending.weight, pending.scale
        target_shape = param[dest.index].shape if dest.index else param.shape
        if tuple(weight.shape) != tuple(target_shape):
            raise CheckpointError(f"tensor {pending.name}: shape {tuple(weight.shape)}, expected {tuple(target_shape)}")
        keep = self.keep_fp8 and dest.quantizable and weight.dtype == FP8_DTYPE
        if keep:
            param = self._as_fp8(module, dest)
            scale_holder = getattr(module, self._scale_attr(dest))
            view = scale_holder[dest.scale_index] if dest.scale_index else scale_holder
            view.copy_(scale.float().reshape(view.shape) if scale.numel() == view.numel() else scale.float())
        elif weight.dtype == FP8_DTYPE:
            weight = dequantize_fp8(weight, scale, torch.float32)
        if dest.interleaved_heads:
            weight = interleaved_to_rotate_half(weight, dest.interleaved_heads)
        key = self._key(dest)
        if key in state.seen:
            raise CheckpointError(f"tensor {pending.name}: given twice (or fused and unfused at once)")
        state.seen.add(key)
        with torch.no_grad():
            target = param[dest.index] if dest.index else param
            target.copy_(weight if keep else weight.to(self.dtype))
        param_name = f"{dest.module}.{dest.param}"
        state.filled[param_name] = state.filled.get(param_name, 0) + target.numel()

    def _as_fp8(self, module: torch.nn.Module, dest: Destination) -> torch.Tensor:
        """Re-allocates a parameter as FP8 (once) and gives it a scale tensor, for weights kept quantised."""
        param = getattr(module, dest.param)
        if param.dtype != FP8_DTYPE:
            new = torch.nn.Parameter(
                torch.empty(param.shape, dtype=FP8_DTYPE, device=param.device), requires_grad=False
            )
            setattr(module, dest.param, new)
            scale = torch.ones(dest.scale_shape, dtype=torch.float32, device=param.device)
            setattr(module, self._scale_attr(dest), scale)
            param = new
        return param

    @staticmethod
    def _scale_attr(dest: Destination) -> str:
        return "weight_scale" if dest.param == "weight" else f"{dest.param}_scale"

    def _store_input_scale(self, dest: Destination, tensor: torch.Tensor) -> None:
        """Static activation scales matter only to W8A8 kernels, so they are kept only with FP8 weights."""
        if self.keep_fp8 and dest.quantizable:
            module = self.modules[dest.module]
            name = "input_scale" if dest.param == "weight" else f"{dest.param}_input_scale"
            setattr(module, name, tensor.float().to(getattr(module, dest.param).device))

    @staticmethod
    def _key(dest: Destination) -> str:
        return f"{dest.module}.{dest.param}{dest.index}"

    def _missing(self, state: _LoadState) -> list[str]:
        """Parameters not completely written, named by the checkpoint tensor the layout expects for them."""
        by_param: dict[str, str] = {}
        for base in expected_bases(self.config):
            dest = self.mapper.map(base)
            if dest is not None and self._key(dest) not in state.seen:
                by_param.setdefault(f"{dest.module}.{dest.param}", base)
            if dest is not None and dest.module.startswith("vision."):
                by_param.setdefault(f"{dest.module}.bias", f"{base}.bias")
        missing = []
        for name, param in self.model.named_parameters():
            if state.filled.get(name, 0) < param.numel():
                missing.append(by_param.get(name, name))
        return missing

    def _finish(self, state: _LoadState) -> None:
        if state.pending:
            base, p = next(iter(state.pending.items()))
            what = "its FP8 scale" if p.weight is not None else "the weight for its scale"
            raise CheckpointError(f"tensor {p.name or base}: {what} is missing from the checkpoint")
        missing = self._missing(state)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"missing tensor {missing[0]}{more}")
        if state.skipped_vision:
            log.info("skipped %d vision tensors: the model has no vision tower", state.skipped_vision)


def expected_bases(config: ModelConfig) -> list[str]:
    """Base names (in the checkpoint's own layout) of every tensor the decoder and vision tower need."""
    return _text_bases(config) + _vision_bases(config)


def _vision_bases(config: ModelConfig) -> list[str]:
    v = config.vision
    if v is None:
        return []
    if config.layout == "mistral":
        names = ["vision_encoder.patch_conv", "vision_encoder.ln_pre", "pre_mm_projector_norm"]
        names += ["patch_merger.merging_layer", "vision_language_adapter.w_in", "vision_language_adapter.w_out"]
        block = ["attention_norm", "ffn_norm", *(f"attention.w{x}" for x in "qkvo")]
        block += [f"feed_forward.w{x}" for x in "123"]
        return names + [f"vision_encoder.transformer.layers.{i}.{n}" for i in range(v.num_layers) for n in block]
    t, m = "model.vision_tower.", "model.multi_modal_projector."
    names = [f"{t}patch_conv", f"{t}ln_pre"] + [f"{m}{n}" for n in ("norm", "patch_merger.merging_layer")]
    names += [f"{m}linear_1", f"{m}linear_2"]
    block = ["attention_norm", "ffn_norm", *(f"attention.{x}_proj" for x in "qkvo")]
    block += [f"feed_forward.{x}_proj" for x in ("gate", "up", "down")]
    return names + [f"{t}transformer.layers.{i}.{n}" for i in range(v.num_layers) for n in block]


def _text_bases(config: ModelConfig) -> list[str]:
    t, native = config.text, config.layout == "mistral"
    if native:
        names = ["tok_embeddings", "norm", "output"]
        attn = ["attention.wq_a", "attention.q_a_norm", "attention.wq_b"] if t.q_lora_rank else ["attention.wq"]
        attn += ["attention.wkv_a_with_mqa", "attention.kv_a_norm", "attention.wkv_b", "attention.wo"]
        per_layer = ["attention_norm", "ffn_norm", "gate", *attn]
        per_layer += [f"experts.{e}.{w}" for e in range(t.num_experts) for w in ("w1", "w2", "w3")]
        if t.num_shared_experts:
            per_layer += [f"shared_experts.{w}" for w in ("w1", "w2", "w3")]
        return names + [f"layers.{i}.{n}" for i in range(t.num_layers) for n in per_layer]
    p = "model.language_model." if config.vision is not None else "model."
    names = [f"{p}embed_tokens", f"{p}norm", "lm_head"]
    attn = ["q_a_proj", "q_a_layernorm", "q_b_proj"] if t.q_lora_rank else ["q_proj"]
    attn += ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    per_layer = [
        "input_layernorm",
        "post_attention_layernorm",
        "mlp.gate",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    ] + [f"self_attn.{a}" for a in attn]
    if t.num_shared_experts:
        per_layer += [f"mlp.shared_experts.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
    return names + [f"{p}layers.{i}.{n}" for i in range(t.num_layers) for n in per_layer]


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
    progress: bool = True,
) -> Mistral4Model:
    """Builds the decoder from ``model_dir`` (config + shards) on ``device`` without a second copy."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = Mistral4Model(config)
    model = model.to_empty(device=device).to(dtype)
    WeightLoader(model, config, keep_fp8=keep_fp8).load_dir(model_dir, progress=progress)
    return model.eval()
