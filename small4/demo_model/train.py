"""`small4 train-demo`: trains the tiny demo model on the curriculum and writes it in the exact HF layout.

The model is the real architecture (``Mistral4Model``: MLA with q/kv LoRA, MoE with a shared expert, YaRN, the
Pixtral tower) at tiny widths (``demo_spec``), built through the real writer and loader and re-initialised for
training (``training_init``), then trained in float32 with AdamW on the causal-LM loss of the assistant tokens only
(``curriculum.encode_example`` masks). Examples are packed into one flat batch per step, the way the engine runs
prefill (``AttentionMetadata.for_prefill``); image examples go through ``model.vision`` and ``model.embed``.

After training the weights are saved in bf16 under the HF names (``config.json``, sharded safetensors with index,
``tekken.json``), then the saved checkpoint is evaluated on held-out examples (another seed) with greedy decoding
through the real ``Engine`` and ``chat.parse.OutputParser``; ``training_log.json`` records config, losses,
accuracies and wall time, and ``loss.png`` the loss curve (drawn with PIL).

Two curricula (``--curriculum``): ``v1`` (``curriculum.py``, the first shipped model's; evaluated in distribution
into ``accuracy``) and ``v2`` (``curriculum_v2.py``, issue 17: random tools and schemas, carries, high-effort chat;
evaluated after training by the held-out generator through the real server into ``heldout_v2``, as
``small4 eval-demo`` does). Sizes (``--size``): ``small`` (``demo_spec``, 2M parameters), ``copy`` (its shapes
with the spaceless tokenizer and a 256-position rope window: the shipped model), ``large`` (``large_spec``, 10M
parameters, six shards of at most 4 MiB; a CPU step costs ~5x the small one's) and ``micro`` (tests).
``--minutes`` bounds the wall time (the cosine schedule then runs on elapsed time, so a slow machine still ends
with a decayed learning rate).

The shipped checkpoint is v2 on ``copy``, trained in four phases with ``--init-from`` while the curriculum grew
(213 minutes on one thread; every phase's settings are nested in its ``training_log.json``). The runs that were
not shipped keep their logs in ``trials/``, whose README tabulates them and what they showed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image, ImageDraw
from tqdm import tqdm

from small4.chat.parse import OutputParser
from small4.chat.render import ChatRenderer
from small4.demo_model import arith_drill, copy_drill, curriculum_v2
from small4.demo_model import curriculum as curriculum_v1
from small4.demo_model.curriculum import EncodedExample, Example, encode_example, eval_examples, pack_until
from small4.model.context import AttentionMetadata
from small4.model.mistral4 import Mistral4Model
from small4.weights.loader import load_model
from small4.weights.names import NameMapper, split_role
from small4.weights.tekken_tiny import write_tiny_tekken
from small4.weights.tiny import TinySpec, hf_config, make_tiny, random_hf_state_dict

DEFAULT_OUT = Path(__file__).parent / "checkpoint"
MAX_FILE_BYTES = 5 * 1024 * 1024
SHARD_BYTES = 4 * 1024 * 1024  # each weight file stays under MAX_FILE_BYTES with room for its header
CURRICULA = {"v1": curriculum_v1, "v2": curriculum_v2}


def demo_spec() -> TinySpec:
    """The shipped demo model: about 2M parameters, under 5 MB in bf16 with its tokenizer."""
    return TinySpec(
        num_bpe_ranks=2000,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        num_shared_experts=1,
        vision_hidden=64,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate=128,
    )


def large_spec() -> TinySpec:
    """The v2 demo model (``--size large``): wider and deeper than ``demo_spec``, sharded files under 5 MB each.

    About 10M parameters (21 MB in bf16, six shards); depth (8 layers) for carries and copying, 8 heads. It was
    chosen on a step-time measurement that did not hold: trained for real on v2 (one core, 2048-token batches),
    a step costs 1.4-2.0 s (forward ~0.6 s + backward ~0.9 s; batching 15 ms), against 0.27-0.38 s for
    ``demo_spec``, so 108 minutes gave only 3772 steps, too few to learn copying (``trials/``).
    """
    return TinySpec(
        num_bpe_ranks=2000,
        hidden_size=256,
        num_layers=8,
        num_heads=8,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=24,
        qk_rope_head_dim=16,
        v_head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        num_shared_experts=1,
        vision_hidden=64,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate=128,
    )


def copy_spec() -> TinySpec:
    """``demo_spec``'s shapes with what copying needs (issue 17): the spaceless tokenizer and a wider rope band.

    With the real tokenizer a word copied from prose into JSON changes its first piece (" Perth" -> "Perth"),
    and YaRN over an original window of 32 positions blends every rotary frequency towards zero; here pieces
    never carry a space and the window is 256 (factor 16, the same 4096 positions), so the highest frequencies
    stay whole and the previous-token and induction heads that copying rests on can see exact offsets.
    """
    return with_copy_features(demo_spec())


def with_copy_features(spec: TinySpec) -> TinySpec:
    """``spec`` with ``copy_spec``'s tokenizer and rope window (tests apply them to the micro shapes)."""
    return replace(spec, spaceless_tokenizer=True, yarn_original_max=256, yarn_factor=16.0)


