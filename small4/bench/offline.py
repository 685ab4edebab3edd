"""``small4 bench offline``: batch throughput of the offline ``LLM`` API, beside transformers on the same weights.

The workload is fixed-shape on purpose: N random prompts of exactly I tokens, each generating exactly O tokens
greedily with EOS ignored, so both engines do the same amount of work and the ratio means something. Greedy
outputs are compared too: if small4 and transformers disagree on most sequences, the two runs did not compute
the same model and the ratio is suspect. Without a checkpoint it builds a random one (``--tiny``), so the
command runs anywhere; the result is one JSON file (``small4.bench.results``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from small4.bench.results import device_name, positive_int, write_result
from small4.config import EngineConfig, load_model_config
from small4.weights.tiny import TinySpec, make_tiny

# A bigger random model than the default TinySpec: enough width that matmuls, not Python, dominate, while a
# moderate workload still finishes in a minute or two on two CPU cores.
SMALL_SPEC = TinySpec(
    hidden_size=256,
    num_layers=4,
    num_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
)
TINY_SPECS: dict[str, TinySpec] = {"tiny": TinySpec(), "small": SMALL_SPEC}
FIRST_REGULAR_TOKEN = 1000  # tekken reserves ids below this for special tokens
WARMUP_TOKENS = 2
WARMUP_NOTE = f"excluded: one request of input_len prompt tokens and {WARMUP_TOKENS} output tokens, before timing"


@dataclass(frozen=True)
class Workload:
    """N prompts of I random regular token ids, each generating exactly O tokens; timed ``repeats`` times.

    Each repeat draws fresh prompts (seed + r): repeating the same ones would let small4's prefix cache skip
    their prefill and measure less work than transformers does.
    """

    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0
    repeats: int = 1

    def prompt_sets(self, vocab_size: int) -> list[list[list[int]]]:
        return [_random_ids(self.num_prompts, self.input_len, vocab_size, self.seed + r) for r in range(self.repeats)]

    def warmup_prompt(self, vocab_size: int) -> list[int]:
        """Drawn from another seed, so warm-up never leaves prefix-cache blocks the measured prompts could reuse."""
        return _random_ids(1, self.input_len, vocab_size, self.seed + 1_000_003)[0]


def _random_ids(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    if vocab_size <= FIRST_REGULAR_TOKEN:
        raise ValueError(f"vocabulary of {vocab_size} has no regular tokens (ids >= {FIRST_REGULAR_TOKEN})")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_REGULAR_TOKEN, vocab_size, (n, length), generator=g).tolist()


@dataclass(frozen=True)
class Timed:
    """One engine's timed passes: wall seconds per repeat and the generated ids of every prompt of every repeat.

    Rates come from the fastest repeat: on a shared machine other processes only ever slow a pass down.
    """

    seconds: list[float]
    outputs: list[list[int]]

    def metrics(self, w: Workload) -> dict[str, Any]:
        best = min(self.seconds)
        return {
            "seconds": best,
            "seconds_per_repeat": self.seconds,
            "requests_per_s": w.num_prompts / best,
            "output_tokens_per_s": w.num_prompts * w.output_len / best,
            "total_tokens_per_s": w.num_prompts * (w.input_len + w.output_len) / best,
        }


def _check_lengths(engine: str, outputs: list[list[int]], w: Workload) -> None:
    """Every sequence must have exactly O tokens, otherwise the two engines measured different work."""
    bad = [len(o) for o in outputs if len(o) != w.output_len]
    if len(outputs) != w.num_prompts * w.repeats or bad:
        raise RuntimeError(f"{engine} produced {len(outputs)} outputs, lengths {bad} instead of {w.output_len}")


# ---- small4 ----------------------------------------------------------------------------------------------------
def run_small4(model_dir: Path, w: Workload, engine_cfg: EngineConfig) -> tuple[Timed, dict[str, Any]]:
    """Times ``LLM.generate`` over all prompts, once per repeat (construction and one warm-up request excluded)."""
    from small4.engine.engine import LLM
    from small4.engine.sampling_params import SamplingParams

    llm = LLM(model_dir, engine_cfg)
    runner = llm.engine.runner
    if w.input_len + w.output_len > llm.engine.max_model_len:
        raise ValueError(f"input_len + output_len exceeds the model's max length {llm.engine.max_model_len}")
    vocab = runner.config.text.vocab_size
    # ignore_eos alone fixes the length; min_tokens would send every step through the min-tokens ban, which
    # users who set only max_tokens never pay
    greedy = SamplingParams(temperature=0.0, max_tokens=w.output_len, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate([w.warmup_prompt(vocab)], warm)
    seconds, outputs = [], []
    for prompts in w.prompt_sets(vocab):
        start = time.perf_counter()
        results = llm.generate(prompts, greedy)
        seconds.append(time.perf_counter() - start)
        outputs += [r.outputs[0].token_ids for r in results]
    _check_lengths("small4", outputs, w)
    info = {"device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."), "vocab_size": vocab}
    if llm.engine.spec is not None:  # acceptance over the timed passes and the warm-up
        s = llm.engine.spec.stats
        info["speculation"] = {
            "num_speculative_tokens": llm.engine.spec.k,
            "acceptance_rate": s.acceptance_rate,
            "mean_accepted_length": s.mean_accepted_length,
            "draft_tokens": s.num_drafts,
            "accepted_tokens": s.num_accepted,
        }
    return Timed(seconds, outputs), info


def run_speculative(model_dir: Path, w: Workload, engine_cfg: EngineConfig, plain: Timed, args) -> dict[str, Any]:
    """The same workload with ``--speculative-model``: tokens/s beside the plain run, acceptance, and whether
    the greedy outputs are the plain ones (they must be)."""
    cfg = replace(
        engine_cfg, speculative_model=args.speculative_model, num_speculative_tokens=args.num_speculative_tokens
    )
    spec, info = run_small4(model_dir, w, cfg)
    out = {**spec.metrics(w), **info.get("speculation", {}), "speculative_model": args.speculative_model}
    out["speedup_output_tokens_per_s"] = out["output_tokens_per_s"] / plain.metrics(w)["output_tokens_per_s"]
    out["outputs_equal_plain"] = sum(a == b for a, b in zip(spec.outputs, plain.outputs, strict=True))
    return out


# ---- transformers ----------------------------------------------------------------------------------------------
def reference_skip_reason(model_dir: Path) -> str | None:
    """Why transformers cannot run this checkpoint as-is (None: it can)."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install small4[test])"
    config = model_dir / "config.json"
    if not config.is_file():
        return "Mistral-native checkpoint (params.json): transformers' from_pretrained reads only the HF layout"
    if json.loads(config.read_text()).get("quantization_config"):
        return "quantized (FP8) checkpoint: from_pretrained cannot load it as plain weights; compare on a BF16 one"
    return None


