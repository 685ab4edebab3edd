"""Quantisation configs of both layouts -> ``QuantConfig``, failing at config time on any scheme small4 cannot run.

Three spellings exist: HF ``quantization_config`` with ``quant_method: fp8`` (per-tensor or ``weight_block_size``
blocks), Mistral-native ``quantization`` (``qformat_weight: fp8_e4m3``), and compressed-tensors
``quantization_config`` (``quant_method: compressed-tensors``), found in ``params.json`` of the NVFP4 release and
possibly in a ``config.json``. Of compressed-tensors only ``nvfp4-pack-quantized`` with NVFP4 weights (4-bit float,
groups of 16, FP8 group scales, a global scale) is read; anything else is refused here, naming the scheme, rather
than as an "unexpected tensor" deep in the loader.
"""

from __future__ import annotations

from typing import Any

from small4.config.model import ConfigError, QuantConfig, require

NVFP4_FORMAT = "nvfp4-pack-quantized"


def parse_hf_fp8(q: dict[str, Any]) -> QuantConfig:
    scheme = q.get("activation_scheme", "dynamic")
    require(scheme in ("static", "dynamic"), "quantization_config.activation_scheme", f"unknown {scheme!r}")
    block = q.get("weight_block_size")
    if block is not None:
        ok = isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        require(ok, "quantization_config.weight_block_size", f"must be two positive ints, got {block!r}")
    return QuantConfig(
        method="fp8",
        activation_scheme=scheme,
        weight_block_size=tuple(block) if block else None,
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()),
    )


def parse_quantization_config(q: dict[str, Any] | None, where: str = "quantization_config") -> QuantConfig:
    """An HF-style ``quantization_config`` (config.json, or params.json of compressed-tensors releases)."""
    if not q:
        return QuantConfig()
    method = q.get("quant_method")
    if method == "fp8":
        return parse_hf_fp8(q)
    if method == "compressed-tensors":
        return parse_compressed_tensors(q, where)
    raise ConfigError(
        f"config field '{where}.quant_method': quantization method {method!r} is not supported "
        "(small4 reads 'fp8' and compressed-tensors 'nvfp4-pack-quantized')"
    )


def _unsupported(fmt: object) -> ConfigError:
    return ConfigError(f"compressed-tensors scheme {fmt!r} is not supported (small4 reads {NVFP4_FORMAT!r})")


def parse_compressed_tensors(q: dict[str, Any], where: str = "quantization_config") -> QuantConfig:
    top_format = q.get("format")
    groups = q.get("config_groups") or {}
    require(isinstance(groups, dict) and groups, f"{where}.config_groups", "missing or empty")
    targets: list[str] = []
    for name, group in groups.items():
        fmt = group.get("format") or top_format
        if fmt != NVFP4_FORMAT:
            raise _unsupported(fmt)
        _check_nvfp4_args(group.get("weights"), f"{where}.config_groups.{name}.weights", required=True)
        _check_nvfp4_args(group.get("input_activations"), f"{where}.config_groups.{name}.input_activations")
        require(
            group.get("output_activations") is None,
            f"{where}.config_groups.{name}.output_activations",
            "output quantisation is not supported",
        )
        targets += [str(t) for t in group.get("targets") or ()]
    require(q.get("kv_cache_scheme") is None, f"{where}.kv_cache_scheme", "a quantised KV cache is not supported")
    return QuantConfig(
        method="nvfp4",
        activation_scheme="static",
        modules_to_not_convert=tuple(str(m) for m in q.get("ignore") or ()),
        targets=tuple(targets),
    )


def _check_nvfp4_args(args: dict[str, Any] | None, field_name: str, required: bool = False) -> None:
    """NVFP4 quantisation args: 4-bit float, symmetric, tensor_group strategy over 16 values."""
    if args is None:
        require(not required, field_name, "missing")
        return
    got = (args.get("num_bits"), args.get("type"), args.get("group_size"))
    if got != (4, "float", 16):
        raise ConfigError(
            f"config field '{field_name}': only NVFP4 (num_bits 4, type float, group_size 16) is supported, got "
            f"num_bits={got[0]}, type={got[1]}, group_size={got[2]}"
        )
    strategy = args.get("strategy", "tensor_group")
    require(strategy == "tensor_group", field_name, f"strategy must be 'tensor_group', got {strategy!r}")
    require(args.get("symmetric", True), field_name, "asymmetric NVFP4 is not supported")


def parse_native_quantization(q: dict[str, Any] | None) -> QuantConfig:
    """params.json ``quantization`` (Mistral's own FP8 spelling)."""
    if not q:
        return QuantConfig()
    fmt = q.get("qformat_weight")
    if fmt != "fp8_e4m3":
        raise ConfigError(f"config field 'quantization.qformat_weight': only 'fp8_e4m3' is supported, got {fmt!r}")
    scheme = q.get("qscheme_act", "TENSOR")
    require(scheme == "TENSOR", "quantization.qscheme_act", f"only 'TENSOR' is supported, got {scheme!r}")
    return QuantConfig(method="fp8", activation_scheme="static")