def micro_spec() -> TinySpec:
    """A much smaller model of the same architecture, for tests."""
    return TinySpec(
        num_bpe_ranks=1000,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_shared_experts=1,
        vision_hidden=16,
        vision_layers=1,
        vision_heads=2,
        vision_intermediate=32,
    )


# -- model I/O ------------------------------------------------------------------------------------------------


def initial_model(spec: TinySpec, seed: int) -> Mistral4Model:
    """A tiny checkpoint built through the real writer and loader, then ``training_init`` weights, float32."""
    with tempfile.TemporaryDirectory(prefix="small4-demo-init-") as tmp:
        make_tiny(tmp, layout="hf", seed=seed, spec=spec, dtype=torch.float32)
        model = load_model(tmp, dtype=torch.float32, progress=False)
    training_init(model, seed)
    model.requires_grad_(True)
    return model.train()


_OUTPUT_PROJECTIONS = ("o_proj", "experts.w2", "shared_experts.down", "feed_forward.down_proj")


def training_init(model: Mistral4Model, seed: int) -> None:
    """Re-draws every weight at a scale that trains well; ``random_hf_state_dict`` is tuned for parity tests instead.

    The parity weights make attention logits and router scores large on purpose (so a wrong scale shows in the
    logits), which saturates softmax from the first step and keeps a tiny model from learning where to attend
    (it never learns to copy a number from the prompt). Here: norms at 1, inputs at fan_in^-1/2, projections
    back into a residual stream damped by (2 * layers)^-1/2 (GPT-2), a near-uniform router.
    """
    g = torch.Generator().manual_seed(seed)
    depth = max(1, len(model.layers))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
                continue
            if name == "embed_tokens.weight":
                std = 1.0
            elif name.endswith("mlp.gate.weight"):
                std = 0.02
            else:
                fan_in = param.shape[-1] if param.dim() <= 3 else param[0].numel()  # [E,] out, in / conv
                std = fan_in**-0.5
                if any(key in name for key in _OUTPUT_PROJECTIONS):
                    std /= (2 * depth) ** 0.5
            param.copy_(torch.randn(param.shape, generator=g) * std)


def export_hf_state_dict(model: Mistral4Model, spec: TinySpec, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The model's weights under the HF checkpoint names ``tiny.random_hf_state_dict`` uses (inverse of the loader)."""
    mapper = NameMapper(model.config)
    out: dict[str, torch.Tensor] = {}
    for name, ref in random_hf_state_dict(spec, 0).items():
        base, role = split_role(name)
        dest = mapper.map(base)
        if dest is None or role != "weight":
            raise RuntimeError(f"cannot export {name}")
        param = getattr(model.get_submodule(dest.module), dest.param)
        tensor = param[dest.index] if dest.index else param
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RuntimeError(f"{name}: model shape {tuple(tensor.shape)}, checkpoint shape {tuple(ref.shape)}")
        out[name] = tensor.detach().to(dtype).contiguous().clone()
    return out


SIZES = {"small": demo_spec, "copy": copy_spec, "large": large_spec, "micro": micro_spec}


def save_checkpoint(model: Mistral4Model, spec: TinySpec, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(spec, fp8=False), indent=2))
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    write_sized_shards(export_hf_state_dict(model, spec), out)
    write_tiny_tekken(out / "tekken.json", spec.num_bpe_ranks, spec.spaceless_tokenizer)


