"""The `streamsink` command line: model-path, demo (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import sys

from streamsink.model_store import ModelNotFoundError, resolve_model


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamsink.serving.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsink",
        description="StreamingLLM (attention sinks) inside vLLM's paged KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-path", help="print the local checkpoint directory of a model")
    p.add_argument("--model", help="local checkpoint directory or hub id (default: embedded "
                                   "SmolLM2-135M-Instruct, prepared on first use)")
    p.set_defaults(func=_cmd_model_path)

    p = sub.add_parser("demo", help="one long generated stream with live stats")
    p.add_argument("--model", help="local checkpoint directory or hub id")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--prompt", default="Tell me a long story about a lighthouse keeper.")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelNotFoundError as exc:
        print(f"streamsink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamsink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
