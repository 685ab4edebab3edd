"""The decode-graph path with every Triton kernel on (interpreter): static buffers padded to the ladder, the MLA
decode kernel told the shapes are static (split count from the table's capacity, lengths read on the device),
the fused MoE over padded rows. Greedy tokens equal the all-reference engine's."""

from __future__ import annotations

from small4.config import EngineConfig
from small4.engine.cuda_graphs import DecodeGraphs
from small4.engine.engine import LLM
from small4.engine.sampling_params import SamplingParams
from small4.weights.tiny import TinySpec, make_tiny


def test_graph_decode_with_triton_kernels_matches_reference(tmp_path, monkeypatch, device):
    make_tiny(tmp_path, layout="hf", seed=5, spec=TinySpec(num_layers=1, num_bpe_ranks=300))
    prompts = [[1, 1100, 1200, 1299], [1, 1050], [1, 1001, 1002, 1003, 1004, 1005, 1006]]
    params = SamplingParams(temperature=0, max_tokens=5)

    def generate(graphs: bool) -> list[list[int]]:
        config = EngineConfig(
            block_size=4, kv_cache_memory=1 << 20, max_num_seqs=4, device=str(device), enforce_eager=not graphs
        )
        llm = LLM(str(tmp_path), config)
        runner = llm.engine.runner
        if graphs:
            runner.decode_graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.pad_block, 8, max_batch=4)
        return [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params)]

    monkeypatch.setenv("SMALL4_KERNELS", "reference")
    expected = generate(graphs=False)
    monkeypatch.setenv("SMALL4_KERNELS", "triton")
    assert generate(graphs=True) == expected