def write_sized_shards(sd: dict[str, torch.Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """HF shards in name order, a new file whenever the next tensor would pass ``shard_bytes`` (at least two
    files, as the shipped checkpoint has always had), plus the index; returns the file names."""
    from safetensors.torch import save_file

    names = sorted(sd)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    limit = min(shard_bytes, -(-total // 2))
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = sd[name].numel() * sd[name].element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map = {}
    for fname, group in zip(files, groups, strict=True):
        save_file({n: sd[n].contiguous() for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def load_renderer(model_dir: Path) -> ChatRenderer:
    return ChatRenderer(MistralTokenizer.from_file(str(model_dir / "tekken.json")))


# -- training -------------------------------------------------------------------------------------------------


def batch_examples(renderer: ChatRenderer, rng: random.Random, token_budget: int, tasks=None, curriculum=None) -> list:
    """Draws examples (tasks by the curriculum's weights; v1's by default) until the packed batch would exceed the
    budget."""
    module = curriculum or curriculum_v1
    tasks = tasks or module.TASKS
    weights = [module.TASK_WEIGHTS[t] for t in tasks]
    return pack_until(
        lambda: encode_example(renderer, module.make_example(rng.choices(tasks, weights)[0], rng)), token_budget
    )


def _mixed_batch(
    renderer, rng, token_budget: int, module, vocab_size: int, drill_share: float, arith_share: float = 0.0
) -> list:
    """The curriculum's examples with ``drill_share`` of the budget left to copy drills (half of them long) and
    ``arith_share`` to arithmetic drills."""
    drill_tokens = int(token_budget * drill_share)
    arith_tokens = int(token_budget * arith_share)
    batch = batch_examples(renderer, rng, token_budget - drill_tokens - arith_tokens, curriculum=module)
    if drill_tokens:
        batch += copy_drill.drill_batch(rng, vocab_size, drill_tokens, long_share=0.5)
    if arith_tokens:
        batch += arith_drill.arith_batch(rng, _text_encoder(renderer), arith_tokens)
    return batch


def _text_encoder(renderer):
    tokenizer = renderer.tokenizer.instruct_tokenizer.tokenizer
    return lambda text: tokenizer.encode(text, bos=False, eos=False)


def batch_loss(model: Mistral4Model, batch: list[EncodedExample]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss over the masked (assistant) tokens of a packed batch; per-task means for logging."""
    ids, positions, labels, lens, img_slots, pixels, owner = [], [], [], [], [], [], []
    offset = 0
    image_token = model.config.vision.image_token_id if model.config.vision else -1
    for k, enc in enumerate(batch):
        n = len(enc.tokens)
        ids.extend(enc.tokens)
        positions.extend(range(n))
        if enc.labels is not None:
            labels.extend(enc.labels)
        else:
            labels.extend([enc.tokens[i + 1] if enc.mask[i + 1] else -100 for i in range(n - 1)] + [-100])
        owner.extend([k] * n)
        lens.append(n)
        if enc.images:
            img_slots.extend(offset + i for i, t in enumerate(enc.tokens) if t == image_token)
            pixels.extend(torch.as_tensor(img, dtype=torch.float32) for img in enc.images)
        offset += n
    input_ids = torch.tensor(ids)
    embeds = None
    if pixels:
        image_embeds = torch.cat(model.vision(pixels))
        embeds = model.embed(input_ids, image_embeds, torch.tensor(img_slots))
    hidden = model(input_ids, torch.tensor(positions), AttentionMetadata.for_prefill(lens), inputs_embeds=embeds)
    target = torch.tensor(labels)
    keep = target >= 0
    losses = F.cross_entropy(model.compute_logits(hidden[keep]), target[keep], reduction="none")
    owners = torch.tensor(owner)[keep]
    per_task: dict[str, list[float]] = defaultdict(list)
    for k, enc in enumerate(batch):
        per_task[enc.example.task].append(losses[owners == k].mean().item())
    return losses.mean(), {t: sum(v) / len(v) for t, v in per_task.items()}


def train(
    out: Path = DEFAULT_OUT,
    steps: int = 2000,
    seed: int = 0,
    spec: TinySpec | None = None,
    token_budget: int = 2048,
    lr: float = 3e-3,
    eval_per_task: int = 30,
    progress: bool = True,
    threads: int = 2,
    init_from: Path | None = None,
    curriculum: str = "v1",
    minutes: float | None = None,
    heldout_per_skill: int = 40,
    copy_drill_steps: int = 0,
    copy_drill_share: float = 0.0,
    copy_drill_tokens: int = 1024,
    arith_drill_share: float = 0.0,
) -> dict[str, Any]:
    """Trains, saves the checkpoint to ``out``, evaluates it, writes ``training_log.json`` and ``loss.png``.

    ``minutes`` stops at that wall time (or at ``steps``, whichever comes first) and runs the schedule on
    elapsed time. The v1 curriculum is evaluated in distribution (``accuracy``); v2 by the held-out generator
    through the real server (``heldout_v2``, ``heldout_per_skill`` cases per skill). The first
    ``copy_drill_steps`` steps train on ``copy_drill`` sequences only; after them ``copy_drill_share`` of each
    batch's token budget stays with the drills (so the copying circuit keeps being trained). Drill-only steps
    pack ``copy_drill_tokens`` tokens: small batches reach the induction circuit on fewer tokens. After the drill
    phase ``arith_drill_share`` of each batch goes to ``arith_drill`` lines (digit facts and whole sums)."""
    spec = spec or demo_spec()
    module = CURRICULA[curriculum]
    out = Path(out)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_tekken(out / "tekken.json", spec.num_bpe_ranks, spec.spaceless_tokenizer)
    renderer = load_renderer(out)
    previous = None
    if init_from is None:
        model = initial_model(spec, seed)
    else:  # continue training a saved demo checkpoint (bf16 weights, fresh optimizer state)
        init_from = Path(init_from)
        previous_path = init_from / "training_log.json"
        if previous_path.is_file():
            previous = json.loads(previous_path.read_text())
            previous.pop("eval_samples", None)
        model = load_model(init_from, dtype=torch.float32, progress=False).requires_grad_(True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warmup = max(1, min(100, steps // 10))
    budget_s = None if minutes is None else 60.0 * minutes

    def progress_at(step: int) -> float:
        """Fraction of the run done: by steps, or by wall time when that budget is the tighter one."""
        done = step / max(1, steps)
        if budget_s is not None:
            done = max(done, (time.monotonic() - start) / budget_s)
        return done

    def lr_at(step: int, done: float) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = min(1.0, max(0.0, done))
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    vocab_size = model.embed_tokens.weight.shape[0]
    history: list[float] = []
    seen: set[str] = set()
    task_history: dict[str, list[float]] = defaultdict(list)
    bar = tqdm(range(steps), desc="train-demo", disable=not progress)
    for step in bar:
        done = progress_at(step)
        if done >= 1.0 and step > 0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, done)
        if step < copy_drill_steps:
            batch = copy_drill.drill_batch(rng, vocab_size, copy_drill_tokens)
        else:
            batch = _mixed_batch(renderer, rng, token_budget, module, vocab_size, copy_drill_share, arith_drill_share)
        seen.update(question_key(enc.example) for enc in batch)
        loss, per_task = batch_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(loss.item())
        for t, v in per_task.items():
            task_history[t].append(v)
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}")
        if progress and (step + 1) % 500 == 0:
            recent = {t: round(sum(v[-100:]) / len(v[-100:]), 3) for t, v in sorted(task_history.items())}
            print(json.dumps({"step": step + 1, "s": round(time.monotonic() - start), "loss_per_task": recent}))
    train_s = time.monotonic() - start
    steps = len(history)

    model.eval()
    save_checkpoint(model, spec, out)
    earlier: list[float] = []
    if previous is not None:
        earlier = previous.get("loss_history") or [v for v in previous["loss_every_50_steps"] for _ in range(50)]
        earlier = earlier[: previous["total_steps"] if "total_steps" in previous else previous["steps"]]
    draw_loss_curve(earlier + history, out / "loss.png")
    eval_start = time.monotonic()
    accuracy: dict[str, float] | None = None
    samples: list = []
    overlap: dict[str, float] | None = None
    heldout = None
    if curriculum == "v1":
        accuracy, samples = evaluate(out, seed + 1000, eval_per_task, progress=progress)
        overlap = seen_fraction(eval_examples(seed + 1000, eval_per_task), seen)
    else:
        from small4.demo_model.heldout import run_heldout

        heldout = run_heldout(out, seed=seed + 1000, per_skill=heldout_per_skill)
    eval_s = time.monotonic() - eval_start
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    log = {
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "total_steps": steps + (previous.get("total_steps", previous["steps"]) if previous else 0),
        "init_from": "training_init" if previous is None else "previous phase (its log below)",
        "seed": seed,
        "curriculum": curriculum,
        "minutes_budget": minutes,
        "token_budget_per_step": token_budget,
        "copy_drill_steps": copy_drill_steps,
        "copy_drill_share": copy_drill_share,
        "copy_drill_tokens": copy_drill_tokens,
        "arith_drill_share": arith_drill_share,
        "lr": lr,
        "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01), warmup + cosine, grad clip 1.0",
        "torch_threads": torch.get_num_threads(),
        "train_wall_s": round(train_s, 1),
        "eval_wall_s": round(eval_s, 1),
        "final_loss": round(sum(history[-50:]) / len(history[-50:]), 4),
        "final_loss_per_task": {t: round(sum(v[-50:]) / len(v[-50:]), 4) for t, v in sorted(task_history.items())},
        "loss_every_50_steps": [
            round(sum(history[i : i + 50]) / len(history[i : i + 50]), 4) for i in range(0, steps, 50)
        ],
        "eval_seed": seed + 1000,
        "eval_per_task": eval_per_task,
        "accuracy": accuracy,
        "eval_questions_seen_in_training": overlap,
        "eval_samples": samples,
        "files": files,
        "loss_history": [round(v, 4) for v in earlier + history],
        "previous_phase": previous,
    }
    if heldout is not None:
        log["heldout_v2"] = heldout
    (out / "training_log.json").write_text(json.dumps(log, indent=2, ensure_ascii=False))
    return log


# -- evaluation -----------------------------------------------------------------------------------------------


def generate(model_dir: Path, renderer: ChatRenderer, examples: list[Example], max_tokens: int = 64) -> list[str]:
    """Greedy outputs (control tokens kept as text) of the saved checkpoint through the real engine."""
    from small4.config import EngineConfig
    from small4.engine.engine import Engine
    from small4.engine.multimodal import ImageInput
    from small4.engine.sampling_params import SamplingParams

    engine = Engine.from_model_dir(model_dir, EngineConfig())
    tok = renderer.tokenizer.instruct_tokenizer.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        rendered = renderer.render(ex.messages, tools=ex.tools, reasoning_effort=ex.reasoning_effort)
        images = [ImageInput(torch.as_tensor(img), hashlib.sha256(img.tobytes()).digest()) for img in rendered.images]
        engine.add_request(str(i), rendered.token_ids, params, images=images or None)
        tokens[str(i)] = []
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
    texts = []
    for i in range(len(examples)):
        ids = [t for t in tokens[str(i)] if t != tok.eos_id]
        texts.append(tok.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP))
    return texts


def parse_output(example: Example, text: str) -> dict[str, Any]:
    parser = OutputParser(reasoning=example.reasoning_effort != "none", tools=example.tools is not None)
    parser.feed(text)
    parser.finish()
    calls = [{"name": c.name, "arguments": c.arguments} for c in parser.tool_calls]
    return {"content": parser.content.strip(), "reasoning": parser.reasoning_content, "tool_calls": calls}


def score(example: Example, parsed: dict[str, Any]) -> dict[str, bool]:
    """Named checks of one output; each is a 0/1 accuracy sample."""
    exp, content = example.expected, parsed["content"]
    if example.task in ("add", "sub", "order"):
        return {f"{example.task}_{example.reasoning_effort}": content == exp["answer"]}
    if example.task == "tool_call":
        calls = parsed["tool_calls"]
        ok_name = len(calls) == 1 and calls[0]["name"] == exp["name"]
        try:
            ok_args = ok_name and json.loads(calls[0]["arguments"]) == exp["arguments"]
        except json.JSONDecodeError:
            ok_args = False
        return {"tool_call_name": ok_name, "tool_call_name_and_args": bool(ok_args)}
    if example.task == "tool_answer":
        return {
            "tool_answer_exact": content == exp["answer"],
            "tool_answer_uses_result": all(u in content for u in exp["uses"]),
        }
    if example.task == "vision":
        words = content.lower()
        colour = f" {exp['colour']} " in f" {words.replace('.', ' ')} "
        shape = exp["shape"] in words
        return {"vision_colour": colour, "vision_shape": shape, "vision_colour_and_shape": content == exp["answer"]}
    return {f"{example.task}_exact": content == exp["answer"]}


def question_key(example: Example) -> str:
    """Identity of a text question (request without images); images are always fresh, so vision has none."""
    if example.task == "vision":
        return ""
    contents = [m.get("content") for m in example.messages]  # tool call ids are random: leave them out
    return json.dumps([example.task, example.reasoning_effort, contents], sort_keys=True)


def seen_fraction(examples: list[Example], seen: set[str]) -> dict[str, float]:
    """Per task, the fraction of held-out questions that also occurred (same text) during training."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex in examples:
        if ex.task != "vision":
            hits[ex.task].append(question_key(ex) in seen)
    return {t: round(sum(v) / len(v), 3) for t, v in sorted(hits.items())}


def evaluate(model_dir: Path, seed: int, per_task: int, progress: bool = True) -> tuple[dict, list]:
    renderer = load_renderer(model_dir)
    examples = eval_examples(seed, per_task)
    texts = generate(model_dir, renderer, examples)
    results: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for ex, text in zip(examples, texts, strict=True):
        parsed = parse_output(ex, text)
        checks = score(ex, parsed)
        for k, v in checks.items():
            results[k].append(bool(v))
        if len([s for s in samples if s["task"] == ex.task]) < 3:
            question = next(m for m in reversed(ex.messages) if m["role"] == "user")["content"]
            if not isinstance(question, str):
                question = "<image> " + question[-1]["text"]
            samples.append(
                {"task": ex.task, "effort": ex.reasoning_effort, "question": question, "output": text, "checks": checks}
            )
    accuracy = {k: round(sum(v) / len(v), 3) for k, v in sorted(results.items())}
    if progress:
        for k, v in accuracy.items():
            print(f"  {k:28s} {v:.3f}  (n={len(results[k])})")
    return accuracy, samples


# -- loss plot ------------------------------------------------------------------------------------------------


def draw_loss_curve(history: list[float], path: Path, width: int = 640, height: int = 360) -> None:
    """Training loss (raw in grey, 25-step moving average in blue) on a log-free linear axis, drawn with PIL."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 15, 25, height - 35
    d.rectangle((left, top, right, bottom), outline="black")
    if history:
        lo, hi = 0.0, max(history)
        n = len(history)

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * i / max(1, n - 1)
            y = bottom - (bottom - top) * (v - lo) / max(1e-9, hi - lo)
            return x, y

        d.line([xy(i, v) for i, v in enumerate(history)], fill=(190, 190, 190), width=1)
        w = 25
        smooth = [sum(history[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(n)]
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            v = lo + (hi - lo) * frac
            y = xy(0, v)[1]
            d.line((left - 4, y, left, y), fill="black")
            d.text((5, y - 6), f"{v:.2f}", fill="black")
        for frac in (0.0, 0.5, 1.0):
            i = int((n - 1) * frac)
            x = xy(i, 0)[0]
            d.text((x - 10, bottom + 5), str(i), fill="black")
        d.text((left + 5, 5), f"small4 demo model: training loss ({n} steps, final {smooth[-1]:.3f})", fill="black")
    d.text((width // 2 - 15, height - 15), "step", fill="black")
    img.save(path, optimize=True)


# -- CLI ------------------------------------------------------------------------------------------------------


def check_sizes(out: Path) -> int:
    total = 0
    for p in out.iterdir():
        size = p.stat().st_size
        total += size
        if size > MAX_FILE_BYTES:
            raise RuntimeError(f"{p} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    return total


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    log = train(
        out,
        spec=SIZES[args.size](),
        curriculum=args.curriculum,
        minutes=args.minutes,
        heldout_per_skill=args.heldout_per_skill,
        steps=args.steps,
        seed=args.seed,
        token_budget=args.token_budget,
        eval_per_task=args.eval_per_task,
        threads=args.threads,
        lr=args.lr,
        init_from=Path(args.init_from) if args.init_from else None,
        copy_drill_steps=args.copy_drill_steps,
        copy_drill_share=args.copy_drill_share,
        copy_drill_tokens=args.copy_drill_tokens,
        arith_drill_share=args.arith_drill_share,
    )
    total = check_sizes(out)
    print(f"wrote the demo model to {out} ({total / 1e6:.2f} MB) in {log['train_wall_s']:.0f} s of training")
    rates = log["accuracy"] if log.get("accuracy") is not None else log["heldout_v2"]["rates"]
    print(json.dumps(rates, indent=2))
    if args.draft_out:
        _train_draft_after(out, Path(args.draft_out), args)
    return 0


def _train_draft_after(target: Path, draft_out: Path, args: argparse.Namespace) -> None:
    """``--draft-out``: the same command trains the new model's EAGLE draft head on its own answers (issue 17 / 16),
    with ``small4 train-draft``'s defaults and ``--draft-minutes`` of training."""
    from small4.demo_model import train_draft

    log = train_draft.train_draft(
        target_dir=target, out=draft_out, budget_s=60.0 * args.draft_minutes, threads=args.threads, seed=args.seed
    )
    train_draft.check_sizes(draft_out)
    print(f"wrote the draft to {draft_out}: acceptance {json.dumps(log['acceptance'])}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-demo", help="train the demo model on the chat curriculum (CPU; v2, large shapes)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output checkpoint directory")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-budget", type=int, default=2048, help="tokens per packed training batch")
    p.add_argument("--eval-per-task", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup, then cosine)")
    p.add_argument("--init-from", help="continue training this demo checkpoint instead of random weights")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (use 1 on a busy machine)")
    p.add_argument("--curriculum", choices=sorted(CURRICULA), default="v2", help="v1: the shipped model's tasks")
    p.add_argument("--size", choices=sorted(SIZES), default="large", help="small: the shipped model's shapes")
    p.add_argument("--minutes", type=float, default=None, help="stop training after this wall time")
    p.add_argument("--heldout-per-skill", type=int, default=40, help="held-out cases per skill (v2 curriculum)")
    p.add_argument("--copy-drill-steps", type=int, default=0, help="first steps on copy drills only (copy_drill.py)")
    p.add_argument("--copy-drill-share", type=float, default=0.0, help="share of later batches kept for copy drills")
    p.add_argument("--copy-drill-tokens", type=int, default=1024, help="tokens per drill-only step")
    p.add_argument("--arith-drill-share", type=float, default=0.0, help="share of later batches for arith_drill.py")
    p.add_argument("--draft-out", help="then train the new model's EAGLE draft head into this directory")
    p.add_argument("--draft-minutes", type=float, default=25.0, help="the draft's training budget (with --draft-out)")
    p.set_defaults(func=main)
