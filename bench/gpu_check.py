"""small4's first check on a CUDA machine (run by bench/device_check.sh): every Triton kernel and the FP8 matmul
against its plain-PyTorch twin at the real Mistral Small 4 shapes, then decode CUDA graphs captured on two
real-shape layers and replayed against the eager forward.

    python bench/gpu_check.py OUT_JSON kernels|graphs [--small]

--small: tiny shapes and one or two cases per kernel (the CPU rehearsal, under TRITON_INTERPRET=1
SMALL4_KERNELS=triton). Every check is recorded (ok / FAIL / ERROR with the message) and the JSON is rewritten
after each one, so a timeout keeps what ran. References run in float32 on the same device. The exit code is 0 even
on failures: read the JSON (device_check.sh summarises it). Needs only torch and triton.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

OUT, WHAT = sys.argv[1], sys.argv[2]
SMALL = "--small" in sys.argv
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
RESULTS: dict = {"what": WHAT, "small": SMALL, "device": str(DEV), "checks": []}
if DEV.type == "cuda":
    import triton

    RESULTS["env"] = {
        "gpu": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
    }


def save() -> None:
    with open(OUT, "w") as f:
        json.dump(RESULTS, f, indent=1)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check(name: str, fn, **info) -> None:
    """fn() -> dict with at least 'err' and 'tol' (or 'ok'); timings of the first (compiling) call included."""
    t = time.perf_counter()
    entry = {"name": name, **info}
    try:
        res = fn()
        sync()
        entry.update(res)
        if "ok" not in entry:
            entry["ok"] = bool(entry["err"] <= entry["tol"])
        entry["status"] = "ok" if entry["ok"] else "FAIL"
    except Exception as e:  # noqa: BLE001 - every failure is a result
        entry["status"] = "ERROR"
        entry["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        entry["trace"] = traceback.format_exc()[-3000:]
    entry["seconds"] = round(time.perf_counter() - t, 3)
    RESULTS["checks"].append(entry)
    print(
        f"{entry['status']:5s} {name} {info} err={entry.get('err')} {entry.get('error', '')[:300]} "
        f"({entry['seconds']}s)",
        flush=True,
    )
    save()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def bench_ms(fn, reps: int = 10) -> float:
    """Median ms of fn() with CUDA events (host clock on CPU)."""
    times = []
    for _ in range(reps):
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------------ kernels
def moe_checks() -> None:
    from small4.kernels.fp8 import FP8_MAX
    from small4.kernels.fused_moe import choose_config, fused_moe
    from small4.kernels.moe_reference import fused_moe_reference

    E, H, I, K = (8, 64, 32, 2) if SMALL else (128, 4096, 2048, 4)
    g = torch.Generator(DEV).manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device=DEV, generator=g) * H**-0.5
    w2 = torch.randn(E, H, I, device=DEV, generator=g) * I**-0.5

    def quant(w, parts):
        blocks = w.view(E, parts, -1, w.shape[-1])
        s = blocks.abs().amax(dim=(2, 3)).clamp(min=1e-12) / FP8_MAX  # [E, parts]
        q = (blocks / s[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view_as(w)
        return q, s[:, :, None].contiguous()

    q13, s13 = quant(w13, 2)
    q2, s2 = quant(w2, 1)
    dq13 = (q13.float().view(E, 2, -1, H) * s13[:, :, :, None]).view(E, 2 * I, H)  # float32 twins
    dq2 = q2.float() * s2
    del w13, w2
    tokens = (5,) if SMALL else (1, 7, 64, 300, 4096)
    for T in tokens:
        for mode in ("random", "skewed"):
            if mode == "skewed" and T < 7:
                continue
            x = torch.randn(T, H, device=DEV, generator=g).to(BF16)
            if mode == "random":
                ids = torch.rand(T, E, device=DEV, generator=g).argsort(dim=-1)[:, :K]
            else:  # every token on the last K experts: many blocks per expert, the top expert's offsets
                ids = torch.arange(E - K, E, device=DEV).expand(T, K).contiguous()
            wts = torch.rand(T, K, device=DEV, generator=g).softmax(-1).to(BF16)
            for wd in ("fp8", "bf16"):
                cfg = choose_config(T, DEV)

                def run(x=x, ids=ids, wts=wts, wd=wd):
                    if wd == "fp8":
                        out = fused_moe(x, q13, q2, ids, wts, s13, s2)
                        ref = fused_moe_reference(x.float(), dq13, dq2, ids, wts.float())
                    else:
                        b13, b2 = dq13.to(BF16), dq2.to(BF16)
                        out = fused_moe(x, b13, b2, ids, wts)
                        ref = fused_moe_reference(x.float(), b13.float(), b2.float(), ids, wts.float())
                    res = {"err": rel_err(out, ref), "tol": 2e-2, "dtype": str(out.dtype)}
                    if DEV.type == "cuda":
                        res["kernel_ms"] = bench_ms(
                            (lambda: fused_moe(x, q13, q2, ids, wts, s13, s2))
                            if wd == "fp8"
                            else (lambda: fused_moe(x, b13, b2, ids, wts)),
                            reps=5,
                        )
                    return res

                check(
                    "fused_moe",
                    run,
                    T=T,
                    routing=mode,
                    weights=wd,
                    config={k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                )


def mla_checks() -> None:
    from small4.config import TextConfig
    from small4.kernels.mla_decode import mla_decode
    from small4.kernels.mla_reference import decode_attention_padded

    H, C, R, BS = (4, 32, 16, 4) if SMALL else (32, 256, 64, 16)
    scale = TextConfig().softmax_scale
    g = torch.Generator(DEV).manual_seed(1)
    cases = [(3, 40)] if SMALL else [(1, 1024), (8, 1024), (64, 1024), (1, 32768), (8, 32768), (64, 8192)]
    for B, ctx in cases:
        lens = torch.randint(1, ctx + 1, (B,), generator=torch.Generator().manual_seed(B + ctx)).tolist()
        lens[0] = ctx
        if B > 1:
            lens[1] = 1
        per = [-(-n // BS) for n in lens]
        nb = sum(per) + 1
        perm = torch.randperm(nb - 1, generator=torch.Generator().manual_seed(7)).tolist()
        width = max(per)
        tables, k = [], 0
        for p in per:
            tables.append(perm[k : k + p] + [nb - 1] * (width - p))
            k += p
        bt = torch.tensor(tables, dtype=torch.int32, device=DEV)
        base = torch.randn(nb, BS, C + R, device=DEV, generator=g)
        q_lat = (torch.randn(B, H, C, device=DEV, generator=g) * 0.3).to(BF16)
        q_rope = (torch.randn(B, H, R, device=DEV, generator=g) * 0.3).to(BF16)
        for cache_dtype in (BF16, FP8):
            cache = (base * 4).clamp(-448, 448).to(FP8) if cache_dtype == FP8 else base.to(BF16)
            lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
            for static in (False, True):

                def run(cache=cache, static=static, lens_t=lens_t, q_lat=q_lat, q_rope=q_rope, bt=bt, lens=lens):
                    out = mla_decode(q_lat, q_rope, cache, bt, lens_t, scale, max_seq_len=None if static else max(lens))
                    ref = decode_attention_padded(q_lat.float(), q_rope.float(), cache, bt, lens, scale)
                    res = {"err": rel_err(out, ref), "tol": 2e-2}
                    if DEV.type == "cuda":
                        res["kernel_ms"] = bench_ms(
                            lambda: mla_decode(q_lat, q_rope, cache, bt, lens_t, scale, max_seq_len=max(lens)), reps=5
                        )
                    return res

                check("mla_decode", run, B=B, ctx=ctx, cache=str(cache_dtype), static_shapes=static)


def latent_checks() -> None:
    from small4.config import TextConfig
    from small4.kernels.latent_reference import latent_write_reference
    from small4.kernels.latent_write import latent_write
    from small4.model.layers import RotaryEmbedding

    C, R, BS = (32, 16, 4) if SMALL else (256, 64, 16)
    cfg = TextConfig()
    rot = RotaryEmbedding(cfg.rope, R)
    g = torch.Generator(DEV).manual_seed(2)
    for T in (5,) if SMALL else (1, 33, 8192):
        ckv = torch.randn(T, C + R, device=DEV, generator=g).to(BF16) * 3
        w = (1 + 0.1 * torch.randn(C, device=DEV, generator=g)).to(BF16)
        pos = torch.randint(0, 200000, (T,), device=DEV, generator=g)
        cos, sin = rot(pos, BF16)
        nb = T // BS + 4
        slots = torch.randperm(nb * BS, device=DEV, generator=g)[:T]
        if T > 1:
            slots[0] = -1  # padding: must write nothing
        for cache_dtype in (BF16, FP8):

            def run(cache_dtype=cache_dtype, ckv=ckv, w=w, cos=cos, sin=sin, slots=slots, nb=nb):
                c1 = torch.zeros(nb, BS, C + R, device=DEV, dtype=cache_dtype)
                c2 = torch.zeros_like(c1)
                out = latent_write(ckv, w, 1e-6, cos, sin, cfg.rope.interleave, slots, c1)
                ref = latent_write_reference(ckv, w, 1e-6, cos, sin, cfg.rope.interleave, slots, c2)
                lat_diff = (out.float() - ref.float()).abs()
                cache_mismatch = (c1.view(torch.uint8) != c2.view(torch.uint8)).sum().item()
                return {
                    "err": rel_err(out, ref),
                    "tol": 1e-2,
                    "latent_mismatches": int((lat_diff > 0).sum().item()),
                    "cache_byte_mismatches": int(cache_mismatch),
                    "ok": bool(rel_err(out, ref) <= 1e-2 and rel_err(c1, c2) <= 7e-2),
                    "cache_err": rel_err(c1, c2),
                }

            check("latent_write", run, T=T, cache=str(cache_dtype))


def fp8_linear_checks() -> None:
    from small4.kernels.fp8 import FP8_MAX
    from small4.kernels.fp8_linear import fp8_linear, fp8_linear_reference, row_scale, supports

    g = torch.Generator(DEV).manual_seed(3)
    shapes = [(48, 32)] if SMALL else [(1024, 4096), (4096, 1024), (320, 4096), (6144, 256), (4096, 4096), (4096, 2048)]
    for N, K in shapes:
        w32 = torch.randn(N, K, device=DEV, generator=g) * K**-0.5
        s = (w32.abs().max() / FP8_MAX).reshape(())
        wq = (w32 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        for M in (5,) if SMALL else (1, 64, 8192):
            x = torch.randn(M, K, device=DEV, generator=g).to(BF16)
            for mode in ("dynamic", "static", "rowblock"):
                in_scale = (x.float().abs().max() / FP8_MAX).reshape(()) if mode == "static" else None
                ws = torch.stack([s, s * 1.5]).reshape(2, 1) if mode == "rowblock" else s

                def run(x=x, in_scale=in_scale, ws=ws, wq=wq):
                    assert supports(wq, ws, in_scale), "supports() refused a real shape"
                    rs = row_scale(ws, wq.shape[0])
                    out = fp8_linear(x, wq, rs, in_scale, BF16)
                    ref = fp8_linear_reference(x, wq, ws, in_scale, torch.float32)
                    return {"err": rel_err(out, ref), "tol": 2e-2}

                check("fp8_linear", run, N=N, K=K, M=M, act_scale=mode)


# ------------------------------------------------------------------------------------------------ graphs
def graph_checks() -> None:
    from small4.bench.synthetic import FULL_SPEC, TINY_BENCH_SPEC, build_random_model, model_config
    from small4.config import EngineConfig
    from small4.engine.cuda_graphs import DecodeGraphs
    from small4.engine.model_runner import ModelRunner
    from small4.model.context import AttentionMetadata

    spec = TINY_BENCH_SPEC if SMALL else FULL_SPEC
    layers = 2
    act = BF16 if DEV.type == "cuda" else torch.float32
    t = time.perf_counter()
    model = build_random_model(model_config(spec, layers, "fp8"), DEV, act, "fp8", seed=0)
    sync()
    RESULTS["build_seconds_2_layers"] = time.perf_counter() - t
    BS, per_seq, max_batch = (4, 4, 4) if SMALL else (16, 64, 8)  # contexts up to 16 / 1024 tokens
    runner = ModelRunner(model, EngineConfig(device=str(DEV), block_size=BS), num_blocks=max_batch * per_seq)
    g = torch.Generator(DEV).manual_seed(4)
    for cache in runner.kv_caches:  # every row a finite value: contexts below are read without being prefilled
        cache.copy_((torch.randn(cache.shape, device=DEV, generator=g) * 0.5).to(cache.dtype))
    state: dict = {}

    def capture():
        t0 = time.perf_counter()
        with torch.inference_mode():
            state["graphs"] = DecodeGraphs(runner.model, runner.kv_caches, runner.pad_block, per_seq, max_batch)
        sync()
        gr = state["graphs"]
        return {
            "ok": DEV.type != "cuda" or sorted(gr.graphs) == gr.ladder,
            "ladder": gr.ladder,
            "captured": sorted(gr.graphs),
            "capture_seconds": time.perf_counter() - t0,
        }

    check("decode_graphs_capture", capture, layers=layers, max_batch=max_batch)
    if "graphs" not in state:
        return
    graphs = state["graphs"]
    vocab = runner.config.text.vocab_size
    for B in (1, 3) if SMALL else (1, 3, 8):

        def replay(B=B):
            rng = torch.Generator().manual_seed(B)
            lens = torch.randint(2, per_seq * BS, (B,), generator=rng).tolist()
            tables = [list(range(i * per_seq, i * per_seq + -(-n // BS))) for i, n in enumerate(lens)]
            positions = [n - 1 for n in lens]
            slots = [tb[p // BS] * BS + p % BS for tb, p in zip(tables, positions, strict=True)]
            tokens = torch.randint(1000, vocab, (B,), generator=rng).tolist()
            with torch.inference_mode():
                out_graph = graphs.run(tokens, positions, slots, tables, lens).clone()
                width = max(len(x) for x in tables)
                bt = torch.tensor([x + [0] * (width - len(x)) for x in tables], dtype=torch.int32, device=DEV)
                meta = AttentionMetadata(list(range(B + 1)), lens, torch.tensor(slots, device=DEV), bt, BS)
                ids = torch.tensor(tokens, device=DEV)
                pos = torch.tensor(positions, device=DEV)
                out_eager = runner.model(ids, pos, meta, runner.kv_caches)
                res = {
                    "err": rel_err(out_graph, out_eager),
                    "tol": 2e-2,
                    "bucket": graphs.bucket(B),
                    "replayed": graphs.bucket(B) in graphs.graphs,
                }
                if DEV.type == "cuda":
                    res["replay_ms"] = bench_ms(lambda: graphs.graphs[graphs.bucket(B)].replay(), reps=10)
                    res["eager_ms"] = bench_ms(lambda: runner.model(ids, pos, meta, runner.kv_caches), reps=10)
            return res

        check("decode_graph_replay_vs_eager", replay, B=B, layers=layers)


if __name__ == "__main__":
    save()
    if WHAT == "kernels":
        for fn in (latent_checks, mla_checks, fp8_linear_checks, moe_checks):
            check(fn.__name__, lambda fn=fn: (fn(), {"ok": True})[1])
    elif WHAT == "graphs":
        graph_checks()
    RESULTS["summary"] = {s: sum(1 for c in RESULTS["checks"] if c["status"] == s) for s in ("ok", "FAIL", "ERROR")}
    save()
    print("summary", RESULTS["summary"])
