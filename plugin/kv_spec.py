"""The KV cache spec of a streaming attention layer, and the per-stream block bound.

A leaf module (vLLM's spec classes only): the KV policy, the attention path, the engine set-up
and the KV budget all read the bound from here, so it is written once.

The spec subclasses SlidingWindowSpec on purpose: vLLM then sizes the pool and admits requests by
the window (max_admission_blocks_per_request) instead of by max_model_len, which is what lets a
prompt of any length stream through chunked prefill.

Block accounting: with block size B, a stream holds the ceil(S/B) sink blocks for its whole life,
plus the blocks covering the C-1 = S+W-1 tokens before the next query and the Q tokens scheduled
in the step: at most ceil(S/B) + ceil((S+W-1+Q)/B) + 1 blocks, whatever its length. The S slots
kept beyond the window are where decode writes the sinks' "shadows" (attention.py) so that vLLM's
own kernel can run (docs/architecture.md, "Memory").
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class StreamingSinkSpec(SlidingWindowSpec):
    """KV spec of a streaming layer: `sliding_window` is W, plus S pinned sink tokens."""

    sink_tokens: int = 0
    # The most tokens one request may pin instead of the S sinks (config.max_pinned_tokens); such
    # a request keeps its P pinned tokens and W-1 before its query (it writes no shadows).
    max_pinned_tokens: int = 0

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    @property
    def retained_tokens(self) -> int:
        """Tokens kept before the next query: the window's W-1 plus S shadow slots."""
        return self.sink_tokens + self.sliding_window - 1

    def max_blocks_held(self, step_tokens: int) -> int:
        """The most blocks one stream holds with `step_tokens` scheduled in a step (a stream with
        the engine's sinks, or one pinning max_pinned_tokens)."""
        return max(max_blocks_held(self.sink_tokens, self.sliding_window, self.block_size,
                                   step_tokens, self.extra_retained_tokens),
                   max_pinned_blocks_held(self.max_pinned_tokens, self.sliding_window,
                                          self.block_size, step_tokens,
                                          self.extra_retained_tokens))

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int,
                                         max_model_len: int) -> int:
        return min(self.max_blocks_held(max_in_flight_tokens),
                   cdiv(max_model_len, self.block_size))


def max_blocks_held(sink_tokens: int, window_tokens: int, block_size: int, step_tokens: int,
                    extra_retained_tokens: int = 0) -> int:
    """The per-stream bound: sink blocks, the retained run (S+W-1 tokens before the next
    query) and the step's tokens, +1 because the retained run need not start on a block
    boundary."""
    held = sink_tokens + window_tokens - 1 + extra_retained_tokens + step_tokens
    return cdiv(sink_tokens, block_size) + cdiv(held, block_size) + 1


def max_pinned_blocks_held(pinned_tokens: int, window_tokens: int, block_size: int,
                           step_tokens: int, extra_retained_tokens: int = 0) -> int:
    """The bound for a request pinning `pinned_tokens` (no shadow slots: W-1 tokens before the
    next query)."""
    held = window_tokens - 1 + extra_retained_tokens + step_tokens
    return cdiv(pinned_tokens, block_size) + cdiv(held, block_size) + 1
