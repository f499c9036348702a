"""The `streamsink` command line: model-path, demo, ppl, serve, batch, loadtest.

The arguments of every command are defined here; a command's work is the run(args) of its
module, imported only when that command runs (importlib), so `streamsink --help` and argument
errors answer without loading vLLM or Ray.

Every refusal — a bad option, a model streamsink does not support, a configuration vLLM rejects,
a bind beyond loopback without a key — is one line, `streamsink: error: <reason>`, and exit 2;
SIGINT/SIGTERM stop a command and everything it started, and exit 0.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from streamsink.config import DEFAULT_SINK_TOKENS, DEFAULT_WINDOW_TOKENS
from streamsink.errors import StreamsinkConfigError, UsageError, find_config_error, one_line
from streamsink.weights import AUTO, WEIGHT_CHOICES

# Set to show the traceback of an unexpected failure instead of its one-line summary.
DEBUG_ENV = "STREAMSINK_DEBUG"
# Tokens `streamsink batch` generates per record unless the record or --max-tokens says.
BATCH_MAX_TOKENS = 256
# The load test's default window: its default 512-token streams outgrow a 128-token cache and
# free blocks as they go.
LOADTEST_WINDOW = 124


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local checkpoint directory or hub id (default: the "
                                   "embedded SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default=AUTO,
                   help="the default model's weight format: fp32, bf16, q8 (int8 weights and "
                        "activations), q4 (4-bit weights, bf16 activations); auto (default): "
                        "the fastest within 1%% of fp32's perplexity on this CPU "
                        "(docs/weights.md). Quantized formats are prepared once on first use")


def _stream(p: argparse.ArgumentParser, window: int = DEFAULT_WINDOW_TOKENS,
            window_help: str = "") -> None:
    """--model, --sink and --window, the same for every command that builds an engine."""
    _model(p)
    p.add_argument("--sink", type=int, default=DEFAULT_SINK_TOKENS,
                   help=f"attention sink tokens S (default {DEFAULT_SINK_TOKENS})")
    p.add_argument("--window", type=int, default=window,
                   help=f"window tokens W (default {window}){window_help}")


def _demo(p) -> None:
    _stream(p)
    p.add_argument("--tokens", type=int, default=3000, help="tokens to generate (default 3000)")
    p.add_argument("--prompt", default="Tell me a long story about a lighthouse keeper.")


def _ppl(p) -> None:
    p.add_argument("--text", required=True, help="plain-text file")
    _stream(p, window_help="; larger than the text means dense")
    p.add_argument("--offset", type=int, default=0, help="skip the first K tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens")
    p.add_argument("--out", help="write the per-token NLLs (natural log), one per line")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk size (default 2048)")


def _serve(p) -> None:
    _stream(p)
    p.add_argument("--max-pinned-tokens", type=int, default=0,
                   help="the most prompt tokens one request may pin in place of the sinks "
                        "(\"streamsink\": {\"pin\": \"system\"} in a request; default 0: "
                        "none); the KV pool is sized for streams that pin this many")
    p.add_argument("--host", default=None,
                   help="HTTP host (default 127.0.0.1; beyond loopback needs an API key)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' on /v1 (default "
                        "$STREAMSINK_API_KEY)")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve LLM: N streaming replicas behind one OpenAI "
                        "endpoint, metrics via Ray's Prometheus export (joins $RAY_ADDRESS "
                        "when set)")
    p.add_argument("--replicas", type=int, default=None,
                   help="with --ray: number of replicas, one engine each (default 1)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="with --ray: port of Ray's Prometheus metrics export (default: a free "
                        "port)")
    _address(p, "with --ray: ")
    p.add_argument("--spread", action="store_true",
                   help="with --ray on a cluster: each replica on a node of its own (nodes "
                        "advertise the resource streamsink_replica; docs/cluster.md); refused "
                        "when fewer nodes offer it than there are replicas")


def _address(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help=f"{prefix}join the Ray cluster whose head is at HOST:PORT (default "
                        f"$RAY_ADDRESS; neither: a private local Ray)")


def _batch(p) -> None:
    p.add_argument("--input", required=True, help="JSONL of {\"id\", \"prompt\"} or "
                   "{\"id\", \"messages\"} (+ optional max_tokens, temperature, top_p, seed, "
                   "ignore_eos)")
    p.add_argument("--output", required=True, help="JSONL of results, appended to; a rerun "
                   "skips every id already there")
    p.add_argument("--replicas", type=int, default=1,
                   help="engine replicas (Ray Data actors), default 1")
    _address(p)
    _stream(p)
    p.add_argument("--stock", action="store_true",
                   help="stock vLLM engines (no streaming), for comparisons")
    p.add_argument("--max-tokens", type=int, default=BATCH_MAX_TOKENS,
                   help=f"tokens to generate per record unless it says (default "
                        f"{BATCH_MAX_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature unless a record says (default 0: greedy)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and vLLM's logs from the engine processes")


def _loadtest(p) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/report.json, DIR/dashboard.png and DIR/logs/")
    p.add_argument("--target", metavar="URL",
                   help="load an already running OpenAI server (http://host:port[/v1]) instead "
                        "of starting one")
    p.add_argument("--metrics-url", metavar="URL",
                   help="with --target: its Prometheus endpoint (default: <target>/metrics)")
    p.add_argument("--ray", action="store_true",
                   help="start `streamsink serve --ray` (Ray Serve LLM) instead of one server")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (default 1)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, default=None,
                      help="closed loop: this many clients, one request each at a time "
                           "(default 8)")
    loop.add_argument("--rate", type=float, default=None,
                      help="open loop: Poisson arrivals, requests per second")
    p.add_argument("--requests", type=int, default=1000,
                   help="start at most N requests (default 1000)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="start no request after S seconds (default 60)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="after --duration, requests still streaming get S more seconds, then "
                        "the client hangs up (counted as aborted; default 300)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length (default 256)")
    p.add_argument("--output-tokens", type=int, default=256,
                   help="tokens generated per request (ignore_eos; default 256)")
    p.add_argument("--abort-fraction", type=float, default=0.0,
                   help="share of requests whose client disconnects mid-stream (default 0)")
    p.add_argument("--compare-stock", action="store_true",
                   help="then run a stock vLLM server (no streamsink) on the same KV budget "
                        "under the same load, and overlay both")
    p.add_argument("--slo-ttft-ms", type=float, help="goodput SLO: time to first token")
    p.add_argument("--slo-tpot-ms", type=float, help="goodput SLO: time per output token")
    p.add_argument("--slo-e2el-ms", type=float, help="goodput SLO: end-to-end latency")
    g = p.add_argument_group("servers started by the load test")
    _stream(g, window=LOADTEST_WINDOW,
            window_help=f": the default load's 512-token streams outgrow the "
                        f"{DEFAULT_SINK_TOKENS + LOADTEST_WINDOW}-token cache and free blocks "
                        f"as they go; the paper's is {DEFAULT_WINDOW_TOKENS}")
    g.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="KV budget of every server (default: what the streaming server sizes "
                        "for itself, given to the stock one too)")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="tokens per engine step, every server (default 1024)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="every server (default: the model's context length)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="every server (default: streamsink's, 64)")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more vLLM server argument for every server, e.g. "
                        "--server-arg=--enforce-eager (repeatable)")
    g.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds a server may take to start (default 900)")
    p.add_argument("--seed", type=int, default=0, help="prompts and abort plan (default 0)")
    p.add_argument("--scrape-interval", type=float, default=1.0,
                   help="Prometheus scrape interval in seconds (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# name -> (module of streamsink.serving whose run(args) does the work, its arguments, help,
# whether unknown arguments pass through to vLLM)
COMMANDS = {
    "model-path": ("model_path", _model, "print the local checkpoint directory of a model",
                   False),
    "demo": ("demo", _demo, "one long generated stream with live stats", False),
    "ppl": ("ppl", _ppl, "streaming perplexity of a text (the paper's evaluation)", False),
    "serve": ("serve", _serve, "vLLM's OpenAI-compatible server with streaming on "
              "(/v1/completions, /v1/chat/completions, /metrics); --ray: N replicas on Ray "
              "Serve; other arguments are vLLM's", True),
    "batch": ("batch", _batch, "offline generation over a JSONL file of prompts on Ray Data "
              "(resumable); other arguments are vLLM engine arguments", True),
    "loadtest": ("loadtest", _loadtest, "load-test a streaming server with a real Prometheus "
                 "watching", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsink",
        description="StreamingLLM (attention sinks) inside vLLM's paged KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, arguments, help_text, passes_through) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        arguments(p)
        p.set_defaults(module=module, passes_through=passes_through)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.passes_through:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra
    # Until a command installs its own stop handling (once it has started something), SIGTERM
    # stops it like Ctrl-C: nothing of ours is running yet.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return importlib.import_module(f"streamsink.serving.{args.module}").run(args)
    except (UsageError, StreamsinkConfigError) as exc:
        return _refuse(str(exc))
    except KeyboardInterrupt:
        print("streamsink: stopped", file=sys.stderr)
        return 0
    except Exception as exc:
        ours = find_config_error(exc)  # our refusal, wrapped by vLLM's config validation
        if ours is not None:
            return _refuse(one_line(ours))
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"streamsink: error: {one_line(exc)} (set {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 1


def _refuse(message: str) -> int:
    print(f"streamsink: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
