"""The engine and `small4 bench` run with only torch and triton: the server and chat libraries (which a bare CUDA
image lacks) are refused by an import blocker in a fresh interpreter, and the commands must still work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

BLOCKED = ["mistral_common", "fastapi", "pydantic", "uvicorn", "llguidance", "openai", "starlette"]

_BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"blocked for this test: {name}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    """
)


def _run_blocked(body: str, timeout: float = 240) -> subprocess.CompletedProcess:
    code = _BLOCKER + textwrap.dedent(body)
    env = {**os.environ, "SMALL4_KERNELS": "reference"}
    return subprocess.run(
        [sys.executable, "-c", code, ",".join(BLOCKED)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_blocker_really_blocks():
    done = _run_blocked("import mistral_common")
    assert done.returncode != 0 and "blocked for this test" in done.stderr


def test_engine_imports_without_server_and_chat_libraries():
    done = _run_blocked(
        """
        import small4.engine.engine, small4.engine.model_runner, small4.engine.async_engine, small4.tokenizer
        from small4.engine.engine import LLM, Engine
        from small4.engine import AsyncEngine, RequestOutput, SamplingParams  # the engine's face
        import small4.bench, small4.model, small4.weights, small4.kernels, small4.parallel, small4.server
        from small4.bench.serving import bench_tokenizer
        tok = bench_tokenizer(3000)
        assert tok.vocab_size == 3000 and tok.token_bytes(1000 + 65) == b"A" and tok.is_special(34)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_bench_full_tiny_runs_without_server_and_chat_libraries(tmp_path):
    out = tmp_path / "full.json"
    argv = ["bench", "full", "--tiny", "--layers", "1", "--batch-sizes", "1", "--contexts", "8", "--prefill-len", "8"]
    argv += ["--decode-steps", "1", "--warmup-steps", "1", "--repeats", "1", "--serving-concurrency", "2"]
    argv += ["--serving-input-len", "6", "--serving-output-len", "3", "--cuda-graph", "--out", str(out)]
    done = _run_blocked(
        f"""
        from small4.cli import main
        rc = main({argv!r})
        bad = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not bad, bad
        sys.exit(rc)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["decode"][0]["status"] == "ok"
    serving = record["serving"][0]
    assert serving["status"] == "ok" and serving["output_tokens"] == serving["num_requests"] * 3


def test_serve_without_its_libraries_says_what_is_missing():
    done = _run_blocked(
        """
        from small4.cli import main
        sys.exit(main(["serve", "--port", "1"]))
        """
    )
    assert done.returncode == 1
    assert "small4 serve needs" in done.stderr


def test_bench_full_builds_graphs_only_with_the_triton_kernels(monkeypatch):
    """`--cuda-graph` under SMALL4_KERNELS=reference would capture host reads of the lengths and die: not built."""
    import torch

    from small4.bench.fullscale import Bench

    bench = Bench(None, None, 1, "fp8", torch.device("cuda"), None, 0, cuda_graph=True)  # no GPU touched
    monkeypatch.setenv("SMALL4_KERNELS", "reference")
    assert not bench.graphs
    monkeypatch.setenv("SMALL4_KERNELS", "auto")
    assert bench.graphs
    assert not Bench(None, None, 1, "fp8", torch.device("cpu"), None, 0, cuda_graph=True).graphs
