"""Engines with and without an in-process EAGLE draft over a tiny checkpoint, for the speculative tests."""

from __future__ import annotations

import torch

from small4.config import EngineConfig
from small4.engine.engine import LLM, Engine
from small4.engine.model_runner import ModelRunner
from small4.engine.sampling_params import SamplingParams
from small4.spec.eagle import EagleConfig, EagleDraft
from small4.spec.runtime import SpeculativeDecoder
from small4.tokenizer import Tokenizer
from small4.weights.loader import load_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def random_draft(target, seed: int = 0, layers: int = 1, scale: float = 0.3) -> EagleDraft:
    """A draft of the target's shapes with random weights (it rarely agrees with the target)."""
    cfg = EagleConfig.from_target(target.config.text, num_layers=layers, intermediate_size=64)
    draft = EagleDraft(cfg).to(target.embed_tokens.weight.dtype)
    g = torch.Generator().manual_seed(seed)
    for p in draft.parameters():
        fan_in = p.shape[-1] if p.dim() == 2 else 1
        val = torch.randn(p.shape, generator=g) * (scale / fan_in**0.5 if p.dim() == 2 else 0.1) + (p.dim() == 1)
        p.copy_(val)
    return draft


def load_target(model_dir):
    return load_model(model_dir, dtype=torch.float32, device="cpu", progress=False)


def make_llm(model_dir, target=None, draft=None, num_blocks: int | None = 160, **cfg) -> LLM:
    """An ``LLM`` over ``target`` (loaded from ``model_dir`` if None) with ``draft`` attached (None: plain)."""
    target = target if target is not None else load_target(model_dir)
    cfg.setdefault("block_size", 4)
    cfg.setdefault("device", "cpu")
    cfg.setdefault("dtype", "float32")
    if draft is not None:
        cfg.setdefault("num_speculative_tokens", 3)
    engine_cfg = EngineConfig(**cfg)
    runner = ModelRunner(target, engine_cfg, num_blocks=num_blocks, draft=draft)
    return LLM.from_engine(Engine(runner, Tokenizer.from_file(model_dir)))


def prompts(n: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(1000, 3000, (13,), generator=g).tolist()
    out = []
    for i in range(n):
        own = torch.randint(1000, 3000, (2 + 5 * i % 17,), generator=g).tolist()
        out.append(shared + own if i % 2 == 0 else own)  # every other prompt shares a 13-token prefix
    return out


class OracleDecoder(SpeculativeDecoder):
    """A draft whose proposals are forced: the plain greedy continuation, with every ``wrong``-th proposal
    replaced by another token (so runs are accepted, then rejected, at known places). The real draft still runs
    its catch-up; only the proposals are replaced, with one-hot q (what a greedy draft's q is)."""

    def __init__(self, base: SpeculativeDecoder, truth: dict[tuple[int, ...], list[int]], wrong: int) -> None:
        super().__init__(base.runner, base.block_manager, base.k, base.max_model_len, base.eos_token_id)
        self.truth, self.wrong = truth, wrong

    def _chain(self, reqs, budgets, hidden, seqs, rng) -> None:
        vocab = self.runner.config.text.vocab_size
        for req, budget in zip(reqs, budgets, strict=True):
            cont = self.truth[tuple(req.prompt_token_ids)]
            pos = req.num_output_tokens
            drafts = [t if (pos + j) % self.wrong else (t + 1) % vocab for j, t in enumerate(cont[pos : pos + budget])]
            if not drafts:
                continue
            req.draft_token_ids = drafts
            self.proposals[req.request_id] = torch.nn.functional.one_hot(torch.tensor(drafts), vocab).float()


def generate(llm, ps, params=GREEDY, check_books: bool = True):
    """``llm.generate`` by hand, checking the block manager's invariants after every step."""
    engine = llm.engine
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, params)
    tokens: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
        if check_books:
            live = [s.request for s in engine.sequences.values() if not s.request.is_finished]
            engine.block_manager.check_invariants(engine.scheduler.running + [r for r in live if r.block_ids == []])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [tokens[key] for key in sorted(tokens, key=lambda k: (int(k[0][1:]), k[1]))]
