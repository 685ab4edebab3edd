"""The decode roofline of ``small4 bench full``: the bytes one decode step must read over the device's HBM
bandwidth (datasheet, and a copy measured on the spot), beside the measured step."""

from __future__ import annotations

from typing import Any

import torch

from small4.bench.harness import Bench

# Datasheet HBM bandwidth, bytes/s, matched against the device name in order (most specific first).
HBM_BANDWIDTH: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
)


def hbm_bandwidth(name: str) -> float | None:
    """Datasheet bandwidth of a known GPU (H100 SXM 3.35 TB/s, H200 4.8 TB/s), None when unknown."""
    for key, bw in HBM_BANDWIDTH:
        if key in name:
            return bw
    return None


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def decode_bytes(bench: Bench, context: int) -> dict[str, Any]:
    """Bytes one batch-1 decode step must read: every weight it touches once, and the context's latent rows."""
    layer = bench.model.layers[0]
    mlp, t = layer.mlp, bench.text
    experts = mlp.experts
    per_expert = experts.w13[0].numel() * experts.w13.element_size() + experts.w2[0].numel() * experts.w2.element_size()
    itemsize = torch.empty((), dtype=bench.runner.cache_dtype).element_size()
    per_layer = {
        "attention": module_bytes(layer.self_attn)
        + module_bytes(layer.input_layernorm)
        + module_bytes(layer.post_attention_layernorm),
        "router": module_bytes(mlp.gate),
        "shared_expert": module_bytes(mlp.shared_experts) if mlp.shared_experts is not None else 0,
        "routed_experts": t.num_experts_per_tok * per_expert,
        "latent_cache": context * t.latent_dim * itemsize,
    }
    m = bench.model
    outside = (
        module_bytes(m.lm_head)
        + module_bytes(m.norm)
        + m.embed_tokens.weight[0].numel() * m.embed_tokens.weight.element_size()
    )
    layer_total = sum(per_layer.values())
    return {
        "per_layer": {**per_layer, "total": layer_total},
        "lm_head_norm_embedding_row": outside,
        "total": outside + bench.layers * layer_total,
        "full_model_total": outside + bench.full_layers * layer_total,
    }


def roofline(bench: Bench, decode: list[dict[str, Any]], bandwidth: float | None, measured: float | None) -> list[dict]:
    rows = []
    for run in decode:
        if run["batch_size"] != 1:
            continue
        b = decode_bytes(bench, run["context"])
        row: dict[str, Any] = {
            "context": run["context"],
            "bytes_per_step": b,
            "hbm_bandwidth_bytes_per_s": bandwidth if bandwidth is not None else "unknown",
            "measured_copy_bandwidth_bytes_per_s": measured,
        }
        for name, bw in (("datasheet", bandwidth), ("measured_copy", measured)):
            if bw is None:
                row[name] = None
                continue
            floor = b["total"] / bw * 1e3
            full_floor = b["full_model_total"] / bw * 1e3
            entry: dict[str, Any] = {"floor_ms": floor, "full_model_floor_ms": full_floor}
            if run["status"] == "ok":
                est = run["full_model_estimate"]
                entry |= {
                    "forward_ms": run["forward_ms_median"],
                    "step_ms": run["step_ms_median"],
                    "floor_over_forward": floor / run["forward_ms_median"],
                    "floor_over_step": floor / run["step_ms_median"],
                    "full_model_floor_over_forward": full_floor / est["ms"],
                    "full_model_floor_over_step": full_floor / est["step_ms"],
                }
                graph = run.get("forward_graph")
                if graph and graph["status"] == "ok":
                    entry |= {
                        "graph_ms": graph["ms_median"],
                        "floor_over_graph": floor / graph["ms_median"],
                        "full_model_floor_over_graph": full_floor / graph["full_model_estimate"]["ms"],
                    }
            row[name] = entry
        rows.append(row)
    return rows
