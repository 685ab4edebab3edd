"""small4 command line: make-tiny | generate | bench (serve comes with the server)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _make_tiny(args: argparse.Namespace) -> int:
    from small4.weights.tiny import make_tiny

    out = make_tiny(args.out, layout=args.layout, fp8=args.fp8, seed=args.seed)
    print(f"wrote a tiny {args.layout} checkpoint{' (fp8)' if args.fp8 else ''} to {out}")
    return 0


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the exact real layout")
    p.add_argument("out", help="output directory")
    p.add_argument("--layout", choices=["hf", "mistral"], default="hf")
    p.add_argument("--fp8", action="store_true", help="store attention and expert weights as FP8 e4m3")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_make_tiny]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="small4", description="Mistral Small 4 inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"small4: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