def run_reference(model_dir: Path, w: Workload, batch_size: int, device: str, dtype: str) -> Timed:
    """``Mistral3ForConditionalGeneration.generate`` on [batch, I] prompts (equal lengths: no padding needed)."""
    from transformers import Mistral3ForConditionalGeneration

    # loaded on the CPU then moved: device_map would need accelerate, which is not a dependency
    model = Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    # the same softmax scale as small4 (transformers multiplies by YaRN's mscale^2 whenever mscale_all_dim is set;
    # small4 only when params.json says apply_scale: README), so that both compute the same model
    scale = load_model_config(model_dir).text.softmax_scale
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "qk_head_dim"):
            module.scaling = scale
    vocab = model.config.text_config.vocab_size
    _hf_generate(model, [w.warmup_prompt(vocab)], WARMUP_TOKENS)
    seconds, outputs = [], []
    for prompts in w.prompt_sets(vocab):
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            outputs += _hf_generate(model, prompts[i : i + batch_size], w.output_len)
        seconds.append(time.perf_counter() - start)
    _check_lengths("transformers", outputs, w)
    return Timed(seconds, outputs)


@torch.inference_mode()
def _hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts, device=model.device)  # [B, I]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.text_config.pad_token_id,
    )  # [B, I + new_tokens]
    return out[:, ids.shape[1] :].tolist()


