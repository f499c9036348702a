"""What `streamsink serve --ray` deploys: one LLMConfig (ray.serve.llm), checked in the launching
process before Ray or any replica starts.

The user's pass-through arguments are vLLM engine arguments, parsed by vLLM's own parser
(engine_args.py); we keep only those given explicitly and fill in what a streaming replica needs
(the streamsink entry, streamsink's defaults). The check builds the same VllmConfig each replica
will build, so a bad configuration costs one line and exit 2, not N failing replicas. Each
replica sizes its own KV pool when none is given (plugin/kv_budget.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from streamsink.config import CONFIG_KEY
from streamsink.model_store import served_name
from streamsink.serving.engine_args import (
    DEFAULT_MAX_NUM_SEQS,
    EngineArgsError,
    VllmArgParser,
    check_engine_config,
    choose_model,
    engine_environment,
    streamsink_entry,
)
from streamsink.serving.ray_spread import REPLICA_SLOT

# Serve restarts a replica whose health check fails; vLLM's check fails as soon as the engine
# process is gone, so a short period means a killed engine is replaced within seconds.
HEALTH_CHECK_PERIOD_S = 2.0
# Replicas > 1: a conversation's next turn goes to the replica whose prefix cache holds its
# history (Ray Serve LLM's prefix-aware router matches a request's text against what each
# replica served). A new conversation matches nothing and goes to the least loaded one; a replica
# with 4 more requests queued than another falls back to load balancing. The router is Ray's,
# told to forget replicas that no longer exist (patches/ray_prefix_router.py says why).
PREFIX_ROUTER_KWARGS = {"imbalanced_threshold": 4, "match_rate_threshold": 0.1,
                        "do_eviction": True}


def prefix_router_config() -> dict:
    """The request_router_config of an LLM deployment of several replicas (checks the patched
    router's target first: imports Ray Serve LLM)."""
    from streamsink.patches import ray_prefix_router

    ray_prefix_router.check_target()
    return {"request_router_class": ray_prefix_router.ROUTER_CLASS_PATH,
            "request_router_kwargs": dict(PREFIX_ROUTER_KWARGS)}


# Arguments Ray Serve LLM sets itself (model_loading_config, the executor).
_NOT_ENGINE_ARGS = {"model", "served_model_name", "distributed_executor_backend"}
# Environment the replicas inherit from the launcher when it is set.
_PASSED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL")


@dataclass
class RaySpec:
    model_id: str                 # the name clients put in "model"
    model_path: str               # local checkpoint directory
    engine_kwargs: dict           # vLLM engine arguments of every replica
    replicas: int
    env_vars: dict = field(default_factory=dict)  # environment every replica needs
    spread: bool = False          # each replica on a node of its own (ray_spread.py)

    def llm_config(self):
        from ray.serve.llm import LLMConfig

        deployment = {"num_replicas": self.replicas,
                      "health_check_period_s": HEALTH_CHECK_PERIOD_S}
        if self.replicas > 1:
            deployment["request_router_config"] = prefix_router_config()
        return LLMConfig(
            model_loading_config={"model_id": self.model_id, "model_source": self.model_path},
            # A frontend argument (Ray splits those out): usage.prompt_tokens_details.cached_tokens.
            engine_kwargs={"enable_prompt_tokens_details": True, **self.engine_kwargs},
            accelerator_config={"kind": "cpu"},
            # One logical CPU per replica: the engine's threads share the node's cores anyway.
            # With --spread, one of the node's replica slots too (ray_spread.py says why).
            placement_group_config={"bundles": [
                {"CPU": 1, **({REPLICA_SLOT: 1} if self.spread else {})}]},
            deployment_config=deployment,
            runtime_env={"env_vars": dict(self.env_vars)} if self.env_vars else None,
            # vLLM's engine metrics (and, through the plugin, streamsink's) go to Ray's export.
            log_engine_metrics=True,
        )


def build_spec(model: str | None, sink: int, window: int, replicas: int,
               vllm_args: list[str], max_pinned: int = 0,
               weights: str | None = None, spread: bool = False) -> RaySpec:
    """The deployment, validated; raises StreamsinkConfigError / EngineArgsError /
    ModelNotFoundError with a one-line message."""
    if replicas < 1:
        raise EngineArgsError(f"--replicas must be >= 1, got {replicas}")
    entry = streamsink_entry(sink, window, max_pinned)
    choice = choose_model(model, weights)
    model_path = choice.path
    kwargs = VllmArgParser("streamsink serve --ray").explicit(vllm_args)
    served = kwargs.pop("served_model_name", None)
    model_id = (served[0] if served else None) or served_name(model)
    for name in _NOT_ENGINE_ARGS & set(kwargs):
        raise EngineArgsError(f"--{name.replace('_', '-')} is set by streamsink serve --ray "
                              f"(use --model / --served-model-name)")
    kwargs.setdefault("dtype", choice.dtype)
    kwargs.setdefault("max_num_seqs", DEFAULT_MAX_NUM_SEQS)
    additional = dict(kwargs.get("additional_config") or {})
    additional.setdefault(CONFIG_KEY, entry[CONFIG_KEY])
    kwargs["additional_config"] = additional
    env_vars = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env_vars.update(engine_environment({"model": model_path, **kwargs}))
    check_engine_config({"model": model_path, **kwargs}, served_model_name=model_id)
    # One replica is on a node of its own anyway: --spread asks nothing of the cluster then.
    return RaySpec(model_id, model_path, kwargs, replicas, env_vars, spread and replicas > 1)
