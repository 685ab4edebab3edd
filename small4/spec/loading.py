"""The EAGLE draft's checkpoint -> an ``EagleDraft`` that fits its target, from the released or the HF layout.

What is known of the release (found with the search tools; no file could be downloaded here):

* Repository ``mistralai/Mistral-Small-4-119B-2603-eagle`` (vLLM recipes: "a 2-layer Mistral-style draft trained on
  the 119B target"), about 392 MB: Mistral's native format, ``params.json`` + ``consolidated.safetensors``.
* vLLM loads it as ``EagleMistralLarge3ForCausalLM`` (``model_executor/models/mistral_large_3_eagle.py``): vLLM's
  speculative config turns the draft's ``MistralLarge3ForCausalLM`` architecture into the EAGLE one; the module is
  ``fc`` (``eagle_linear.weight`` -> ``model.fc.weight``, ``eagle_linear.qscale_weight`` / ``qscale_act`` -> its
  ``weight_scale`` / ``input_scale``) over ``cat(embed(token), target_hidden)``, then DeepSeek-V2 MLA decoder layers,
  then ``norm``. Its ``load_weights`` reports ``model.embed_tokens`` and ``lm_head`` as loaded without reading them:
  both are copied from the target (the draft has no vocabulary of its own).
* The native names are those of ``MistralLarge3ForCausalLM.remapping`` (vLLM and SGLang): ``layers.N.attention_norm``,
  ``attention.wq_a / q_a_norm / wq_b / wkv_a_with_mqa / kv_a_norm / wkv_b / wo``, ``ffn_norm``,
  ``feed_forward.w1 / w2 / w3`` (gate / down / up of a *dense* MLP), ``norm``; FP8 scales ``qscale_weight``
  (weight multiplier) and ``qscale_act`` (static activation scale), per tensor, as in the target's native set.
  SGLang's table also maps ``attention.{q,k,v}_fake_quantizer.qscale_act`` (FP8 attention/KV-cache scales of
  Mistral Large 3); small4 keeps its latent cache in the model dtype, so those are read and ignored.
* How the params.json says it is a draft: it does not, in any field vLLM or SGLang read. vLLM knows from
  ``--speculative-config``; SGLang (``mistral_utils.adapt_config_dict``) takes "eagle" in the path, MLA fields
  (``kv_lora_rank`` / ``q_lora_rank`` / ``v_head_dim``) and *no* ``moe`` section as "a dense MLA EAGLE draft (e.g.
  Mistral Small 4 EAGLE)" and sets ``first_k_dense_replace`` = ``n_layers``; vLLM's ``_remap_mistral_mla_args`` does
  the same for an MLA params.json without ``moe``, with ``hidden_dim`` as the MLP width. So here: the caller says it
  is a draft (``load_draft``); a params.json *with* a ``moe`` section is refused as a target checkpoint.

Assumed (not verifiable here, and what the tiny writer ``weights/tiny_draft.py`` writes): the release's params.json
restates the target's ``dim``, ``n_heads``, MLA ranks and head dims, ``vocab_size``, rope (``rope_theta``, ``yarn``,
``llama_4_scaling``) and carries ``n_layers`` and ``hidden_dim`` of its own; it may be BF16 or FP8 (392 MB fits 2 FP8
layers with a 12288-wide MLP, or BF16 with about a third of that); if the files do hold ``tok_embeddings`` /
``output`` they are skipped (the target's are used). The HF layout has no published instance: it is taken to be
what vLLM's module holds after the remapping, ``config.json`` (architectures ``EagleMistralLarge3ForCausalLM`` or
SGLang's ``MistralLarge3ForCausalLMEagle``, DeepSeek-style fields, ``intermediate_size`` the MLP width) +
``model*.safetensors`` with ``model.fc``, ``model.layers.N.self_attn.* / mlp.{gate,up,down}_proj``, ``model.norm``
and the target's HF FP8 spellings (``weight_scale_inv`` / ``activation_scale``).

Loading reuses the target's loader (``weights/loader.py``: shard listing, ``open_shard``, FP8 dequantisation or
keeping, shape / missing / unexpected checks with the tensor's name) with a name table for the draft's modules, and
the target's quantisation parsers (``config/quant.py``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from small4.config import ConfigError, ModelConfig, QuantConfig, TextConfig
from small4.config.load import read_json
from small4.config.quant import parse_native_quantization, parse_quantization_config
from small4.kernels.fp8 import FP8_DTYPE
from small4.model.mistral4 import Mistral4Model
from small4.spec.eagle import EagleConfig, EagleDraft
from small4.weights.loader import CheckpointError, WeightLoader, _LoadState
from small4.weights.names import NATIVE_ATTN, Destination, split_role

log = logging.getLogger(__name__)

HF_ARCHITECTURES = ("EagleMistralLarge3ForCausalLM", "MistralLarge3ForCausalLMEagle")
_MLP_HALF = {"w1": 0, "w3": 1, "gate_proj": 0, "up_proj": 1}  # gate rows first in mlp.gate_up
_SHARED = ("tok_embeddings", "output", "model.embed_tokens", "lm_head")  # the target's: skipped if present
_IGNORED = re.compile(r"layers\.\d+\.attention\.[qkv]_fake_quantizer\.qscale_act")  # FP8 attention scales: unused


@dataclass(frozen=True)
class DraftFiles:
    """What a draft directory holds: its layout ("mistral" = released params.json, "hf" = config.json), the
    fields it states (as small4 names them) and its quantisation."""

    layout: str
    fields: dict[str, Any]
    quant: QuantConfig


def read_draft_files(path: Path) -> DraftFiles:
    """Detects the layout by its files (a config.json with a draft architecture wins, as for targets) and reads
    the draft's fields."""
    if (path / "config.json").is_file():
        return DraftFiles("hf", *_hf_fields(read_json(path / "config.json")))
    if (path / "params.json").is_file():
        return DraftFiles("mistral", *_native_fields(read_json(path / "params.json")))
    raise ConfigError(f"{path}: neither config.json nor params.json found (not a draft checkpoint)")


