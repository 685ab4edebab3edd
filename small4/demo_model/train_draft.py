"""`small4 train-draft`: trains the embedded demo model's EAGLE draft on CPU from the demo model's own hidden states.

Data: prompts from the generators of the curriculum the target was trained on (``curriculum`` or ``curriculum_v2``,
read from the target's ``training_log.json``; image tasks left out: the draft would need the vision tower's rows),
rendered as the server renders them, and answered by the demo model itself, greedily, through the real ``Engine``.
Each trajectory (prompt + the model's own answer) then goes once through the frozen target
(``Mistral4Model.forward``: the final-normed hidden ``h`` at every position, the hidden the runtime feeds the draft)
and its greedy next token at every position.

Training, per EAGLE: the draft at position p takes ``(embed(x_p), h_{p-1})`` and its output, through the target's
lm_head, is scored (cross-entropy) against the target's greedy token after x_p, i.e. the token after the next one
from ``h_{p-1}``'s point of view; plus EAGLE's feature regression (smooth L1 of the draft's output to ``h_p``). The
chain is unrolled (``unroll`` passes): pass j feeds the draft's own output of pass j-1 at p-1 in place of
``h_{p-1}``, as the second and third proposals of a k=3 chain do at inference. (Pass j's attention context is pass
j's own rows, not the cached true ones: the usual simplification of training-time unrolling.) Only positions where
the draft proposes at inference (the answer's) carry weight 1; the prompt's carry ``prompt_weight``.

Acceptance is measured twice on the same held-out prompts (another seed), both at k=3. ``runtime_acceptance``:
through small4's speculative runtime (``Engine`` with ``speculative_model``, greedy), reading its counters and
checking that its outputs equal the plain greedy ones. ``measure_acceptance``: a plain greedy-agreement loop written
here: the target's greedy trajectory is fixed, the draft proposes k tokens by chaining its own outputs from each
decode point (a stateless forward over the whole prefix per proposal), the leading matches are accepted plus the
target's bonus token, and decoding resumes after them. Reported: the rate at which the first proposal equals the
target's greedy next token, the mean accepted draft tokens per verify step, and the mean tokens per verify step
(accepted + 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from small4.model.context import AttentionMetadata
from small4.model.mistral4 import Mistral4Model
from small4.spec.eagle import EagleConfig, EagleDraft
from small4.spec.loading import save_draft

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "demo_model" / "draft"
MAX_FILE_BYTES = 5 * 1024 * 1024


@dataclass
class Trajectory:
    """A prompt and the target's own greedy answer, with the target's view of it: ``hidden[p]`` (final-normed,
    [L, H]) and ``greedy[p]``, the target's argmax token after position p ([L])."""

    tokens: list[int]
    prompt_len: int
    hidden: torch.Tensor | None = None
    greedy: torch.Tensor | None = None


def prompt_ids(renderer: Any, example: Any) -> list[int] | None:
    """The prompt as the server renders it; None for examples with images (left out)."""
    rendered = renderer.render(example.messages, tools=example.tools, reasoning_effort=example.reasoning_effort)
    return None if rendered.images else list(rendered.token_ids)


