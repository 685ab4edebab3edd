"""Ahead-of-time compile check of every Triton kernel for a GPU target, on a machine without a GPU.

Why: a kernel whose tiles need more shared memory than the target has fails only at its first launch on the GPU,
and one whose registers spill is silently slow. Both are properties of the compiled binary, not of the device, so
they can be checked in CI: a stand-in Triton driver reports ``GPUTarget("cuda", arch, 32)`` with no device, every
launch through the real Python wrappers (on meta tensors, at the real model shapes) becomes a compile-only warm-up,
and ``ptxas -v`` (shipped in the triton wheel) reports registers and spills of the PTX. Nothing runs.

What is compiled: every block-size config the code can pick at the real shapes, i.e. each row of the fused MoE's
default table for BF16, FP8 and NVFP4 experts; MLA decode's tiles for BF16 and FP8 caches with every merge width
the split heuristic can give; the latent write for both caches. ``grid`` adds every config of ``small4 bench
tune-moe``'s grid. Shared memory and spills depend on the tiles and dtypes, not on the token count, so one token
count per config suffices.

Run ``python -m small4.kernels.aot [--grid] [--arch 90|100] [--out report.json]`` (without ``TRITON_INTERPRET``);
``--write-fit`` records which grid configs fit in ``GRID_FIT_PATH``, which ``tune-moe`` reads to skip the rest.
The CI test compiles a representative subset for sm_90 (``--subset ci``) and one case per kernel for sm_100
(``--subset smoke``). Must run in its own process: it replaces Triton's active driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Max dynamic shared memory per block (opt-in), bytes: 227 KiB on both H100/H200 (sm_90) and B200 (sm_100).
SMEM_LIMIT = {90: 232_448, 100: 232_448}
GRID_FIT_PATH = Path(__file__).parent / "moe_configs" / "grid_fit.json"

# The real Mistral Small 4 shapes.
HIDDEN, EXPERTS, WIDTH, TOP_K = 4096, 128, 2048, 4
HEADS, LATENT, ROPE = 32, 256, 64
BLOCK_SIZE = 16  # EngineConfig.block_size's default
MOE_WEIGHTS = ("bf16", "fp8", "nvfp4")


@dataclass
class Compiled:
    """One compiled kernel: what ``ptxas`` and Triton say about it."""

    case: str
    kernel: str
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shared: int
    shared_ok: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    mma: str | None = None  # tensor-core instruction in the PTX: tcgen05.mma (Blackwell), wgmma (Hopper), mma.sync

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


@dataclass
class Report:
    arch: int
    triton: str
    compiled: list[Compiled] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "triton": self.triton,
            "smem_limit": SMEM_LIMIT[self.arch],
            "seconds": round(self.seconds, 1),
            "compiled": [asdict(c) for c in self.compiled],
            "errors": self.errors,
        }


@contextmanager
def compile_only(arch: int) -> Iterator[list[tuple[str, Any]]]:
    """Installs a stand-in CUDA driver for ``arch`` and turns every kernel launch into a compile; yields the list
    the compiled kernels are appended to (name, CompiledKernel). Restores Triton afterwards."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs compiled kernels: unset TRITON_INTERPRET")

    class StandInCuda(DriverBase):
        def __init__(self) -> None:
            self.target = GPUTarget("cuda", arch, 32)

        @staticmethod
        def is_active() -> bool:
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_active_torch_device(self) -> torch.device:
            return torch.device("meta")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_benchmarker(self):
            raise NotImplementedError

        def get_device_interface(self):
            raise NotImplementedError

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError

        def clear_cache(self, cache) -> None:
            pass

    records: list[tuple[str, Any]] = []
    real_run = jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        records.append((self.fn.__name__, kernel, {k: v for k, v in kwargs.items() if k.isupper()}))
        return kernel

    previous = driver._active  # not reset_active(): that would look for a real GPU driver
    driver.set_active(StandInCuda())
    jit.JITFunction.run = run
    try:
        yield records
    finally:
        jit.JITFunction.run = real_run
        driver._active = previous


