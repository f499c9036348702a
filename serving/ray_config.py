"""What `streamsink serve --ray` deploys: one LLMConfig (ray.serve.llm), checked in the launching
process before Ray or any replica starts.

The user's pass-through arguments are vLLM engine arguments, parsed by vLLM's own parser; we keep
only those given explicitly and fill in what a streaming replica needs (the streamsink entry,
fp32, a KV budget). The check builds the same VllmConfig each replica will build (vLLM's
AsyncEngineArgs.create_engine_config, where the plugin's config patch refuses bad streamsink
settings), so a bad configuration costs one line and exit 2, not N failing replicas.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from streamsink.config import CONFIG_KEY, StreamsinkConfigError, parse_config
from streamsink.model_store import DEFAULT_MODEL_NAME, resolve_model
from streamsink.serving.engine import DEFAULT_KV_CACHE_BYTES

# Serve restarts a replica whose health check fails; vLLM's check fails as soon as the engine
# process is gone, so a short period means a killed engine is replaced within seconds.
HEALTH_CHECK_PERIOD_S = 2.0
# Replicas > 1: a conversation's next turn goes to the replica whose prefix cache holds its
# history (Ray Serve LLM's prefix-aware router matches a request's text against what each
# replica served). A new conversation matches nothing and goes to the least loaded one; a replica
# with 4 more requests queued than another falls back to load balancing.
PREFIX_ROUTER = {
    "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
    "request_router_kwargs": {"imbalanced_threshold": 4, "match_rate_threshold": 0.1,
                              "do_eviction": True},
}
# Arguments Ray Serve LLM sets itself (model_loading_config, the executor) or that belong to
# vLLM's own HTTP server, which Ray Serve replaces.
_NOT_ENGINE_ARGS = {"model", "served_model_name", "distributed_executor_backend"}


class EngineArgsError(ValueError):
    """Bad vLLM engine arguments; the message is one line, meant for the user."""


@dataclass
class RaySpec:
    model_id: str                 # the name clients put in "model"
    model_path: str               # local checkpoint directory
    engine_kwargs: dict           # vLLM engine arguments of every replica
    replicas: int
    env_vars: dict = field(default_factory=dict)  # environment every replica needs

    def llm_config(self):
        from ray.serve.llm import LLMConfig

        deployment = {"num_replicas": self.replicas,
                      "health_check_period_s": HEALTH_CHECK_PERIOD_S}
        if self.replicas > 1:
            deployment["request_router_config"] = PREFIX_ROUTER
        return LLMConfig(
            model_loading_config={"model_id": self.model_id, "model_source": self.model_path},
            # A frontend argument (Ray splits those out): usage.prompt_tokens_details.cached_tokens.
            engine_kwargs={"enable_prompt_tokens_details": True, **self.engine_kwargs},
            accelerator_config={"kind": "cpu"},
            # One logical CPU per replica: the engine's threads share the node's cores anyway.
            placement_group_config={"bundles": [{"CPU": 1}]},
            deployment_config=deployment,
            runtime_env={"env_vars": dict(self.env_vars)} if self.env_vars else None,
            # vLLM's engine metrics (and, through the plugin, streamsink's) go to Ray's export.
            log_engine_metrics=True,
        )


class _RaisingParser:
    """vLLM's engine-argument parser, with argparse's usage-and-exit turned into one line."""

    def __init__(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        class Parser(FlexibleArgumentParser):
            def error(self, message):  # noqa: D401 - argparse hook
                raise EngineArgsError(message)

        self.parser = AsyncEngineArgs.add_cli_args(Parser(prog="streamsink serve --ray"))

    def explicit(self, argv: list[str]) -> dict:
        """{dest: value} of the arguments argv gives (defaults left to vLLM)."""
        args, unknown = self.parser.parse_known_args(argv)
        if unknown:
            raise EngineArgsError(f"unrecognized engine arguments: {' '.join(unknown)}")
        defaults = vars(self.parser.parse_args([]))
        return {k: v for k, v in vars(args).items() if v != defaults.get(k)}


def build_spec(model: str | None, sink: int, window: int, replicas: int,
               vllm_args: list[str]) -> RaySpec:
    """The deployment, validated; raises StreamsinkConfigError / EngineArgsError /
    ModelNotFoundError with a one-line message."""
    if replicas < 1:
        raise EngineArgsError(f"--replicas must be >= 1, got {replicas}")
    cfg = parse_config({"sink_tokens": sink, "window_tokens": window})
    model_path = resolve_model(model)
    kwargs = _RaisingParser().explicit(vllm_args)
    served = kwargs.pop("served_model_name", None)
    model_id = (served[0] if served else None) or model or DEFAULT_MODEL_NAME
    for name in _NOT_ENGINE_ARGS & set(kwargs):
        raise EngineArgsError(f"--{name.replace('_', '-')} is set by streamsink serve --ray "
                              f"(use --model / --served-model-name)")
    kwargs.setdefault("dtype", "float32")
    additional = dict(kwargs.get("additional_config") or {})
    additional.setdefault(CONFIG_KEY, vars(cfg))
    kwargs["additional_config"] = additional
    if "kv_cache_memory_bytes" not in kwargs and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # Without a budget vLLM's CPU worker wants 92% of the node's memory free (DESIGN §4).
        kwargs["kv_cache_memory_bytes"] = DEFAULT_KV_CACHE_BYTES
    env_vars = {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL",
                                           "VLLM_ALLOW_LONG_MAX_MODEL_LEN") if k in os.environ}
    spec = RaySpec(model_id, model_path, kwargs, replicas, env_vars)
    check_engine_config(spec)
    return spec


def check_engine_config(spec: RaySpec) -> None:
    """Build the VllmConfig a replica will build, here, so that vLLM's and the plugin's refusals
    happen before any replica starts. The environment is restored afterwards: vLLM's CPU
    platform sets process-wide variables (LD_PRELOAD, thread counts) meant for engine processes,
    and Ray's processes started after this would inherit them."""
    saved = dict(os.environ)
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs

        try:
            engine_args = AsyncEngineArgs(model=spec.model_path,
                                          served_model_name=[spec.model_id],
                                          **spec.engine_kwargs)
            engine_args.create_engine_config()
        except StreamsinkConfigError:
            raise
        except Exception as exc:  # vLLM's own refusals: ValueError, pydantic ValidationError
            ours = _streamsink_error(exc)
            if ours is not None:
                raise ours from None
            raise EngineArgsError(_one_line(exc)) from None
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _streamsink_error(exc: Exception) -> StreamsinkConfigError | None:
    """The plugin's refusal inside vLLM's config validation (pydantic wraps it), if it is one."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            for item in errors():
                inner = (item.get("ctx") or {}).get("error")
                if isinstance(inner, StreamsinkConfigError):
                    return inner
        except Exception:
            pass
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, StreamsinkConfigError) else None


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The --ray options of `streamsink serve` (the subparser block in cli.py calls this)."""
    parser.add_argument("--ray", action="store_true",
                        help="serve through Ray Serve LLM: N streaming replicas behind one "
                             "OpenAI endpoint, metrics via Ray's Prometheus export "
                             "(joins $RAY_ADDRESS when set)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="with --ray: number of replicas, one engine each (default 1)")
    parser.add_argument("--host", default=None,
                        help="HTTP host (--ray: default 127.0.0.1; without --ray vLLM's default)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="clients must send 'Authorization: Bearer KEY' on /v1 (--ray: "
                             "required with a --host beyond loopback; default "
                             "$STREAMSINK_API_KEY)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="with --ray: port of Ray's Prometheus metrics export (default: a "
                             "free port)")
