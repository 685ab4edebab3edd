"""transformers beside small4 in ``small4 bench full --reference``: the same random weights (dequantised to BF16)
through ``Mistral4ForCausalLM.generate``, when transformers is installed and the copy fits."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from small4.bench.harness import HEADROOM_BYTES, Bench
from small4.bench.timing import (
    free_bytes,
    gib,
    is_oom,
    time_host,
)
from small4.kernels.fp8 import dequantize_fp8
from small4.weights.tiny import hf_config


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference_skip_reason(bench: Bench) -> str | None:
    if bench.dist is not None:
        return "not with tensor/expert parallelism (transformers runs on one device)"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install small4[test])"
    need = sum(p.numel() for p in bench.model.parameters()) * torch.empty((), dtype=bench.runner.dtype).element_size()
    free = free_bytes(bench.device)
    if free is not None and need + 4 * HEADROOM_BYTES > free:
        return f"a dense {bench.runner.dtype} copy for transformers needs {gib(need)}, {gib(free)} free"
    return None


def build_reference(bench: Bench) -> Any:
    """transformers ``Mistral4ForCausalLM`` with small4's weights (dequantised) copied in by checkpoint name."""
    from transformers import Mistral4Config, Mistral4ForCausalLM

    from small4.weights.names import NameMapper, split_role

    text_cfg = hf_config(replace(bench.spec, num_layers=bench.layers), fp8=False)["text_config"]
    text_cfg.pop("model_type")
    cfg = Mistral4Config(**text_cfg)
    with _default_dtype(bench.runner.dtype), torch.device(bench.device):
        hf = Mistral4ForCausalLM(cfg).eval()
    for module in hf.modules():  # small4's softmax scale (transformers reads mscale_all_dim differently: README)
        if hasattr(module, "scaling") and hasattr(module, "qk_head_dim"):
            module.scaling = bench.runner.config.text.softmax_scale
    mapper, modules = NameMapper(bench.runner.config), dict(bench.model.named_modules())
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            base, role = split_role(name)
            dest = mapper.map(base)
            if dest is None or role != "weight":
                raise RuntimeError(f"transformers tensor {name} has no small4 counterpart")
            module = modules[dest.module]
            if dest.param == "weight" and hasattr(module, "dense_weight"):
                src = module.dense_weight(tensor.dtype)
            elif dest.param in ("w13", "w2") and not dest.index:
                _copy_experts(tensor, getattr(module, dest.param), getattr(module, f"{dest.param}_scale"))
                continue
            elif dest.param in ("w13", "w2"):
                src = module.dense(tensor.dtype)[0 if dest.param == "w13" else 1]
            else:
                src = getattr(module, dest.param)
            tensor.copy_(src[dest.index] if dest.index else src)
    return hf


def _copy_experts(out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Stacked expert weights into ``out``, dequantised one expert at a time (no full float32 copy at once)."""
    for e in range(weight.shape[0]):
        out[e].copy_(weight[e] if scale is None else dequantize_fp8(weight[e], scale[e], out.dtype))


def run_reference(bench: Bench, batch_sizes: list[int], prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Decode tokens/s of ``generate``: (time of N new tokens - time of 1) / (N - 1) steps, so prefill cancels."""
    import transformers

    hf = build_reference(bench)
    device = bench.device

    @torch.inference_mode()
    def generate(ids: torch.Tensor, n: int) -> None:
        hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=hf.config.pad_token_id,
        )

    runs = []
    n = max(new_tokens, 2)
    for b in batch_sizes:
        ids = torch.tensor([bench.random_tokens(prompt_len, bench.seed + 100 + i) for i in range(b)], device=device)
        try:
            generate(ids, 2)  # warm-up, excluded
            t1 = time_host(lambda ids=ids: generate(ids, 1), device)
            tn = time_host(lambda ids=ids: generate(ids, n), device)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            runs.append({"batch_size": b, "status": "skipped", "reason": f"out of memory: {str(e).splitlines()[0]}"})
            continue
        step = max(tn - t1, 1e-9) / (n - 1)
        runs.append({"batch_size": b, "status": "ok", "step_ms": step * 1e3, "tokens_per_s": b / step})
    return {
        "engine": f"transformers {transformers.__version__} Mistral4ForCausalLM.generate (greedy, KV cache)",
        "prompt_len": prompt_len,
        "new_tokens": n,
        "runs": runs,
    }


def transformers_ratios(decode: list[dict[str, Any]], reference: dict[str, Any]) -> list[dict[str, Any]]:
    ours = {(r["batch_size"], r["context"]): r for r in decode if r["status"] == "ok"}
    out = []
    for ref in reference["runs"]:
        mine = ours.get((ref["batch_size"], reference["prompt_len"]))
        ok = mine is not None and ref["status"] == "ok"
        ratio = mine["tokens_per_s"] / ref["tokens_per_s"] if ok else None
        out.append(
            {"batch_size": ref["batch_size"], "context": reference["prompt_len"], "small4_over_reference": ratio}
        )
    return out