def ptxas_resources(ptx: str, arch: int) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes) of a kernel's PTX, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(src), "-o", str(Path(d) / "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=False).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (
        int(regs.group(1)) if regs else None,
        int(spill.group(1)) if spill else None,
        int(spill.group(2)) if spill else None,
    )


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def moe_call(weights: str, tokens: int, config: dict[str, int] | None) -> Callable[[], object]:
    """One fused-MoE call at the real shapes with ``weights`` bf16 / fp8 / nvfp4 (bf16 activations)."""
    from small4.kernels.fused_moe import fused_moe, fused_moe_nvfp4

    E, H, I, T = EXPERTS, HIDDEN, WIDTH, tokens
    x, ids, wts = _meta(T, H), _meta(T, TOP_K, dtype=torch.long), _meta(T, TOP_K, dtype=torch.float32)
    if weights == "nvfp4":
        u8, f8 = torch.uint8, torch.float8_e4m3fn
        w13 = (_meta(E, 2 * I, H // 2, dtype=u8), _meta(E, 2 * I, H // 16, dtype=f8), _meta(E, 2, dtype=torch.float32))
        w2 = (_meta(E, H, I // 2, dtype=u8), _meta(E, H, I // 16, dtype=f8), _meta(E, dtype=torch.float32))
        return lambda: fused_moe_nvfp4(x, *w13, *w2, ids, wts, config=config)
    wd = torch.float8_e4m3fn if weights == "fp8" else torch.bfloat16
    w13, w2 = _meta(E, 2 * I, H, dtype=wd), _meta(E, H, I, dtype=wd)
    s13 = _meta(E, 2, 1, dtype=torch.float32) if weights == "fp8" else None
    s2 = _meta(E, 1, 1, dtype=torch.float32) if weights == "fp8" else None
    return lambda: fused_moe(x, w13, w2, ids, wts, s13, s2, config=config)


def mla_call(cache_dtype: torch.dtype, num_splits: int, batch: int = 8, context: int = 4096) -> Callable[[], object]:
    from small4.kernels.mla_decode import mla_decode

    per_seq = -(-context // BLOCK_SIZE)
    q_lat, q_rope = _meta(batch, HEADS, LATENT), _meta(batch, HEADS, ROPE)
    cache = _meta(batch * per_seq + 1, BLOCK_SIZE, LATENT + ROPE, dtype=cache_dtype)
    tables, lens = _meta(batch, per_seq, dtype=torch.int32), _meta(batch, dtype=torch.int32)
    return lambda: mla_decode(q_lat, q_rope, cache, tables, lens, 0.1, num_splits=num_splits)


def latent_call(cache_dtype: torch.dtype, tokens: int = 8) -> Callable[[], object]:
    from small4.kernels.latent_write import latent_write

    ckv, weight = _meta(tokens, LATENT + ROPE), _meta(LATENT)
    cos, sin = _meta(tokens, ROPE // 2), _meta(tokens, ROPE // 2)
    slots = _meta(tokens, dtype=torch.long)
    cache = _meta(64, BLOCK_SIZE, LATENT + ROPE, dtype=cache_dtype)
    return lambda: latent_write(ckv, weight, 1e-6, cos, sin, True, slots, cache)


def default_cases() -> list[tuple[str, Callable[[], object]]]:
    """Every config the default tables and heuristics can pick at the real shapes."""
    from small4.kernels.fused_moe import MOE_CONFIGS
    from small4.kernels.mla_decode import MAX_SPLITS

    cases = []
    for weights in MOE_WEIGHTS:
        for lo, _hi in MOE_CONFIGS:
            cases.append((f"fused_moe {weights} T={max(lo, 1)}", moe_call(weights, max(lo, 1), None)))
    for cache in (torch.bfloat16, torch.float8_e4m3fn):
        splits = 1
        while splits <= MAX_SPLITS:  # the merge kernel's BLOCK_S = next_power_of_2(num_splits)
            cases.append((f"mla_decode cache={cache} splits={splits}", mla_call(cache, splits)))
            splits *= 2
        cases.append((f"latent_write cache={cache}", latent_call(cache)))
    return cases


def grid_cases(weights: tuple[str, ...] = MOE_WEIGHTS, configs: list[dict[str, int]] | None = None):
    """Every config of the tune-moe grid (or ``configs``), per expert weight format."""
    from small4.kernels.moe_grid import FULL_GRID, candidates

    cases = []
    for weights_ in weights:
        for config in configs if configs is not None else candidates(FULL_GRID):
            if weights_ == "nvfp4" and config["BLOCK_K"] % 32:
                continue
            cases.append((f"grid {weights_} {json.dumps(config, sort_keys=True)}", moe_call(weights_, 256, config)))
    return cases


# The CI subset: the default MoE rows of each format, one MLA split count per cache, both latent writes, and the
# grid's largest corner (the tiles that can overflow shared memory or spill).
CI_GRID = [{"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}]


def ci_cases() -> list[tuple[str, Callable[[], object]]]:
    cases = [c for c in default_cases() if not c[0].startswith("mla_decode") or "splits=1" in c[0] or "=32" in c[0]]
    return cases + grid_cases(configs=CI_GRID)


def smoke_cases() -> list[tuple[str, Callable[[], object]]]:
    """One case per kernel and format with the largest default tiles: a quick check of another architecture."""
    keep = ("T=2049", "splits=32", "latent_write")
    return [c for c in default_cases() if any(k in c[0] for k in keep)]


def check(cases: list[tuple[str, Callable[[], object]]], arch: int = 90, log=print) -> Report:
    """Compiles each case for ``arch`` and collects every kernel it launched; a case that fails to compile is an
    error entry (with Triton's message), not an exception."""
    import triton

    report, seen = Report(arch=arch, triton=triton.__version__), {}
    start = time.perf_counter()
    with compile_only(arch) as records:
        for name, call in cases:
            records.clear()
            try:
                call()
            except Exception as e:  # noqa: BLE001 - e.g. OutOfResources: reported, the sweep goes on
                report.errors.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}"})
                log(f"  {name}: ERROR {type(e).__name__}: {str(e)[:200]}")
                continue
            for kernel_name, kernel, constexprs in records:
                md = kernel.metadata
                if md.hash not in seen:
                    seen[md.hash] = ptxas_resources(kernel.asm["ptx"], arch)
                regs, stores, loads = seen[md.hash]
                shared, ptx = int(md.shared), kernel.asm["ptx"]
                mma = next((m for m in ("tcgen05.mma", "wgmma", "mma.sync") if m in ptx), None)
                c = Compiled(name, kernel_name, constexprs, md.num_warps, md.num_stages, shared,
                             shared <= SMEM_LIMIT[arch], regs, stores, loads, mma)  # fmt: skip
                report.compiled.append(c)
                flag = "" if c.shared_ok and not c.spills else "  <-- " + ("SMEM" if not c.shared_ok else "SPILLS")
                log(f"  {name}: {kernel_name} smem={shared} regs={regs} spills={stores}/{loads} {mma}{flag}")
    report.seconds = time.perf_counter() - start
    return report


def grid_fit(report: Report) -> dict[str, Any]:
    """Per weight format, the grid configs whose kernels all fit (shared memory within the limit, no spills)."""
    out: dict[str, dict[str, Any]] = {}
    for c in report.compiled:
        if not c.case.startswith("grid "):
            continue
        _, weights, config = c.case.split(" ", 2)
        entry = out.setdefault(weights, {}).setdefault(config, {"fits": True, "why": []})
        if not c.shared_ok:
            entry["why"].append(f"{c.kernel}: {c.shared} B shared > {SMEM_LIMIT[report.arch]}")
        if c.spills:
            entry["why"].append(f"{c.kernel}: spills {c.spill_stores}/{c.spill_loads} B")
        entry["fits"] = not entry["why"]
    for e in report.errors:
        if e["case"].startswith("grid "):
            _, weights, config = e["case"].split(" ", 2)
            out.setdefault(weights, {})[config] = {"fits": False, "why": [e["error"]]}
    return {"arch": report.arch, "triton": report.triton, "formats": out}


def report_from_json(data: dict[str, Any]) -> Report:
    """A report written by ``--out``, read back (to record the grid's fit without compiling again)."""
    report = Report(arch=data["arch"], triton=data["triton"], errors=data["errors"], seconds=data["seconds"])
    report.compiled = [Compiled(**c) for c in data["compiled"]]
    return report


def load_grid_fit(path: Path = GRID_FIT_PATH, arch: int = 90) -> dict[str, dict[str, Any]] | None:
    """The recorded fit of the tune grid for ``arch`` (format -> config JSON -> {fits, why}); None if not recorded."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get(str(arch), {}).get("formats")


def write_fit(report: Report, path: Path = GRID_FIT_PATH) -> None:
    """Records the grid's fit for the report's architecture, keeping the other architectures' records."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[str(report.arch)] = grid_fit(report)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    fit = data[str(report.arch)]["formats"]
    dropped = sum(not e["fits"] for entries in fit.values() for e in entries.values())
    print(f"wrote {path}: sm_{report.arch}, {dropped} of {sum(map(len, fit.values()))} grid configs dropped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m small4.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90)
    p.add_argument("--subset", choices=["default", "ci", "smoke", "grid", "all"], default="default")
    p.add_argument("--weights", default=",".join(MOE_WEIGHTS), help="grid: expert formats (comma list)")
    p.add_argument("--out", help="write the report JSON here")
    p.add_argument("--write-fit", action="store_true", help="record the grid's fit in " + str(GRID_FIT_PATH))
    p.add_argument("--from-report", help="with --write-fit: take the results of an earlier --out, compile nothing")
    args = p.parse_args(argv)
    if args.from_report:
        report = report_from_json(json.loads(Path(args.from_report).read_text()))
        write_fit(report)
        return 0
    grid = grid_cases(tuple(args.weights.split(",")))
    cases = {
        "default": default_cases,
        "ci": ci_cases,
        "smoke": smoke_cases,
        "grid": lambda: grid,
        "all": lambda: default_cases() + grid,
    }
    report = check(cases[args.subset](), args.arch)
    bad = [c for c in report.compiled if not c.shared_ok]
    spills = [c for c in report.compiled if c.spills]
    print(f"{len(report.compiled)} kernels for sm_{args.arch} in {report.seconds:.0f} s: {len(report.errors)} errors, "
          f"{len(bad)} over shared memory, {len(spills)} spill")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    if args.write_fit:
        write_fit(report)
    return 1 if report.errors and args.subset != "grid" else 0


if __name__ == "__main__":
    sys.exit(main())
