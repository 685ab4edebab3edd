"""Each rank reads only its own slices of the checkpoint (``safe_open(...).get_slice``), never the whole of it.

``ShardedWeightLoader`` is the single-device ``WeightLoader`` with two differences: tensor names map to this
rank's destinations (``ShardPlan.local``), and each tensor is read through the rank's ``Cut`` of it (its FP8 scale
and activation scale cut to match; NVFP4 packed bytes and 16-value block scales cut alike, divisors replicated).
Tensors of other ranks' experts are not read at all. ``bytes_read`` counts what came off the files, so a test can
check that a rank read its share and not more.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from small4.config import AttentionScaleMode, ConfigError, ModelConfig, load_model_config
from small4.kernels.backend import kernel_backend
from small4.kernels.nvfp4 import FP4_BLOCK
from small4.model.mistral4 import Mistral4Model
from small4.parallel.config import Range
from small4.parallel.plan import Cut, ShardPlan, scale_cut
from small4.parallel.tp import parallelize
from small4.weights.loader import CheckpointError, WeightLoader, list_shards, open_shard
from small4.weights.names import Destination, NameMapper, is_vision, split_role


class _LocalMapper(NameMapper):
    def __init__(self, config: ModelConfig, plan: ShardPlan) -> None:
        super().__init__(config)
        self.plan = plan

    def global_map(self, base: str) -> Destination | None:
        return super().map(base)

    def map(self, base: str) -> Destination | None:
        dest = super().map(base)
        return None if dest is None else self.plan.local(dest)


def _read(f, name: str, piece_reader, cut: Cut | None, shape: list[int]) -> torch.Tensor:
    """Reads a whole tensor, or the pieces of ``cut`` concatenated along its dimension."""
    if cut is None:
        return f.get_tensor(name)
    parts = []
    for p in cut.pieces:
        index = tuple(slice(p.start, p.stop) if d == cut.dim else slice(None) for d in range(len(shape)))
        parts.append(piece_reader[index])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cut.dim)


class ShardedWeightLoader(WeightLoader):
    def __init__(
        self, model: Mistral4Model, config: ModelConfig, plan: ShardPlan, keep_fp8: bool = False, keep_nvfp4=False
    ) -> None:
        super().__init__(model, config, keep_fp8=keep_fp8, keep_nvfp4=keep_nvfp4)
        self.mapper = _LocalMapper(config, plan)
        self.plan = plan
        self.bytes_read = 0
        self.bytes_skipped = 0
        self._weight_shapes: dict[str, list[int]] = {}

    def load_dir(self, model_dir: Path, progress: bool = True) -> None:
        for shard in list_shards(model_dir):  # headers only: every weight's full shape, for its scale's cut
            with open_shard(shard) as f:
                for name in f.keys():
                    base, role = split_role(name)
                    if role == "weight":
                        self._weight_shapes[base] = f.get_slice(name).get_shape()
        super().load_dir(model_dir, progress=progress)

    def _load_shard(self, shard: Path, state) -> None:
        with open_shard(shard) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = sl.get_shape()
                cut = self._cut(name, shape)
                if cut == "skip":
                    self.bytes_skipped += _nbytes(shape, sl.get_dtype())
                    continue
                try:
                    tensor = _read(f, name, sl, cut, shape)
                except Exception as e:
                    raise CheckpointError(f"{shard.name}: tensor {name} cannot be read ({e})") from e
                self.bytes_read += tensor.numel() * tensor.element_size()
                self.load_tensor(name, tensor, state)

    def _cut(self, name: str, shape: list[int]) -> Cut | None | str:
        """This rank's cut of tensor ``name``: None (whole), a Cut, or "skip" (another rank's expert)."""
        if is_vision(name):
            return None if self.model.vision is not None else "skip"  # a worker without the vision tower
        base, role = split_role(name)
        dest = self.mapper.global_map(base)
        if dest is None or role == "unknown":
            return None  # the base loader names the unexpected tensor
        if self.plan.local(dest) is None:
            return "skip"
        cut = self.plan.cut(dest)
        if cut is None or role == "weight":
            return cut
        if role in ("packed", "block_scale", "global_scale", "input_global_scale"):
            return nvfp4_cut(cut, role, len(shape))
        weight_shape = self._weight_shapes.get(base)
        return None if weight_shape is None else scale_cut(cut, tuple(shape), tuple(weight_shape))


def nvfp4_cut(cut: Cut, role: str, ndim: int) -> Cut | None:
    """The cut of one NVFP4 tensor that matches ``cut`` of its dense weight. Rows are cut alike in the packed bytes
    and the block scales; a cut of the input (last) dimension becomes bytes (2 values each) and whole 16-value scale
    blocks, so it must fall on block boundaries. The per-tensor divisors are replicated (read whole)."""
    if role in ("global_scale", "input_global_scale"):
        return None
    if cut.dim != ndim - 1:
        return cut
    per = 2 if role == "packed" else FP4_BLOCK
    for p in cut.pieces:
        if p.start % FP4_BLOCK or p.stop % FP4_BLOCK:
            raise ValueError(f"a split at {p.start}:{p.stop} falls inside NVFP4's {FP4_BLOCK}-value scale blocks")
    return Cut(cut.dim, tuple(Range(p.start // per, p.stop // per) for p in cut.pieces))


_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "U8": 1, "I8": 1}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _ITEMSIZE.get(dtype, 1)


def load_sharded_model(
    model_dir: str | Path,
    plan: ShardPlan,
    group=None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
    vision: bool = True,
    attention_scale_mscale: AttentionScaleMode = "auto",
    keep_nvfp4: bool | None = None,
) -> tuple[Mistral4Model, ShardedWeightLoader]:
    """One rank's shard of the model: built on meta, parallelized, allocated once, filled with its slices.
    ``vision=False`` leaves the vision tower out (workers: rank 0 encodes images and broadcasts the embeddings).
    ``keep_nvfp4`` None: NVFP4 routed experts stay 4-bit where the Triton kernels run (as ``load_model``)."""
    model_dir = Path(model_dir)
    config = load_model_config(model_dir, attention_scale_mscale)
    if config.quant.method == "nvfp4" and not plan.expert_parallel and plan.inter.size % FP4_BLOCK:
        raise ConfigError(
            f"NVFP4 experts split over {plan.moe_parts} ranks leave {plan.inter.size} intermediate columns each, "
            f"not whole {FP4_BLOCK}-value scale blocks (use --enable-expert-parallel)"
        )
    if keep_nvfp4 is None:
        keep_nvfp4 = kernel_backend(torch.device(device)) == "triton"
    if not vision:
        config = replace(config, vision=None)
    with torch.device("meta"):
        model = Mistral4Model(config)
    parallelize(model, plan, group)
    model = model.to_empty(device=device).to(dtype)
    loader = ShardedWeightLoader(model, config, plan, keep_fp8=keep_fp8, keep_nvfp4=keep_nvfp4)
    loader.load_dir(model_dir, progress=False)
    model.set_backend(kernel_backend(torch.device(device)))
    return model.eval(), loader
