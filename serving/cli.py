"""The `streamsink` command line: model-path, demo, ppl, serve, batch, loadtest."""
from __future__ import annotations

import argparse
import sys

from streamsink.config import StreamsinkConfigError
from streamsink.model_store import ModelNotFoundError, resolve_model


def _cmd_model_path(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamsink.serving.demo import run_demo

    return run_demo(args)


def _cmd_ppl(args: argparse.Namespace) -> int:
    from streamsink.serving.ppl import run_ppl

    return run_ppl(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from streamsink.serving.serve import run_serve

    return run_serve(args)


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
    p.add_argument("--tokens", type=int, default=3000, help="tokens to generate (default 3000)")
    p.add_argument("--sink", type=int, default=4, help="attention sink tokens S (default 4)")
    p.add_argument("--window", type=int, default=1020, help="window tokens W (default 1020)")
    p.add_argument("--prompt", default="Tell me a long story about a lighthouse keeper.")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("ppl", help="streaming perplexity of a text (the paper's evaluation)")
    p.add_argument("--text", required=True, help="plain-text file")
    p.add_argument("--model", help="local checkpoint directory or hub id")
    p.add_argument("--sink", type=int, default=4, help="attention sink tokens S (default 4)")
    p.add_argument("--window", type=int, default=1020,
                   help="window tokens W (default 1020); larger than the text means dense")
    p.add_argument("--offset", type=int, default=0, help="skip the first K tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens")
    p.add_argument("--out", help="write the per-token NLLs (natural log), one per line")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk size (default 2048)")
    p.set_defaults(func=_cmd_ppl)

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with streaming on "
                                     "(/v1/completions, /v1/chat/completions, /metrics); "
                                     "--ray: N replicas on Ray Serve; other arguments are vLLM's")
    p.add_argument("--model", help="local checkpoint directory or hub id")
    p.add_argument("--sink", type=int, default=4, help="attention sink tokens S (default 4)")
    p.add_argument("--window", type=int, default=1020, help="window tokens W (default 1020)")
    from streamsink.serving.ray_config import add_ray_arguments

    add_ray_arguments(p)  # --ray, --replicas, --host, --port, --api-key, --metrics-port
    p.set_defaults(func=_cmd_serve, passes_through=True)  # other arguments go to vLLM

    _add_module_command(sub, "batch", "batch",
                        "offline generation over a JSONL file of prompts on Ray Data "
                        "(resumable); other arguments are vLLM engine arguments")
    _add_module_command(sub, "loadtest", "loadtest",
                        "load-test a streaming server with a real Prometheus watching")
    return parser


def _add_module_command(sub, name: str, module: str, help_text: str) -> None:
    """A subcommand whose arguments and body live in streamsink.serving.<module>
    (add_arguments(parser), run(args) -> exit code; the module imports nothing heavy at top)."""
    import importlib

    mod = importlib.import_module(f"streamsink.serving.{module}")
    p = sub.add_parser(name, help=help_text)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run, passes_through=getattr(mod, "PASSES_THROUGH", False))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    try:
        return args.func(args)
    except (ModelNotFoundError, StreamsinkConfigError) as exc:
        print(f"streamsink: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamsink: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
