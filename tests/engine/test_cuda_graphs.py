"""The CUDA-graph decode path: static buffers padded to a ladder size give the same hidden states and greedy tokens
as the eager step, padded rows never touch a real cache block, and a smaller step after a larger one is not polluted
by the larger step's rows. Without the capture on the test device (any device); with graphs captured and replayed on
CUDA only."""

from __future__ import annotations

import pytest
import torch

from small4.config import EngineConfig
from small4.engine.cuda_graphs import DecodeGraphs, batch_ladder
from small4.engine.engine import LLM
from small4.engine.sampling_params import SamplingParams
from small4.model.context import AttentionMetadata
from small4.weights.loader import load_model
from small4.weights.tiny import make_tiny

BLOCK = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), layout="hf", seed=7)


def test_ladder_covers_every_batch_with_bounded_padding():
    for top in (1, 5, 64, 256, 300):
        ladder = batch_ladder(top)
        assert ladder[0] == 1 and ladder[-1] == top and ladder == sorted(set(ladder))
        for b in range(1, top + 1):
            bucket = next(x for x in ladder if x >= b)
            assert bucket - b < (8 if b <= 64 else 16 if b <= 256 else 32)


class Decoder:
    """A few sequences with cached prefixes in a scrambled paged cache whose unused rows are NaN."""

    def __init__(self, model, prefix_lens: list[int], num_blocks: int = 40) -> None:
        cfg = model.config.text
        self.model = model
        self.device = device = next(model.parameters()).device
        shape = (num_blocks + 1, BLOCK, cfg.latent_dim)
        self.caches = [torch.full(shape, float("nan"), device=device) for _ in range(cfg.num_layers)]
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist()
        per_seq = num_blocks // len(prefix_lens)
        self.tables = [perm[i * per_seq : (i + 1) * per_seq] for i in range(len(prefix_lens))]
        self.lens = list(prefix_lens)
        g = torch.Generator().manual_seed(2)
        for i, n in enumerate(prefix_lens):
            self.step_eager([i], torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist(), [0], n)

    def _slots(self, i: int, start: int, n: int) -> list[int]:
        return [self.tables[i][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]

    def step_eager(self, seqs: list[int], tokens: list[int], starts: list[int] | None = None, n_each: int = 1):
        starts = starts if starts is not None else [self.lens[i] for i in seqs]
        positions = [p for s in starts for p in range(s, s + n_each)]
        slots = [x for i, s in zip(seqs, starts, strict=True) for x in self._slots(i, s, n_each)]
        width = max(len(self.tables[i]) for i in seqs)
        meta = AttentionMetadata(
            query_start_loc=[k * n_each for k in range(len(seqs) + 1)],
            seq_lens=[s + n_each for s in starts],
            slot_mapping=torch.tensor(slots, device=self.device),
            block_tables=torch.tensor(
                [self.tables[i] + [0] * (width - len(self.tables[i])) for i in seqs], device=self.device
            ),
            block_size=BLOCK,
        )
        tokens_, positions_ = torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device)
        return self.model(tokens_, positions_, meta, self.caches)

    def step_graphs(self, graphs: DecodeGraphs, seqs: list[int], tokens: list[int]) -> torch.Tensor:
        positions = [self.lens[i] for i in seqs]
        slots = [self._slots(i, p, 1)[0] for i, p in zip(seqs, positions, strict=True)]
        return graphs.run(tokens, positions, slots, [self.tables[i] for i in seqs], [p + 1 for p in positions])


def compare_with_eager(model, capture: bool, tol: float) -> DecodeGraphs:
    """Steps of changing batch sizes through ``DecodeGraphs`` against the eager step on a twin cache: same hidden
    states (within ``tol`` of the largest), same real cache rows written, padding never in a real block."""
    prefixes = [9, 1, 17, 4, 6]
    eager, static = Decoder(model, prefixes), Decoder(model, prefixes)
    graphs = DecodeGraphs(model, static.caches, pad_block=40, max_blocks_per_seq=8, max_batch=8, capture=capture)
    assert graphs.bucket(3) == 4 and graphs.bucket(5) == 8
    g = torch.Generator().manual_seed(3)
    # 5 rows pad to 8; then 3 rows pad to 4, where row 3 must not replay the last step's row (a real slot)
    for seqs in ([0, 1, 2, 3, 4], [0, 1, 2], [2], [1, 2], [4, 0, 3, 1, 2]):
        tokens = torch.randint(0, model.config.text.vocab_size, (len(seqs),), generator=g).tolist()
        want = eager.step_eager(seqs, tokens)
        got = static.step_graphs(graphs, seqs, tokens)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item()), seqs
        for d in (eager, static):
            for i in seqs:
                d.lens[i] += 1
    for a, b in zip(eager.caches, static.caches, strict=True):  # same real blocks written (NaN where unwritten)
        assert torch.equal(a[:40].isnan(), b[:40].isnan())
        assert torch.allclose(a[:40].nan_to_num(7.0), b[:40].nan_to_num(7.0), atol=tol)
    return graphs


@torch.no_grad()
def test_static_padded_decode_equals_eager(model_dir, device):
    model = load_model(model_dir, dtype=torch.float32, progress=False).to(device)
    graphs = compare_with_eager(model, capture=False, tol=1e-5)
    assert not graphs.graphs  # the static path ran eagerly


@pytest.mark.cuda
@torch.no_grad()
def test_captured_decode_graphs_replay_like_eager(model_dir, device):
    """Captured per ladder size and replayed for each step. A padded bucket is a different GEMM shape than the
    eager batch (cuBLAS may pick another kernel), so the hidden states agree to float32 summation-order error:
    1e-4 of the largest value."""
    model = load_model(model_dir, dtype=torch.float32, progress=False).to(device)
    graphs = compare_with_eager(model, capture=True, tol=1e-4)
    assert sorted(graphs.graphs) == graphs.ladder == [1, 2, 4, 8]


def test_engine_greedy_same_through_static_decode_path(model_dir, device):
    prompts = [list(range(1000 + i, 1000 + i + n)) for i, n in enumerate((3, 11, 6, 20, 1))]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    outputs = []
    for use_graphs in (False, True):
        llm = LLM(model_dir, EngineConfig(block_size=BLOCK, max_num_seqs=4, device=str(device), enforce_eager=True))
        runner = llm.engine.runner
        calls = 0
        if use_graphs:
            runner.decode_graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.pad_block, 16, max_batch=4)
            real_run = runner.decode_graphs.run

            def counting_run(*args, real_run=real_run, **kwargs):
                nonlocal calls
                calls += 1
                return real_run(*args, **kwargs)

            runner.decode_graphs.run = counting_run
        outputs.append([r.outputs[0].token_ids for r in llm.generate(prompts, params)])
        assert (calls > 0) == use_graphs
    assert outputs[0] == outputs[1]
