"""streamsink: StreamingLLM inside vLLM's paged KV cache, as a vLLM plugin.

vLLM loads the entry point ``vllm.general_plugins -> streamsink:register`` in the API process, the
engine core and every worker. Registration only installs hooks; each hook checks the engine's
``additional_config`` and stays out of the way unless it has a ``streamsink`` entry.
"""
from __future__ import annotations

import os

# streamsink.stream_state(output): the state of the stream behind a vLLM RequestOutput, as the
# OpenAI server reports it in usage["streamsink"] (client_state.py; imports no vLLM).
from streamsink.client_state import stream_state

__all__ = ["register", "stream_state"]
__version__ = "0.1.0"

_registered_in_pid: int | None = None


def register() -> None:
    """vLLM general-plugin entry point. Idempotent per process."""
    global _registered_in_pid
    if _registered_in_pid == os.getpid():
        return
    _registered_in_pid = os.getpid()
    from streamsink.attention import register_attention_backend
    from streamsink.kv_policy import register_kv_policy
    from streamsink.metrics import register_collector, start_ray_export
    from streamsink.patches import (
        check_version,
        default_chunk,
        early_refusal,
        engine_config,
        hf_gpt_neox_rope,
        input_length,
        kv_cache_spec,
        kv_request_shapes,
        llm_chat_options,
        openai_max_tokens,
        openai_prompt_length,
        openai_request_options,
        openai_usage,
        output_stream_state,
        renderer_length,
        rotary_embedding,
        scheduler_length_cap,
        worker_batch_rows,
    )

    register_kv_policy()
    # First: in a Ray Serve replica this picks the replica's own snapshot folder.
    start_ray_export()
    register_collector()
    register_attention_backend()
    check_version()
    for patch in (rotary_embedding, hf_gpt_neox_rope, engine_config, default_chunk, input_length,
                  renderer_length, openai_prompt_length, openai_max_tokens,
                  openai_request_options, llm_chat_options, scheduler_length_cap, kv_cache_spec,
                  kv_request_shapes, worker_batch_rows, output_stream_state, openai_usage,
                  early_refusal):
        patch.apply()
    # A child of vLLM's logger, so the line carries vLLM's process prefix (EngineCore, Worker).
    from vllm.logger import init_logger

    init_logger("vllm.plugins.streamsink").info("streamsink %s plugin loaded", __version__)