# ---- the benchmark ---------------------------------------------------------------------------------------------
@contextmanager
def _model_dir(model: str | None, tiny: str | None, seed: int) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The checkpoint to benchmark: the given directory, or a random ``--tiny`` one in a temp dir for the run."""
    if model is not None:
        if tiny is not None:
            raise ValueError("give a MODEL directory or --tiny, not both")
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        yield path, {"model": str(path)}
        return
    name = tiny or "tiny"
    spec = TINY_SPECS[name]
    with tempfile.TemporaryDirectory(prefix=f"small4-bench-{name}-") as tmp:
        yield make_tiny(tmp, seed=seed, spec=spec), {"model": f"tiny:{name}", "tiny_spec": asdict(spec)}


def _free_memory() -> None:
    """Drops the small4 engine before transformers loads the same weights (a real model fits only once)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_offline_bench(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Runs both engines; returns (config, results, device) for ``write_result``."""
    w = Workload(args.num_prompts, args.input_len, args.output_len, args.seed, args.repeats)
    engine_cfg = EngineConfig(
        profile=args.profile,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
    )
    batch_size = args.reference_batch_size or w.num_prompts
    with _model_dir(args.model, args.tiny, args.seed) as (model_dir, model_info):
        ours, info = run_small4(model_dir, w, engine_cfg)
        _free_memory()
        speculative = run_speculative(model_dir, w, engine_cfg, ours, args) if args.speculative_model else None
        _free_memory()
        note = "disabled with --no-reference" if args.no_reference else reference_skip_reason(model_dir)
        ref = None if note else run_reference(model_dir, w, batch_size, info["device"], info["dtype"])
    config = {
        **model_info,
        **asdict(w),
        "reference_batch_size": None if note else batch_size,
        "engine_config": asdict(engine_cfg),
    }
    results = _results(w, ours, info, ref, note)
    results["small4_speculative"] = speculative
    return config, results, info["device"]


def _results(w: Workload, ours: Timed, info: dict[str, Any], ref: Timed | None, note: str | None) -> dict[str, Any]:
    small4 = {**ours.metrics(w), "device": info["device"], "dtype": info["dtype"], "warmup": WARMUP_NOTE}
    if ref is None:
        return {
            "small4": small4,
            "reference": None,
            "reference_note": note,
            "ratio": None,
            "outputs_agree": None,
            "outputs_compared": 0,
        }
    import transformers

    reference = {
        **ref.metrics(w),
        "engine": f"transformers {transformers.__version__} Mistral3ForConditionalGeneration.generate",
        "device": info["device"],
        "dtype": info["dtype"],
        "warmup": WARMUP_NOTE,
    }
    ratio = {k: small4[k] / reference[k] for k in ("requests_per_s", "output_tokens_per_s")}
    agree = sum(a == b for a, b in zip(ours.outputs, ref.outputs, strict=True))
    return {
        "small4": small4,
        "reference": reference,
        "reference_note": None,
        "ratio": ratio,
        "outputs_agree": agree,
        "outputs_compared": len(ours.outputs),
    }


def summary(config: dict[str, Any], results: dict[str, Any], device: str) -> str:
    """A few lines for the terminal; the JSON holds everything."""
    lines = [
        f"small4 bench offline: {config['model']}, {config['num_prompts']} prompts x "
        f"{config['input_len']} in / {config['output_len']} out, best of {config['repeats']}, on {device}"
    ]
    for name in ("small4", "reference"):
        r = results[name]
        if r is not None:
            lines.append(
                f"  {'transformers' if name == 'reference' else name:<13}{r['seconds']:8.2f} s "
                f"{r['requests_per_s']:9.2f} req/s {r['output_tokens_per_s']:10.1f} out tok/s "
                f"{r['total_tokens_per_s']:10.1f} tok/s"
            )
    spec = results.get("small4_speculative")
    if spec is not None:
        lines.append(
            f"  {'speculative':<13}{spec['seconds']:8.2f} s {spec['requests_per_s']:9.2f} req/s "
            f"{spec['output_tokens_per_s']:10.1f} out tok/s  ({spec['speedup_output_tokens_per_s']:.2f}x plain; "
            f"k={spec.get('num_speculative_tokens')}, acceptance {spec.get('acceptance_rate', 0):.2f}, "
            f"{spec.get('mean_accepted_length', 0):.2f} tokens/step; outputs equal plain "
            f"{spec['outputs_equal_plain']}/{config['num_prompts'] * config['repeats']})"
        )
    if results["ratio"] is not None:
        ratio = results["ratio"]
        lines.append(
            f"  small4 / transformers: {ratio['requests_per_s']:.2f}x req/s, {ratio['output_tokens_per_s']:.2f}x "
            f"out tok/s; greedy outputs agree {results['outputs_agree']}/{results['outputs_compared']}"
        )
    else:
        lines.append(f"  reference skipped: {results['reference_note']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config, results, device = run_offline_bench(args)
    path = write_result("offline", config, results, out=args.out, device=device)
    print(summary(config, results, device_name(device)))
    print(f"wrote {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``offline`` under ``small4 bench``."""
    p = sub.add_parser("offline", help="offline batch throughput of LLM.generate, beside transformers")
    p.add_argument("model", nargs="?", help="checkpoint directory; omitted: a random --tiny checkpoint")
    p.add_argument("--tiny", choices=sorted(TINY_SPECS), help="random model to build when MODEL is omitted (tiny)")
    p.add_argument("--num-prompts", type=positive_int, default=16)
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=positive_int, default=64, help="generated tokens per request (exact)")
    p.add_argument("--profile", choices=["latency", "throughput"], default="throughput")
    p.add_argument("--max-num-seqs", type=positive_int, help="override the profile's batch limit")
    p.add_argument("--max-num-batched-tokens", type=positive_int, help="override the profile's token budget")
    p.add_argument("--repeats", type=positive_int, default=1, help="timed passes, fresh prompts each; best counts")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers run")
    p.add_argument("--reference-batch-size", type=positive_int, help="prompts per transformers batch (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts (and of a --tiny model's weights)")
    p.add_argument("--speculative-model", help="EAGLE draft: also time speculative decoding, side by side")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=3, help="drafts per step with the draft")
    p.add_argument("--out", help="result JSON path (default: bench/results/offline-<UTC time>.json)")
    p.set_defaults(func=main)
