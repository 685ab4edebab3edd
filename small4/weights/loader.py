"""Sharded safetensors -> a Mistral4Model, for the HF and the Mistral-native layouts.

Loading streams tensor by tensor, shard by shard, into parameters that were allocated once on the target device,
so the model never exists twice. FP8 weights are either dequantised (``keep_fp8=False``, the CPU path) or kept
FP8 with their scales for the GPU kernels; block-scaled FP8 (the config's ``weight_block_size``) is always
dequantised, with exactly that block size. NVFP4 tensors (``weight_packed`` + ``weight_scale`` +
``weight_global_scale``) are dequantised through kernels/nvfp4.py, except the routed experts' under
``keep_nvfp4`` (default: wherever the Triton kernels run), which stay 4-bit in ``RoutedExperts``. Every tensor
must land somewhere and every parameter must be filled: anything missing, unexpected, mis-shaped or of an unknown
dtype fails with the tensor's name.

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

from small4.config import AttentionScaleMode, ModelConfig, load_model_config
from small4.kernels.backend import kernel_backend
from small4.kernels.fp8 import FP8_DTYPE, dequantize_fp8
from small4.kernels.nvfp4 import FP4_BLOCK, dequantize_nvfp4
from small4.model.mistral4 import Mistral4Model
from small4.model.vision import interleaved_to_rotate_half
from small4.weights.names import Destination, NameMapper, is_vision, split_role

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: the message names the tensor or file."""


NVFP4_ROLES = ("packed", "block_scale", "global_scale", "input_global_scale")


def list_shards(model_dir: Path, layout: str | None = None) -> list[Path]:
    """Shard files of ``layout`` ("hf": model*.safetensors, "mistral": consolidated*.safetensors; a directory may
    hold both sets) from its index when there is one, else by name, else every *.safetensors."""
    indexes = ("model.safetensors.index.json", "consolidated.safetensors.index.json")
    stems = ("model", "consolidated")
    if layout == "mistral":
        indexes, stems = indexes[::-1], stems[::-1]
    for index_name in indexes[:1] if layout else indexes:
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [model_dir / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{index_name} names shard {shard.name}, which does not exist")
            return shards
    shards = sorted(model_dir.glob(f"{stems[0]}*.safetensors")) if layout else []
    shards = shards or sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{model_dir}: no .safetensors files")
    return shards


def open_shard(shard: Path):
    """``safe_open`` on one shard; a truncated or corrupt header is a ``CheckpointError`` naming the file."""
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{shard.name}: cannot read safetensors file ({e})") from e


@dataclass
class _Pending:
    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    name: str = ""
    nvfp4: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor, until the triple is complete


@dataclass
class _LoadState:
    pending: dict[str, _Pending] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)  # parameter -> elements written
    seen: set[str] = field(default_factory=set)  # destination keys, to catch a tensor given twice
    skipped_vision: int = 0


