"""In-process vllm.LLM engines for the tools that step an engine themselves (demo, ppl,
benchmarks): built from the same engine arguments as every launcher (engine_args.py)."""
from __future__ import annotations

import os
from typing import Any

from streamsink.serving.engine_args import (
    engine_environment,
    engine_kwargs,
    scoped_environ,
    worker_threads_environment,
)


def make_llm(model: str | None = None, streamsink: dict | None = None, in_process: bool = False,
             weights: str | None = None, **overrides: Any):
    """A vllm.LLM. in_process=True keeps the engine core in this process, so callers can step
    it and read its scheduler (live stats, progress). weights: the default model's format
    (weights.py; None: dense fp32)."""
    # Read once, when vLLM is first imported: the tools show vLLM's warnings only.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    kwargs = engine_kwargs(model, streamsink, weights, **overrides)
    env = {**engine_environment(kwargs), **worker_threads_environment()}
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    with scoped_environ(env):
        return LLM(**kwargs)


def scheduler_of(llm):
    """The scheduler of an in-process engine (make_llm(in_process=True))."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def streaming_blocks_held(llm) -> int:
    """Physical KV blocks held right now by all requests of an in-process engine."""
    manager = scheduler_of(llm).kv_cache_manager
    return sum(m.held_blocks_all() for m in manager.coordinator.single_type_managers
               if hasattr(m, "held_blocks_all"))


def kv_pool_bytes(llm) -> int:
    """The engine's KV budget (a streaming engine given none sized it, plugin/kv_budget.py)."""
    return llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