def target_fingerprint(target_dir: Path) -> str:
    """sha256 over the target's config and weight files: which demo checkpoint a draft was trained for."""
    digest = hashlib.sha256()
    for path in sorted(Path(target_dir).glob("*.safetensors")) + [Path(target_dir) / "config.json"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def describe_target(target_dir: Path) -> str:
    from small4.weights.embedded import SHIPPED_DEMO_DIR

    shipped = Path(target_dir).resolve() == SHIPPED_DEMO_DIR.resolve()
    return "small4/demo_model/checkpoint (the embedded demo model)" if shipped else str(target_dir)


def held_out_seed(seed: int) -> int:
    """The held-out prompts' seed for a training seed: another stream of the same generators."""
    return seed + 1_000_003


def target_curriculum(target_dir: Path) -> str:
    """The curriculum the target was trained on (its ``training_log.json``; v1 for a log that predates the field),
    so the draft learns on the kind of answers the target gives."""
    log_path = Path(target_dir) / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    return log.get("curriculum", "v1")


def curriculum_prompts(target_dir: Path, seed: int, n: int) -> list[list[int]]:
    """``n`` text prompts from the generators of the target's own curriculum (seeded)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from small4.chat.render import ChatRenderer
    from small4.demo_model import curriculum, curriculum_v2

    module = curriculum_v2 if target_curriculum(target_dir) == "v2" else curriculum
    renderer = ChatRenderer(MistralTokenizer.from_file(str(target_dir / "tekken.json")))
    tasks = tuple(t for t in module.TASKS if t != "vision")
    out: list[list[int]] = []
    for example in module.sample_examples(seed, 2 * n, tasks):
        ids = prompt_ids(renderer, example)
        if ids is not None:
            out.append(ids)
        if len(out) == n:
            break
    return out


def greedy_answers(target_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[Trajectory]:
    """The target's own greedy answers, through the real engine (continuous batching, paged cache)."""
    from small4.config import EngineConfig
    from small4.engine.engine import Engine
    from small4.engine.sampling_params import SamplingParams

    engine = Engine.from_model_dir(target_dir, EngineConfig(device="cpu", dtype="float32"))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    answers: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
        answers[str(i)] = []
    while engine.has_unfinished():
        for o in engine.step():
            answers[o.request_id].extend(o.new_token_ids)
    return [Trajectory(ids + answers[str(i)], len(ids)) for i, ids in enumerate(prompts)]


@torch.no_grad()
def annotate(target: Mistral4Model, trajectories: list[Trajectory], token_budget: int = 4096) -> None:
    """Fills ``hidden`` and ``greedy`` of each trajectory from packed stateless target forwards."""
    batches: list[list[Trajectory]] = [[]]
    for traj in trajectories:
        if batches[-1] and sum(len(t.tokens) for t in batches[-1]) + len(traj.tokens) > token_budget:
            batches.append([])
        batches[-1].append(traj)
    for batch in batches:
        lens = [len(t.tokens) for t in batch]
        ids = torch.tensor([x for t in batch for x in t.tokens])
        positions = torch.tensor([p for n in lens for p in range(n)])
        hidden = target(ids, positions, AttentionMetadata.for_prefill(lens))  # [T, H], final-normed
        greedy = target.compute_logits(hidden).argmax(-1)
        for t, h, g in zip(batch, hidden.split(lens), greedy.split(lens), strict=True):
            t.hidden, t.greedy = h.clone(), g.clone()


def init_draft(cfg: EagleConfig, seed: int) -> EagleDraft:
    """Random float32 draft: fan-in scaled matrices, residual outputs (o_proj, mlp.down) scaled down, norms at 1,
    and fc started as ``[small noise | identity]`` so the first layer sees the target's hidden from the start."""
    draft = EagleDraft(cfg).float()
    g = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size
    for name, p in draft.named_parameters():
        if p.dim() == 1:
            p.data.fill_(1.0)
            continue
        w = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        if name.endswith(("o_proj.weight", "mlp.down.weight")):
            w = w * 0.3
        if name == "fc.weight":
            w = torch.cat([w[:, :H] * 0.5, torch.eye(H)], dim=1)
        p.data.copy_(w)
    return draft.requires_grad_(True).train()


def _packed(trajs: list[Trajectory], target: Mistral4Model) -> dict[str, torch.Tensor]:
    """Draft inputs of a packed batch: positions p = 1..L-1 of each trajectory."""
    ids, pos, prev_h, labels, feat, answer, lens, first = [], [], [], [], [], [], [], []
    for t in trajs:
        L = len(t.tokens)
        ids.extend(t.tokens[1:])
        pos.extend(range(1, L))
        prev_h.append(t.hidden[:-1])
        labels.append(t.greedy[1:])
        feat.append(t.hidden[1:])
        answer.extend(p >= t.prompt_len for p in range(1, L))  # where the draft proposes at inference
        first.extend([1] + [0] * (L - 2))
        lens.append(L - 1)
    with torch.no_grad():
        embeds = target.embed_tokens(torch.tensor(ids))
    return {
        "embeds": embeds,
        "positions": torch.tensor(pos),
        "hidden": torch.cat(prev_h),
        "labels": torch.cat(labels),
        "features": torch.cat(feat),
        "answer": torch.tensor(answer, dtype=torch.bool),
        "first": torch.tensor(first, dtype=torch.bool),
        "lens": torch.tensor(lens),
    }


def draft_loss(
    draft: EagleDraft,
    target: Mistral4Model,
    batch: dict[str, torch.Tensor],
    unroll: int,
    feature_weight: float,
    prompt_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed loss of ``unroll`` chained passes (see the module docstring) and per-pass answer-token accuracy."""
    meta = AttentionMetadata.for_prefill(batch["lens"].tolist())
    hidden, stats, total = batch["hidden"], {}, torch.zeros(())
    for j in range(unroll):
        out = draft(batch["embeds"], hidden, batch["positions"], meta)  # [T, H]
        # pass j's first j rows of each trajectory have no pass j-1 output of their own before them: weight 0
        valid = torch.ones_like(batch["answer"])
        if j:
            valid = ~torch.stack([batch["first"].roll(k) for k in range(j)]).any(0)
        w = torch.where(batch["answer"], 1.0, prompt_weight) * valid
        rows = w > 0  # the lm_head (the costly part) runs on weighted rows only
        logits = target.compute_logits(out[rows])
        ce = F.cross_entropy(logits, batch["labels"][rows], reduction="none")
        reg = F.smooth_l1_loss(out[rows], batch["features"][rows], reduction="none").mean(-1)
        total = total + ((ce + feature_weight * reg) * w[rows]).sum() / w.sum().clamp(min=1.0)
        answer = batch["answer"][rows]
        stats[f"acc{j + 1}"] = (logits.argmax(-1) == batch["labels"][rows])[answer].float().mean().item()
        stats[f"ce{j + 1}"] = ce[answer].mean().item()
        # the next pass takes this pass's output at p-1 in place of the target's hidden at p-1 (a trajectory's
        # first row keeps the target's: nothing of its own trajectory precedes it)
        hidden = torch.where(batch["first"][:, None], batch["hidden"], torch.cat([out[:1], out[:-1]]))
    return total, stats


@torch.no_grad()
def propose(draft: EagleDraft, target: Mistral4Model, traj: Trajectory, n: int, k: int) -> list[int]:
    """The draft's k chained proposals after position n of ``traj`` (tokens up to n accepted, target hiddens up to
    n-1 known), by stateless forwards over the whole prefix."""
    tokens, hidden = list(traj.tokens[1 : n + 1]), traj.hidden[:n]
    out: list[int] = []
    for _ in range(k):
        T = len(tokens)
        embeds = target.embed_tokens(torch.tensor(tokens))
        d = draft(embeds, hidden, torch.arange(1, T + 1), AttentionMetadata.for_prefill([T]))
        token = int(target.compute_logits(d[-1:]).argmax(-1))
        out.append(token)
        tokens.append(token)
        hidden = torch.cat([hidden, d[-1:]])
    return out


@torch.no_grad()
def first_proposal_agreement(draft: EagleDraft, target: Mistral4Model, trajs: list[Trajectory]) -> float:
    """How often the draft's first proposal at an answer position equals the target's greedy next token: one
    stateless draft forward per trajectory over the true pairs ``(embed(x_p), h_{p-1})``."""
    hits = total = 0
    for t in trajs:
        L = len(t.tokens)
        embeds = target.embed_tokens(torch.tensor(t.tokens[1:]))
        d = draft(embeds, t.hidden[:-1], torch.arange(1, L), AttentionMetadata.for_prefill([L - 1]))  # [L-1, H]
        rows = torch.arange(1, L) >= t.prompt_len  # positions where the draft proposes
        hits += int((target.compute_logits(d[rows]).argmax(-1) == t.greedy[1:][rows]).sum())
        total += int(rows.sum())
    return hits / max(1, total)


@torch.no_grad()
def measure_acceptance(draft: EagleDraft, target: Mistral4Model, trajs: list[Trajectory], k: int = 3) -> dict[str, Any]:
    """Greedy speculative decoding simulated on the target's fixed greedy trajectories (module docstring)."""
    draft.eval()
    steps, accepted, first_hits, first_total = 0, 0, 0, 0
    for t in trajs:
        n, L = t.prompt_len, len(t.tokens)
        while n < L - 1:
            truth = t.tokens[n + 1 : n + 1 + k]
            proposal = propose(draft, target, t, n, len(truth))
            a = 0
            while a < len(truth) and proposal[a] == truth[a]:
                a += 1
            first_hits += int(proposal[0] == truth[0])
            first_total += 1
            steps += 1
            accepted += a
            n += a + 1
    return {
        "method": "greedy-agreement loop over the target's own greedy trajectories (train_draft.measure_acceptance)",
        "k": k,
        "prompts": len(trajs),
        "verify_steps": steps,
        "first_proposal_agreement": first_hits / max(1, first_total),
        "mean_accepted_draft_tokens": accepted / max(1, steps),
        "mean_tokens_per_verify_step": (accepted + steps) / max(1, steps),
    }


def runtime_acceptance(
    target_dir: Path, draft_dir: Path, held_out: list[Trajectory], max_tokens: int, k: int = 3
) -> dict[str, Any]:
    """The same held-out prompts through small4's own speculative runtime (``Engine`` with ``speculative_model``,
    greedy): its acceptance counters, and whether every output equals the plain greedy answer."""
    from small4.config import EngineConfig
    from small4.engine.engine import Engine
    from small4.engine.sampling_params import SamplingParams

    cfg = EngineConfig(device="cpu", dtype="float32", speculative_model=str(draft_dir), num_speculative_tokens=k)
    engine = Engine.from_model_dir(target_dir, cfg)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs: dict[str, list[int]] = {}
    for i, t in enumerate(held_out):
        engine.add_request(str(i), t.tokens[: t.prompt_len], params)
        outputs[str(i)] = []
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id].extend(o.new_token_ids)
    stats = engine.spec.stats
    same = all(outputs[str(i)] == t.tokens[t.prompt_len :] for i, t in enumerate(held_out))
    return {
        "method": "small4's speculative runtime (Engine, speculative_model = this draft, greedy)",
        "k": k,
        "prompts": len(held_out),
        "verify_steps": stats.num_verifies,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_draft_tokens": stats.num_accepted / max(1, stats.num_verifies),
        "mean_tokens_per_verify_step": stats.mean_accepted_length,
        "outputs_identical_to_plain_greedy": same,
    }