def _native_fields(p: dict[str, Any]) -> tuple[dict[str, Any], QuantConfig]:
    if p.get("moe"):
        raise ConfigError("config field 'moe': params.json has a MoE section: a target checkpoint, not an EAGLE draft")
    for key in ("dim", "n_layers", "hidden_dim"):
        if key not in p:
            raise ConfigError(f"config field '{key}': missing from the draft's params.json")
    yarn = p.get("yarn") or {}
    fields = {
        "hidden_size": p["dim"],
        "num_layers": p["n_layers"],
        "intermediate_size": p["hidden_dim"],
        "num_heads": p.get("n_heads"),
        "q_lora_rank": p.get("q_lora_rank", "unset"),
        "kv_lora_rank": p.get("kv_lora_rank"),
        "qk_nope_head_dim": p.get("qk_nope_head_dim"),
        "qk_rope_head_dim": p.get("qk_rope_head_dim"),
        "v_head_dim": p.get("v_head_dim"),
        "vocab_size": p.get("vocab_size"),
        "rope_theta": p.get("rope_theta"),
        "yarn_factor": yarn.get("factor"),
        "yarn_original_max": yarn.get("original_max_position_embeddings"),
        "rms_norm_eps": p.get("norm_eps"),
    }
    if p.get("quantization") and p.get("quantization_config"):
        raise ConfigError("params.json: both 'quantization' and 'quantization_config' are set")
    qc, q = p.get("quantization_config"), p.get("quantization") or {}
    if q.get("qformat_weight") == "fp8_e4m3" and q.get("qscheme_act") == "NO_SCALES":
        # FP8 weights with dynamic activations (vLLM reads this spelling too): no qscale_act tensors
        quant = QuantConfig(method="fp8", activation_scheme="dynamic")
    else:
        quant = parse_quantization_config(qc) if qc else parse_native_quantization(q)
    return fields, quant


