"""small4 command line: make-tiny | make-tiny-draft | generate | serve | plan | bench | demo | train-demo |
eval-demo | train-draft.

Each command imports what it needs when it is registered, and ``main`` registers in full only the command it runs
(the others by name): ``small4 bench ...`` then needs only torch and triton, never the server and chat libraries
(fastapi, uvicorn, pydantic, mistral-common, llguidance), which a bare CUDA image lacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _make_tiny(args: argparse.Namespace) -> int:
    from small4.weights.tiny import make_tiny

    quant = args.quant or ("fp8" if args.fp8 else "none")
    out = make_tiny(args.out, layout=args.layout, quant=quant, seed=args.seed)
    print(f"wrote a tiny {args.layout} checkpoint{f' ({quant})' if quant != 'none' else ''} to {out}")
    return 0


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the exact real layout")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--layout",
        choices=["hf", "mistral", "release"],
        default="hf",
        help="release: the public release's exact spellings, config.json and params.json file sets side by side",
    )
    p.add_argument("--fp8", action="store_true", help="store attention and expert weights as FP8 e4m3")
    p.add_argument(
        "--quant",
        choices=["none", "fp8", "fp8-block", "nvfp4"],
        default=None,
        help="fp8-block: DeepSeek-style weight_block_size (hf layout); nvfp4: compressed-tensors NVFP4 routed "
        "experts (mistral or release layout)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)


def _make_tiny_draft(args: argparse.Namespace) -> int:
    from small4.weights.tiny_draft import DraftSpec, make_tiny_draft

    draft = DraftSpec(num_layers=args.layers, intermediate_size=args.intermediate_size)
    out = make_tiny_draft(args.out, layout=args.layout, quant=args.quant, seed=args.seed, draft=draft)
    print(f"wrote a tiny EAGLE draft ({args.layout} layout, {args.quant}) for `small4 make-tiny` targets to {out}")
    return 0


def _add_make_tiny_draft(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-draft", help="write a tiny random EAGLE draft for a make-tiny target")
    p.add_argument("out", help="output directory")
    p.add_argument(
        "--layout",
        choices=["release", "hf"],
        default="release",
        help="release: params.json + consolidated.safetensors (native names); hf: config.json + model.safetensors",
    )
    p.add_argument("--quant", choices=["none", "fp8"], default="none", help="fp8: per-tensor e4m3 matrices")
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers")
    p.add_argument("--intermediate-size", type=int, default=96, help="width of the draft's dense MLP")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_draft)


def _generate(args: argparse.Namespace) -> int:
    from small4.config import EngineConfig
    from small4.engine.engine import LLM
    from small4.engine.sampling_params import SamplingParams
    from small4.weights.embedded import embedded_model_dir

    model_dir = args.model or embedded_model_dir()
    llm = LLM(model_dir, EngineConfig(profile=args.profile))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    for prompt, result in zip(args.prompts, llm.generate(args.prompts, params), strict=True):
        out = result.outputs[0]
        print(f"prompt: {prompt!r} ({len(result.prompt_token_ids)} tokens)")
        print(f"output: {out.text!r} ({len(out.token_ids)} tokens, finish_reason={out.finish_reason})")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="offline generation through the engine")
    p.add_argument("prompts", nargs="+", help="text prompts (encoded with BOS, no chat template)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--profile", choices=["latency", "throughput"], default="throughput")
    p.set_defaults(func=_generate)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from small4.bench import fullscale, host_overhead, load, offline, serving, tune_moe

    p = sub.add_parser("bench", help="benchmarks that write JSON results")
    bench = p.add_subparsers(dest="bench_command", required=True)
    offline.add_parser(bench)
    fullscale.add_parser(bench)
    tune_moe.add_parser(bench)
    load.add_parser(bench)
    host_overhead.add_parser(bench)
    serving.add_parser(bench)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from small4.server.serve import add_serve_arguments, serve

    p = sub.add_parser("serve", help="OpenAI-compatible server")
    add_serve_arguments(p)
    p.set_defaults(func=serve)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from small4.parallel.memory import add_parser

    add_parser(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="serve the embedded tiny model and talk to it with the openai client")
    p.set_defaults(func=lambda _: __import__("small4.demo", fromlist=["main"]).main())


def _add_train_demo(sub: argparse._SubParsersAction) -> None:
    from small4.demo_model.train import add_parser

    add_parser(sub)


def _add_eval_demo(sub: argparse._SubParsersAction) -> None:
    from small4.demo_model.heldout import add_parser

    add_parser(sub)


def _add_train_draft(sub: argparse._SubParsersAction) -> None:
    from small4.demo_model.train_draft import add_parser

    add_parser(sub)


COMMANDS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], None]]] = {
    "make-tiny": ("write a tiny random checkpoint in the exact real layout", _add_make_tiny),
    "make-tiny-draft": ("write a tiny random EAGLE draft for a make-tiny target", _add_make_tiny_draft),
    "generate": ("offline generation through the engine", _add_generate),
    "serve": ("OpenAI-compatible server", _add_serve),
    "plan": ("per-rank weight bytes, latent-cache tokens and the largest context that fit", _add_plan),
    "bench": ("benchmarks that write JSON results", _add_bench),
    "demo": ("serve the embedded tiny model and talk to it with the openai client", _add_demo),
    "train-demo": ("train the tiny demo model on the chat curriculum", _add_train_demo),
    "eval-demo": ("held-out evaluation of a demo checkpoint through the real server", _add_eval_demo),
    "train-draft": ("train the demo model's EAGLE draft on its own hidden states", _add_train_draft),
}


def _missing(name: str, error: ImportError) -> Callable[[argparse.Namespace], int]:
    def fail(_: argparse.Namespace) -> int:
        print(f"small4 {name} needs {error.name or error}: install the full package (see README)", file=sys.stderr)
        return 1

    return fail


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command in full, or with ``command`` only that one (the others by name and help only). A command
    whose libraries are not installed stays listed and says what it lacks when run."""
    parser = argparse.ArgumentParser(prog="small4", description="Mistral Small 4 inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        try:
            add(sub)
        except ImportError as e:
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {e.name} is not installed)", add_help=False)
            p.set_defaults(func=_missing(name, e), any_arguments=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = list(argv)  # for commands that start copies of themselves (bench full on other ranks)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"small4: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