def measure(
    target: Mistral4Model, target_dir: Path, draft_dir: Path, evals: list[Trajectory], max_tokens: int
) -> dict[str, Any]:
    """Both acceptance measurements of the draft saved in ``draft_dir`` (bf16, as shipped) on ``evals``."""
    from small4.spec.loading import load_draft

    shipped = load_draft(draft_dir, target, dtype=torch.float32)
    loop = measure_acceptance(shipped, target, evals, k=3)
    loop["first_proposal_agreement_teacher_forced"] = first_proposal_agreement(shipped, target, evals)
    return {"greedy_agreement_loop": loop, "runtime": runtime_acceptance(target_dir, draft_dir, evals, max_tokens)}


def _batches(trajs: list[Trajectory], rng: random.Random, token_budget: int):
    order = list(range(len(trajs)))
    while True:
        rng.shuffle(order)
        batch, total = [], 0
        for i in order:
            if batch and total + len(trajs[i].tokens) > token_budget:
                yield batch
                batch, total = [], 0
            batch.append(trajs[i])
            total += len(trajs[i].tokens)


def train_draft(
    target_dir: Path | None = None,
    out: Path = DEFAULT_OUT,
    steps: int = 1100,
    budget_s: float = 1500.0,
    num_prompts: int = 1500,
    eval_prompts: int = 60,
    num_layers: int = 1,
    intermediate_size: int | None = None,
    unroll: int = 3,
    feature_weight: float = 0.1,
    prompt_weight: float = 0.0,
    lr: float = 2e-3,
    token_budget: int = 2048,
    max_tokens: int = 64,
    seed: int = 0,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates the data, trains, saves the draft (released layout, bf16) to ``out`` with ``training_log.json``."""
    from small4.weights.embedded import embedded_model_dir
    from small4.weights.loader import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    target_dir = Path(target_dir or embedded_model_dir())
    start = time.monotonic()
    target = load_model(target_dir, dtype=torch.float32, progress=False)
    prompts = curriculum_prompts(target_dir, seed, num_prompts)
    held_out = curriculum_prompts(target_dir, held_out_seed(seed), eval_prompts)
    answered = greedy_answers(target_dir, prompts + held_out, max_tokens)  # one engine for both sets
    trajs, evals = answered[: len(prompts)], answered[len(prompts) :]
    annotate(target, trajs + evals)
    data_s = time.monotonic() - start
    cfg = EagleConfig.from_target(
        target.config.text,
        num_layers=num_layers,
        intermediate_size=intermediate_size or 3 * target.config.text.hidden_size,
    )
    draft = init_draft(cfg, seed)
    params = list(draft.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, min(100, steps // 10))
    history: list[dict[str, float]] = []
    batches = _batches(trajs, random.Random(seed), token_budget)
    train_start = time.monotonic()
    for step in range(steps):
        # the schedule runs on whichever budget is spent faster, steps or wall time
        frac = max(step / steps, (time.monotonic() - train_start) / budget_s)
        if frac >= 1.0:
            break
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        loss, stats = draft_loss(draft, target, _packed(next(batches), target), unroll, feature_weight, prompt_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step, "loss": loss.item(), **stats})
        if progress and step % 50 == 0:
            print(
                f"step {step}: loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True
            )
    train_s = time.monotonic() - train_start
    draft.requires_grad_(False).eval()
    save_draft(draft, out)
    acceptance = measure(target, target_dir, out, evals, max_tokens)
    log = {
        "target": describe_target(target_dir),
        "target_sha256": target_fingerprint(target_dir),
        "draft": {
            "num_layers": num_layers,
            "intermediate_size": cfg.intermediate_size,
            "target_hidden": cfg.target_hidden,
        },
        "data": {
            "train_prompts": len(trajs),
            "train_tokens": sum(len(t.tokens) for t in trajs),
            "seed": seed,
            "held_out_prompts": len(evals),
            "max_tokens": max_tokens,
            "data_wall_s": round(data_s, 1),
        },
        "training": {
            "steps": len(history),
            "max_steps": steps,
            "budget_s": budget_s,
            "lr": lr,
            "token_budget": token_budget,
            "unroll": unroll,
            "feature_weight": feature_weight,
            "prompt_weight": prompt_weight,
            "threads": threads,
            "train_wall_s": round(train_s, 1),
        },
        "acceptance": acceptance,
        "loss_curve": [{k: round(v, 4) for k, v in h.items()} for h in history[:: max(1, len(history) // 200)]],
    }
    (Path(out) / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


def check_sizes(out: Path) -> int:
    total = 0
    for p in Path(out).iterdir():
        size = p.stat().st_size
        total += size
        if size > MAX_FILE_BYTES:
            raise RuntimeError(f"{p} is {size} bytes, over the {MAX_FILE_BYTES} byte limit")
    return total


def remeasure(target_dir: Path | None, out: Path, seed: int, eval_prompts: int, max_tokens: int = 64) -> dict:
    """Measures the draft already in ``out`` again (both methods, the training run's held-out prompts) and
    rewrites the ``acceptance`` of its ``training_log.json``."""
    from small4.weights.embedded import embedded_model_dir
    from small4.weights.loader import load_model

    target_dir = Path(target_dir or embedded_model_dir())
    target = load_model(target_dir, dtype=torch.float32, progress=False)
    evals = greedy_answers(target_dir, curriculum_prompts(target_dir, held_out_seed(seed), eval_prompts), max_tokens)
    annotate(target, evals)
    log_path = Path(out) / "training_log.json"
    log = json.loads(log_path.read_text())
    log["acceptance"] = measure(target, target_dir, Path(out), evals, max_tokens)
    log["target"], log["target_sha256"] = describe_target(target_dir), target_fingerprint(target_dir)
    log_path.write_text(json.dumps(log, indent=1))
    return log


def main(args: argparse.Namespace) -> int:
    if args.measure_only:
        log = remeasure(args.target, Path(args.out), args.seed, args.eval_prompts)
        print(json.dumps(log["acceptance"], indent=2))
        return 0
    log = train_draft(
        target_dir=Path(args.target) if args.target else None,
        out=Path(args.out),
        steps=args.steps,
        budget_s=args.budget_s,
        num_prompts=args.prompts,
        eval_prompts=args.eval_prompts,
        num_layers=args.layers,
        unroll=args.unroll,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    total = check_sizes(Path(args.out))
    train_s = log["training"]["train_wall_s"]
    print(f"wrote the draft to {args.out} ({total / 1e6:.2f} MB) after {train_s:.0f} s of training")
    print(json.dumps(log["acceptance"], indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-draft", help="train the demo model's EAGLE draft on its own hidden states (CPU)")
    p.add_argument("--target", help="target checkpoint (default: the embedded demo model)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (released layout)")
    p.add_argument("--steps", type=int, default=1100, help="most optimizer steps")
    p.add_argument("--budget-s", type=float, default=1500.0, help="most seconds of training (the schedule follows)")
    p.add_argument("--prompts", type=int, default=1500, help="curriculum prompts answered by the target for training")
    p.add_argument("--eval-prompts", type=int, default=60, help="held-out prompts for the acceptance measurement")
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers (the release has 2)")
    p.add_argument("--unroll", type=int, default=3, help="chained passes per step (the k=3 chain)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--measure-only", action="store_true", help="re-measure the draft in --out, rewrite its log")
    p.set_defaults(func=main)
