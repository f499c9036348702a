"""The KV cache spec of a streaming attention layer.

A leaf module (vLLM's spec classes and the streaming rule only). The spec subclasses
SlidingWindowSpec on purpose: vLLM then sizes the pool and admits requests by the window
(max_admission_blocks_per_request) instead of by max_model_len, which is what lets a prompt of
any length stream through chunked prefill. The per-stream block bound it admits by is
stream_rule.max_blocks_per_stream (docs/architecture.md, "Memory").
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from streamsink.stream_rule import StreamShape, max_blocks_per_stream


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(SlidingWindowSpec):
    """KV spec of a streaming layer: `sliding_window` is W, plus S pinned sink tokens."""

    sink_tokens: int = 0
    # The most tokens one request may pin instead of the S sinks (config.max_pinned_tokens); such
    # a request keeps its P pinned tokens and W-1 before its query (it writes no shadows).
    max_pinned_tokens: int = 0

    @property
    def engine_shape(self) -> StreamShape:
        """The shape of a request without options of its own."""
        return StreamShape(self.sink_tokens, self.sliding_window)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int,
                                         max_model_len: int) -> int:
        # The most one stream holds (the engine's shape, or one pinning max_pinned_tokens).
        return min(max_blocks_per_stream(self.sink_tokens, self.sliding_window,
                                         self.max_pinned_tokens, self.block_size,
                                         max_in_flight_tokens, self.extra_retained_tokens),
                   cdiv(max_model_len, self.block_size))
