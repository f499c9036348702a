"""What a streaming engine needs from its VllmConfig: validation, the KV budget and the few
settings it forces.

Called in every process that builds a VllmConfig (the API process first, so a bad configuration
is refused before any engine process starts), through patches/engine_config.py.
"""
from __future__ import annotations

from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger

from streamsink.config import StreamsinkConfig, config_from_additional, streaming_config
from streamsink.errors import StreamsinkConfigError
from streamsink.kv_budget import size_kv_pool
from streamsink.model_families import REFUSED, family_of, supported_architectures
from streamsink.rope import (
    fixed_frequency_limit,
    rope_spec_from_hf_config,
    rope_type_of,
    uses_alibi,
)
from streamsink.stream_rule import min_row_tokens
from streamsink.vllm_internals import attention_isa
from streamsink.weights import quantization_refusal

logger = init_logger("vllm.plugins.streamsink")

# Architectures a streaming engine runs (model_families.py says how each encodes positions).
SUPPORTED_ARCHITECTURES = frozenset(supported_architectures())
# vLLM's KV block size on CPU when none is given (CpuPlatform's default).
CPU_DEFAULT_BLOCK_SIZE = 128


def configure_streaming_engine(vllm_config) -> None:
    """Before the platform's own checks: validate. No-op for an engine without a streamsink
    config. The model runs as stock would (compiled by default): RoPE works on row positions
    through vLLM's own table, and attention is a custom op outside the graph."""
    cfg = streaming_config(vllm_config)
    model_config = vllm_config.model_config
    if cfg is None or model_config is None:
        return
    arch = (model_config.architectures or ["?"])[0]
    reason = model_refusal(arch, model_config.hf_text_config, cfg.cache_tokens)
    if reason is None:
        reason = quantization_refusal(_quantization_config(model_config),
                                      str(model_config.dtype).removeprefix("torch."))
    if reason is not None:
        raise StreamsinkConfigError(reason)


def _quantization_config(model_config) -> dict | None:
    """The checkpoint's quantization_config as a dict (transformers may hand an object)."""
    qconfig = getattr(model_config.hf_config, "quantization_config", None)
    if qconfig is None:
        qconfig = getattr(model_config.hf_text_config, "quantization_config", None)
    if qconfig is not None and not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else vars(qconfig)
    return qconfig


def model_refusal(arch: str, hf_config, cache_tokens: int) -> str | None:
    """Why a streaming engine of C = cache_tokens cannot run this model (one line), or None."""
    if arch in REFUSED:
        return f"streamsink does not support {arch}: it {REFUSED[arch]}"
    family = family_of(arch)
    if family is None:
        return (f"streamsink does not support {arch} (supported: "
                f"{', '.join(supported_architectures())})")
    if getattr(hf_config, "sliding_window", None) is not None:
        # vLLM would give such layers its own sliding-window KV manager, which frees the sinks.
        return (f"streamsink does not support models with their own sliding window "
                f"(sliding_window={hf_config.sliding_window}); set it to null")
    if uses_alibi(hf_config):
        return None if family.alibi else f"streamsink does not support {arch} with ALiBi"
    rope_type = rope_type_of(hf_config)
    if rope_type not in family.rope_types:
        return (f"streamsink does not support rope_type {rope_type!r} for {arch} (supported: "
                f"{', '.join(family.rope_types)})")
    try:
        rope_spec_from_hf_config(hf_config)
    except ValueError as exc:
        return str(exc)
    limit = fixed_frequency_limit(hf_config)
    if limit is not None and cache_tokens > limit[0]:
        return (f"streamsink supports rope_type {rope_type!r} only while S+W stays within "
                f"{limit[1]} ({limit[0]}), where its frequencies do not change; got "
                f"S+W={cache_tokens}")
    return None