class WeightLoader:
    def __init__(
        self, model: Mistral4Model, config: ModelConfig, keep_fp8: bool = False, keep_nvfp4: bool = False
    ) -> None:
        self.model, self.config, self.keep_fp8, self.keep_nvfp4 = model, config, keep_fp8, keep_nvfp4
        self.block = config.quant.weight_block_size
        self.mapper = NameMapper(config)
        self.dtype = model.embed_tokens.weight.dtype
        self.modules = dict(model.named_modules())

    def load_dir(self, model_dir: Path, progress: bool = True) -> None:
        state = _LoadState()
        shards = list_shards(model_dir, self.config.layout)
        for shard in tqdm(shards, desc="loading shards", unit="shard", disable=not progress):
            self._load_shard(shard, state)
        self._finish(state)

    def _load_shard(self, shard: Path, state: _LoadState) -> None:
        with open_shard(shard) as f:
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
        packed = tensor.dtype == torch.uint8 and name.endswith(".weight_packed")
        if tensor.dtype not in SUPPORTED_DTYPES and not packed:
            raise CheckpointError(f"tensor {name}: unsupported dtype {tensor.dtype}")
        if is_vision(name) and name.endswith(".bias"):
            self._load_bias(name, tensor, state)
            return
        base, role = split_role(name)
        dest = self.mapper.map(base)
        if dest is None or role == "unknown":
            raise CheckpointError(f"unexpected tensor {name}: no parameter of the model takes it")
        if role in NVFP4_ROLES:
            self._load_nvfp4_part(name, base, role, dest, tensor, state)
            return
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
        keep = self.keep_fp8 and dest.quantizable and weight.dtype == FP8_DTYPE and self.block is None
        if keep:
            param = self._as_fp8(module, dest)
            scale_holder = getattr(module, self._scale_attr(dest))
            view = scale_holder[dest.scale_index] if dest.scale_index else scale_holder
            view.copy_(scale.float().reshape(view.shape) if scale.numel() == view.numel() else scale.float())
        elif weight.dtype == FP8_DTYPE:
            try:
                weight = dequantize_fp8(weight, scale, torch.float32, block=self.block)
            except ValueError as e:
                raise CheckpointError(f"tensor {pending.name}: {e}") from e
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

    def _load_nvfp4_part(
        self, name: str, base: str, role: str, dest: Destination, tensor: torch.Tensor, state: _LoadState
    ) -> None:
        """One of an NVFP4 weight's tensors; the weight is stored once packed, block scale and divisor are in."""
        if self.config.quant.method != "nvfp4":
            raise CheckpointError(f"unexpected tensor {name}: NVFP4 tensor, but the config is not nvfp4-pack-quantized")
        if not dest.quantizable:
            raise CheckpointError(f"tensor {name}: NVFP4 is not supported for {dest.module} (only linear layers)")
        want = {"packed": torch.uint8, "block_scale": FP8_DTYPE}.get(role, torch.float32)
        if tensor.dtype != want:
            raise CheckpointError(f"tensor {name}: dtype {tensor.dtype}, expected {want}")
        if role in ("global_scale", "input_global_scale"):
            if tensor.numel() != 1 or not bool(torch.isfinite(tensor).all() and (tensor > 0).all()):
                raise CheckpointError(f"tensor {name}: a global scale must be one positive finite value")
        if role == "input_global_scale":
            # Static activation divisor of W4A4 kernels; small4 runs NVFP4 weight-only (BF16 activations).
            return
        pending = state.pending.setdefault(base, _Pending(name=name))
        pending.nvfp4[role] = tensor
        if role == "packed":
            pending.name = name
        if len(pending.nvfp4) < 3:
            return
        del state.pending[base]
        self._store_nvfp4(dest, pending, state)

    def _store_nvfp4(self, dest: Destination, pending: _Pending, state: _LoadState) -> None:
        module = self.modules[dest.module]
        packed, block, divisor = (pending.nvfp4[r] for r in ("packed", "block_scale", "global_scale"))
        param = getattr(module, f"{dest.param}_packed", None)
        if param is None:
            param = getattr(module, dest.param)
            target = tuple(param[dest.index].shape if dest.index else param.shape)
        else:  # already 4-bit: the dense shape is the packed one with two values per byte
            target = tuple(param[dest.index].shape[:-1]) + (2 * param.shape[-1],)
        out, inn = target[-2], target[-1]
        if tuple(packed.shape) != (*target[:-1], inn // 2) or tuple(block.shape) != (*target[:-1], inn // FP4_BLOCK):
            raise CheckpointError(
                f"tensor {pending.name}: packed {tuple(packed.shape)} / scale {tuple(block.shape)} do not fit the "
                f"weight {target} (expected {(*target[:-1], inn // 2)} / {(*target[:-1], inn // FP4_BLOCK)})"
            )
        if self.keep_nvfp4 and dest.module.endswith("mlp.experts"):
            self._store_packed_expert(module, dest, pending, state, out)
            return
        weight = dequantize_nvfp4(packed, block, divisor.reshape(()), torch.float32)
        self._store(dest, _Pending(weight=weight, name=pending.name), state)

    def _store_packed_expert(
        self, module: torch.nn.Module, dest: Destination, pending: _Pending, state: _LoadState, rows: int
    ) -> None:
        """One expert's gate, up or down projection into RoutedExperts' 4-bit tensors (kept packed)."""
        if not dest.index:
            raise CheckpointError(f"tensor {pending.name}: fused NVFP4 expert tensors are not supported")
        key = self._key(dest)
        if key in state.seen:
            raise CheckpointError(f"tensor {pending.name}: given twice")
        state.seen.add(key)
        if getattr(module, "w13_packed", None) is None:
            module.to_nvfp4()
        e = dest.index[0]
        packed, block, divisor = (pending.nvfp4[r] for r in ("packed", "block_scale", "global_scale"))
        with torch.no_grad():
            getattr(module, f"{dest.param}_packed")[dest.index].copy_(packed)
            getattr(module, f"{dest.param}_block_scale")[dest.index].copy_(block)
            if dest.param == "w13":
                module.w13_global[e, dest.scale_index[1]] = divisor.reshape(()).float()
            else:
                module.w2_global[e] = divisor.reshape(()).float()
        name = f"{dest.module}.{dest.param}_packed"
        state.filled[name] = state.filled.get(name, 0) + packed.numel()

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
            if p.nvfp4:
                lacking = sorted({"packed", "block_scale", "global_scale"} - set(p.nvfp4))
                what = f"its NVFP4 {' and '.join(lacking)}"
            else:
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
    keep_nvfp4: bool | None = None,
    attention_scale_mscale: AttentionScaleMode = "auto",
) -> Mistral4Model:
    """Builds the decoder from ``model_dir`` (config + shards) on ``device`` without a second copy.

    ``keep_nvfp4`` None: NVFP4 routed experts stay 4-bit where the Triton kernels run (they dequantise FP4 tiles
    in-kernel), and are dequantised at load elsewhere. ``attention_scale_mscale``: see
    ``config.decide_attention_scale``."""
    model_dir = Path(model_dir)
    config = load_model_config(model_dir, attention_scale_mscale)
    if keep_nvfp4 is None:
        keep_nvfp4 = kernel_backend(torch.device(device)) == "triton"
    with torch.device("meta"):
        model = Mistral4Model(config)
    model = model.to_empty(device=device).to(dtype)
    WeightLoader(model, config, keep_fp8=keep_fp8, keep_nvfp4=keep_nvfp4).load_dir(model_dir, progress=progress)
    model.set_backend(kernel_backend(torch.device(device)))
    return model.eval()