def _hf_fields(c: dict[str, Any]) -> tuple[dict[str, Any], QuantConfig]:
    arch = (c.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        raise ConfigError(
            f"config field 'architectures': {arch!r} is not an EAGLE draft (expected one of {HF_ARCHITECTURES})"
        )
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size"):
        if key not in c:
            raise ConfigError(f"config field '{key}': missing from the draft's config.json")
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    fields = {
        "hidden_size": c["hidden_size"],
        "num_layers": c["num_hidden_layers"],
        "intermediate_size": c["intermediate_size"],
        "num_heads": c.get("num_attention_heads"),
        "q_lora_rank": c.get("q_lora_rank", "unset"),
        "kv_lora_rank": c.get("kv_lora_rank"),
        "qk_nope_head_dim": c.get("qk_nope_head_dim"),
        "qk_rope_head_dim": c.get("qk_rope_head_dim"),
        "v_head_dim": c.get("v_head_dim"),
        "vocab_size": c.get("vocab_size"),
        "rope_theta": rp.get("rope_theta", c.get("rope_theta")),
        "yarn_factor": rp.get("factor"),
        "yarn_original_max": rp.get("original_max_position_embeddings"),
        "rms_norm_eps": c.get("rms_norm_eps"),
    }
    return fields, parse_quantization_config(c.get("quantization_config"))


def _target_value(target: TextConfig, field: str) -> Any:
    rope = target.rope
    if field == "rope_theta":
        return rope.theta
    if field == "yarn_factor":
        return rope.factor if rope.rope_type == "yarn" else None
    if field == "yarn_original_max":
        return rope.original_max_position_embeddings if rope.rope_type == "yarn" else None
    return getattr(target, field)


_MUST_MATCH = (
    "hidden_size",
    "vocab_size",
    "num_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "rope_theta",
    "yarn_factor",
    "yarn_original_max",
)


def draft_config(files: DraftFiles, target: TextConfig) -> EagleConfig:
    """The draft's EagleConfig for ``target``; every dim the draft shares with its target must agree (a field the
    draft does not state is the target's). The error names the field and both values."""
    for name in _MUST_MATCH:
        stated = files.fields.get(name)
        if stated == "unset" or (stated is None and name != "q_lora_rank"):  # q_lora_rank null: no q LoRA
            continue
        want = _target_value(target, name)
        if isinstance(want, float) or isinstance(stated, float):
            same = want is not None and abs(float(stated) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
        else:
            same = stated == want
        if not same:
            raise ConfigError(
                f"config field '{name}': the draft has {stated}, its target {want}: the draft does not fit"
            )
    extra = {"rms_norm_eps": float(files.fields["rms_norm_eps"])} if files.fields.get("rms_norm_eps") else {}
    return EagleConfig.from_target(
        target,
        num_layers=int(files.fields["num_layers"]),
        intermediate_size=int(files.fields["intermediate_size"]),
        **extra,
    )


class DraftNameMapper:
    """Checkpoint base name (either layout) -> Destination in ``EagleDraft`` (None: not a draft tensor)."""

    def __init__(self, cfg: EagleConfig) -> None:
        self.I, self.num_layers = cfg.intermediate_size, cfg.num_layers

    def map(self, base: str) -> Destination | None:
        if base in ("eagle_linear", "model.fc"):
            return Destination("fc", "weight")
        if base in ("norm", "model.norm"):
            return Destination("norm", "weight", quantizable=False)
        m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", base)
        if not m or int(m.group(1)) >= self.num_layers:
            return None
        layer, rest = f"layers.{m.group(1)}", m.group(2)
        norms = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
        if rest in norms or rest in norms.values():
            return Destination(f"{layer}.{norms.get(rest, rest)}", "weight", quantizable=False)
        attn = re.fullmatch(r"(?:attention|self_attn)\.(\w+)", rest)
        if attn:
            name = NATIVE_ATTN.get(attn.group(1), attn.group(1))
            if name not in NATIVE_ATTN.values():
                return None
            return Destination(f"{layer}.self_attn.{name}", "weight", quantizable=not name.endswith("layernorm"))
        mlp = re.fullmatch(r"(?:feed_forward|mlp)\.(w1|w2|w3|gate_proj|up_proj|down_proj)", rest)
        if mlp:
            if mlp.group(1) in ("w2", "down_proj"):
                return Destination(f"{layer}.mlp.down", "weight")
            half = _MLP_HALF[mlp.group(1)]
            rows = slice(half * self.I, (half + 1) * self.I)
            return Destination(f"{layer}.mlp.gate_up", "weight", (rows,), (2, 1), (half, 0))
        return None


def draft_expected_bases(cfg: EagleConfig, layout: str) -> list[str]:
    """Every base name the draft's files must hold, in their own layout (for "missing tensor" errors)."""
    q = ["q_a_proj", "q_a_layernorm", "q_b_proj"] if cfg.text.q_lora_rank else ["q_proj"]
    attn = q + ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
    if layout == "mistral":
        native = {v: k for k, v in NATIVE_ATTN.items()}
        per = ["attention_norm", "ffn_norm"] + [f"attention.{native[a]}" for a in attn]
        per += [f"feed_forward.{w}" for w in ("w1", "w2", "w3")]
        return ["eagle_linear", "norm"] + [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in per]
    per = ["input_layernorm", "post_attention_layernorm"] + [f"self_attn.{a}" for a in attn]
    per += [f"mlp.{w}" for w in ("gate_proj", "up_proj", "down_proj")]
    return ["model.fc", "model.norm"] + [f"model.layers.{i}.{n}" for i in range(cfg.num_layers) for n in per]


class DraftWeightLoader(WeightLoader):
    """The target's WeightLoader over an EagleDraft: the draft's name table and expected names, the rest shared
    (FP8 dequantisation / keeping, shape checks, every tensor placed and every parameter filled)."""

    def __init__(self, draft: EagleDraft, config: ModelConfig, dtype: torch.dtype, keep_fp8: bool) -> None:
        self.model, self.config, self.keep_fp8, self.keep_nvfp4 = draft, config, keep_fp8, False
        self.block = config.quant.weight_block_size
        self.mapper = DraftNameMapper(draft.config)
        self.dtype = dtype
        self.modules = dict(draft.named_modules())
        self.skipped: list[str] = []

    def load_tensor(self, name: str, tensor: torch.Tensor, state: _LoadState) -> None:
        base = split_role(name)[0]
        if base in _SHARED or _IGNORED.fullmatch(name):
            self.skipped.append(name)
            return
        if tensor.dtype == torch.uint8:
            raise CheckpointError(f"tensor {name}: NVFP4 drafts are not supported (BF16 or FP8 only)")
        super().load_tensor(name, tensor, state)

    def _missing(self, state: _LoadState) -> list[str]:
        by_param: dict[str, str] = {}
        for base in draft_expected_bases(self.model.config, self.config.layout):
            dest = self.mapper.map(base)
            if dest is not None and self._key(dest) not in state.seen:
                by_param.setdefault(f"{dest.module}.{dest.param}", base)
        return [by_param.get(n, n) for n, p in self.model.named_parameters() if state.filled.get(n, 0) < p.numel()]


def target_keeps_fp8(target: Mistral4Model) -> bool:
    """True when any of the target's weights stayed FP8 at load (``keep_fp8``): the draft then does the same."""
    return any(p.dtype == FP8_DTYPE for p in target.parameters())


def load_draft(
    path: str | Path,
    target: Mistral4Model | TextConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp8: bool | None = None,
    progress: bool = False,
) -> EagleDraft:
    """Builds the draft in ``path`` (released or HF layout, BF16 or FP8) for ``target``, on ``device``.

    Its embedding and lm_head are the target's (the draft owns neither: callers embed with the target and score
    with ``target.compute_logits``), so the target's vocabulary and hidden size must be the draft's. ``dtype``
    None: the target model's (bf16 for a bare TextConfig). ``keep_fp8`` None: as the target model was loaded
    (FP8 weights kept with their scales when the target kept its own), else dequantised."""
    path = Path(path)
    if isinstance(target, Mistral4Model):
        text, model_dtype = target.config.text, target.embed_tokens.weight.dtype
        keep = target_keeps_fp8(target) if keep_fp8 is None else keep_fp8
    else:
        text, model_dtype, keep = target, torch.bfloat16, bool(keep_fp8)
    dtype = dtype or model_dtype
    files = read_draft_files(path)
    if files.quant.method == "nvfp4":
        raise ConfigError("config field 'quantization_config': NVFP4 drafts are not supported (BF16 or FP8 only)")
    cfg = draft_config(files, text)
    with torch.device("meta"):
        draft = EagleDraft(cfg)
    draft = draft.to_empty(device=device).to(dtype)
    loader = DraftWeightLoader(draft, ModelConfig(text=text, quant=files.quant, layout=files.layout), dtype, keep)
    loader.load_dir(path, progress=progress)
    if loader.skipped:
        log.info(
            "draft %s: skipped %d tensors the target provides or small4 does not use: %s",
            path,
            len(loader.skipped),
            loader.skipped[:4],
        )
    return draft.eval()


def native_state_dict(draft: EagleDraft, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The draft's (dense, unquantised) weights under the released names: ``load_draft``'s inverse."""
    native_attn = {v: k for k, v in NATIVE_ATTN.items()}
    norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out: dict[str, torch.Tensor] = {}
    for name, param in draft.named_parameters():
        w = param.detach().to("cpu", dtype)
        module = name[: -len(".weight")]
        if module in ("fc", "norm"):
            out[("eagle_linear" if module == "fc" else "norm") + ".weight"] = w
            continue
        layer, rest = module.split(".", 2)[1], module.split(".", 2)[2]  # "layers.0.self_attn.q_a_proj"
        prefix = f"layers.{layer}."
        if rest in norms:
            out[prefix + norms[rest] + ".weight"] = w
        elif rest.startswith("self_attn."):
            out[prefix + f"attention.{native_attn[rest[len('self_attn.') :]]}.weight"] = w
        elif rest == "mlp.gate_up":
            gate, up = w.chunk(2, dim=0)  # gate rows first
            out[prefix + "feed_forward.w1.weight"], out[prefix + "feed_forward.w3.weight"] = gate.clone(), up.clone()
        elif rest == "mlp.down":
            out[prefix + "feed_forward.w2.weight"] = w
        else:
            raise ValueError(f"no released name for draft parameter {name}")
    return out


def release_params(draft: EagleConfig) -> dict[str, Any]:
    """The released params.json for ``draft``: the target's fields it restates, its own depth and MLP width, no
    ``moe`` (see the module docstring for what is assumed of the real file)."""
    t, rope = draft.text, draft.text.rope
    params: dict[str, Any] = {
        "dim": t.hidden_size,
        "n_layers": draft.num_layers,
        "head_dim": t.qk_head_dim,
        "hidden_dim": draft.intermediate_size,
        "n_heads": t.num_heads,
        "n_kv_heads": t.num_heads,
        "rope_theta": rope.theta,
        "norm_eps": t.rms_norm_eps,
        "vocab_size": t.vocab_size,
        "tied_embeddings": False,
        "max_position_embeddings": t.max_position_embeddings,
        "q_lora_rank": t.q_lora_rank,
        "kv_lora_rank": t.kv_lora_rank,
        "qk_nope_head_dim": t.qk_nope_head_dim,
        "qk_rope_head_dim": t.qk_rope_head_dim,
        "v_head_dim": t.v_head_dim,
    }
    if rope.rope_type == "yarn":
        params["yarn"] = {
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "factor": rope.factor,
            "apply_scale": t.yarn_softmax_mscale,
            "beta": rope.beta_fast,
            "alpha": rope.beta_slow,
        }
    if rope.llama4_beta:
        params["llama_4_scaling"] = {
            "original_max_position_embeddings": rope.llama4_original_max_position_embeddings,
            "beta": rope.llama4_beta,
        }
    return params


def save_draft(draft: EagleDraft, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes ``draft`` in the released layout (params.json + consolidated.safetensors)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(release_params(draft.config), indent=2))
    tensors = {k: v.contiguous() for k, v in native_state_dict(draft, dtype).items()}
    save_file(tensors, str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    return out