def finish_streaming_engine(vllm_config) -> None:
    """After the platform's checks (which pick the block size, read VLLM_CPU_KVCACHE_SPACE and
    turn async scheduling off): KV layout, row width, prefix caching and the KV budget."""
    cfg = streaming_config(vllm_config)
    if cfg is None or vllm_config.model_config is None:
        return
    cache_config = vllm_config.cache_config
    if cache_config.cache_dtype not in ("auto", None):
        raise StreamsinkConfigError(
            f"streamsink needs an unquantized KV cache, got kv_cache_dtype={cache_config.cache_dtype}")
    _check_kv_layout(vllm_config.model_config, cache_config)
    _check_row_width(vllm_config, cfg)
    # The worker rows of long streams are rebased (row_window.py); the speculative-decoding and
    # pipeline-parallel paths write those rows in ways it does not follow.
    if vllm_config.speculative_config is not None:
        raise StreamsinkConfigError("streamsink does not support speculative decoding")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise StreamsinkConfigError("streamsink does not support pipeline parallelism")
    if cache_config.enable_prefix_caching:
        # Exact for streaming (prefix_cache.py), given what it relies on: the scheduler's pass
        # ends before the step it schedules runs (synchronous scheduling, which vLLM's CPU
        # platform forces), so a copy queued in a pass runs before that step's forward.
        if vllm_config.scheduler_config.async_scheduling:
            raise StreamsinkConfigError(
                "streamsink's prefix caching needs synchronous scheduling; pass "
                "--no-async-scheduling or --no-enable-prefix-caching")
    if cache_config.kv_cache_memory_bytes is None:
        budget = size_kv_pool(vllm_config, cfg)
        cache_config.kv_cache_memory_bytes = budget.bytes
        logger.info("streamsink: %s", budget.describe())


def _check_kv_layout(model_config, cache_config) -> None:
    """The streaming path reads the CPU backend's "vec" KV layout; refuse the others."""
    head_dim = model_config.get_head_size()
    block_size = cache_config.block_size or CPU_DEFAULT_BLOCK_SIZE
    isa = attention_isa(model_config.dtype, block_size, head_dim, cache_config.cache_dtype)
    if isa != "vec":
        raise StreamsinkConfigError(
            f"streamsink supports the CPU attention layout 'vec' only; dtype {model_config.dtype}, "
            f"head_dim {head_dim}, block size {block_size} select {isa!r} (try dtype=float32)")


def _check_row_width(vllm_config, cfg: StreamsinkConfig) -> None:
    """A stream runs past max_model_len, but one step (sinks, window, chunk) must fit the
    worker's batch row of max_model_len tokens (row_window.py)."""
    block_size = vllm_config.cache_config.block_size or CPU_DEFAULT_BLOCK_SIZE
    step = vllm_config.scheduler_config.max_num_batched_tokens
    need = min_row_tokens(cfg.sink_tokens, cfg.window_tokens, cfg.max_pinned_tokens, block_size,
                          step)
    have = vllm_config.model_config.max_model_len
    if have < need:
        raise StreamsinkConfigError(
            f"streamsink needs max_model_len >= {need} for sink_tokens={cfg.sink_tokens}, "
            f"window_tokens={cfg.window_tokens}, max_pinned_tokens={cfg.max_pinned_tokens}, "
            f"max_num_batched_tokens={step}, block size "
            f"{block_size} (got {have}); streams still run past max_model_len")


def fit_default_chunk(engine_args, max_model_len: int, default_chunk: int) -> int | None:
    """The step size (max_num_batched_tokens) for a streaming engine whose user did not choose
    one: vLLM's default, or the largest that fits the row when that does not. None: keep the
    default (not streaming, or it fits, or nothing fits and the row check will say so)."""
    cfg = config_from_additional(engine_args.additional_config)
    if cfg is None:
        return None
    block_size = engine_args.block_size or CPU_DEFAULT_BLOCK_SIZE
    room = max_model_len - min_row_tokens(cfg.sink_tokens, cfg.window_tokens,
                                          cfg.max_pinned_tokens, block_size, 0)
    if default_chunk <= room or room < block_size:
        return None
    logger.info("streamsink: max_num_batched_tokens=%d (vLLM's default %d) so that one step "
                "fits max_model_len=%d with sink_tokens=%d, window_tokens=%d", room,
                default_chunk, max_model_len, cfg.sink_tokens, cfg.window_tokens)
    return room


def engine_being_built() -> tuple[StreamsinkConfig | None, object]:
    """(streamsink config, VllmConfig) of the engine whose model this process is building now
    (vLLM sets the current config around model construction); (None, ...) for a stock one."""
    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None or vllm_config.model_config is None:
        return None, vllm_config
    return streaming_config(vllm_config), vllm_config
