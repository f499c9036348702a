"""Build vLLM engines the way streamsink's tools use them (one place for CPU-friendly defaults)."""
from __future__ import annotations

import os
from typing import Any

from streamsink.config import StreamsinkConfig, parse_config
from streamsink.model_store import resolve_model

# Sizing the KV pool explicitly skips vLLM's CPU memory probe, which refuses to start when another
# process holds memory (and needs a warm-up pass to measure). 1 GiB is ~23k tokens of SmolLM2 fp32.
DEFAULT_KV_CACHE_BYTES = 1 << 30
# vLLM's KV block size on CPU (platforms/cpu.py default).
BLOCK_SIZE = 128
# vLLM's max_num_batched_tokens for vllm.LLM on CPU when none is given (the rows of a streaming
# engine must fit one such step; vLLM refuses at start-up, with our message, if this drifts).
VLLM_DEFAULT_CHUNK = 4096


def engine_kwargs(model: str | None = None, streamsink: dict | None = None,
                  **overrides: Any) -> dict:
    """Keyword arguments for ``vllm.LLM``; ``streamsink=None`` means a stock engine."""
    kwargs: dict[str, Any] = dict(
        model=resolve_model(model),
        dtype="float32",
        kv_cache_memory_bytes=DEFAULT_KV_CACHE_BYTES,
    )
    if streamsink is not None:
        kwargs["additional_config"] = {"streamsink": dict(streamsink)}
    kwargs.update(overrides)
    if streamsink is not None and "max_model_len" not in overrides:
        kwargs["max_model_len"] = streaming_max_model_len(
            kwargs["model"], parse_config(streamsink),
            kwargs.get("max_num_batched_tokens") or VLLM_DEFAULT_CHUNK)
    return kwargs


def streaming_max_model_len(model_path: str, cfg: StreamsinkConfig, chunk: int) -> int:
    """The model's own context length, or the narrowest batch row one streaming step needs
    when that is longer (a dense window wider than the model's positions). Streams run past
    max_model_len either way; RoPE past the model's table comes from streamsink."""
    from transformers import AutoConfig

    from streamsink.row_window import min_row_tokens

    native = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 0) or 0
    need = min_row_tokens(cfg, BLOCK_SIZE, chunk)
    if need > native:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    return max(native, need)


def make_llm(model: str | None = None, streamsink: dict | None = None, in_process: bool = False,
             **overrides: Any):
    """A vllm.LLM. in_process=True keeps the engine core in this process, so callers can step
    it and read its scheduler (live stats, progress)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(**engine_kwargs(model, streamsink, **overrides))


def scheduler_of(llm):
    """The scheduler of an in-process engine (make_llm(in_process=True))."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def streaming_blocks_held(llm) -> int:
    """Physical KV blocks held right now by all requests of an in-process engine."""
    manager = scheduler_of(llm).kv_cache_manager
    return sum(m.held_blocks_all() for m in manager.coordinator.single_type_managers
               if hasattr(m, "held_blocks_all"))
