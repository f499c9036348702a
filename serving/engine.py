"""Build vLLM engines the way streamsink's tools use them (one place for CPU-friendly defaults)."""
from __future__ import annotations

import os
from typing import Any

from streamsink.model_store import resolve_model

# Sizing the KV pool explicitly skips vLLM's CPU memory probe, which refuses to start when another
# process holds memory (and needs a warm-up pass to measure). 1 GiB is ~23k tokens of SmolLM2 fp32.
DEFAULT_KV_CACHE_BYTES = 1 << 30


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
    return kwargs


def make_llm(model: str | None = None, streamsink: dict | None = None, **overrides: Any):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    return LLM(**engine_kwargs(model, streamsink, **overrides))
