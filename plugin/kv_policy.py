"""The paged KV policy: pin the sink blocks, free window blocks once no query can see them.

A registered KV cache spec and manager (vLLM's own extension point, kv_cache_spec_registry); the
spec is in kv_spec.py, exact prefix caching in prefix_cache.py, and what a stream keeps (the
retained run, the front blocks, the per-stream bound) in stream_rule.py.
"""
from __future__ import annotations

from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from streamsink import prefix_cache
from streamsink.kv_spec import StreamingSinkSpec
from streamsink.metrics import Publisher
from streamsink.prefix_cache import StreamingPrefixCache
from streamsink.stream_rule import first_live_block, front_blocks, max_blocks_held, skipped_tokens


class StreamingSinkManager(StreamingPrefixCache):
    """SlidingWindowManager that never frees the blocks holding the first S tokens (and caches
    prefixes exactly, prefix_cache.py)."""

    def __init__(self, kv_cache_spec: StreamingSinkSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._freed: dict[str, int] = {}  # per request: blocks replaced by the null block
        # A stream past C, decoding: the engine's shape (a pinning request has its own bound).
        self.decode_blocks = max_blocks_held(self._engine_shape, self.block_size, 1,
                                             self.extra_retained_tokens)
        # Totals over this manager's life, for metrics.
        self.blocks_freed_total = 0
        self.tokens_evicted_total = 0
        self.metrics = Publisher()

    def get_num_blocks_to_allocate(self, request_id, *args, **kwargs) -> int:
        need = super().get_num_blocks_to_allocate(request_id, *args, **kwargs)
        if self.req_to_blocks.get(request_id):
            return need  # a running request: what its step needs
        # A request to admit. A stream past C frees its oldest window block a step or more before
        # it takes a new one, so for those steps the pool looks bigger than it is; admitting into
        # that room preempts the streams the next step (each then recomputes its window through
        # the prefill path: seconds-long steps, periodically, under load). So admission leaves
        # room for the blocks those streams are sure to take back. Streams not yet past C grow
        # as in stock vLLM (no reservation: the scheduler preempts if it must).
        return need + self.reserved_for_running()

    def reserved_for_running(self) -> int:
        """Blocks the streams already past C will take back before they free any again."""
        return sum(max(0, self._decode_blocks(r) - self.held_blocks(r)) for r in self._freed)

    def _decode_blocks(self, request_id: str) -> int:
        shape = self.shapes.get(request_id)
        if shape is None:
            return self.decode_blocks
        return max_blocks_held(shape, self.block_size, 1, self.extra_retained_tokens)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        # vLLM asks with a token count alone (no request): the engine's shape. No present or
        # future query sees these tokens, and they are not a decode step's shadow slots.
        return skipped_tokens(self._engine_shape, num_computed_tokens,
                              self.extra_retained_tokens)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        blocks = self.req_to_blocks.get(request_id)
        shape = self.shape(request_id)
        front = front_blocks(shape, self.block_size)
        live = first_live_block(shape, self.block_size, processed_computed_tokens,
                                self.extra_retained_tokens)
        if not blocks or live <= front:
            return
        # The blocks between the front blocks and the first live one, newest first, stopping at
        # the first block already freed: O(blocks freed now), not O(stream length), on this
        # per-step path.
        freed = []
        for i in range(min(live, len(blocks)) - 1, front - 1, -1):
            if blocks[i] is self._null_block:
                break
            freed.append(blocks[i])
            blocks[i] = self._null_block
        if freed:
            # Oldest first: with prefix caching on, the free queue evicts from its front.
            self.block_pool.free_blocks(reversed(freed))
            self._freed[request_id] = self._freed.get(request_id, 0) + len(freed)
            self.blocks_freed_total += len(freed)
            self.tokens_evicted_total += len(freed) * self.block_size
            self.publish()

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args, **kwargs):
        blocks = super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
        if blocks:
            if request_id in self.shapes:   # with prefix caching off, the only place it shows
                self._note_pins(request_id)
            self.publish()
        return blocks

    def add_local_computed_blocks(self, request_id, *args, **kwargs) -> None:
        super().add_local_computed_blocks(request_id, *args, **kwargs)
        # A prefix hit skips the middle of the history: null blocks, as if freed.
        nulls = sum(b.is_null for b in self.req_to_blocks[request_id])
        if nulls:
            self._freed[request_id] = nulls

    def pop_blocks_for_free(self, request_id: str):
        # Finish, abort and preemption all come through here (free() included).
        self._freed.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id)
        self.publish(force=True)
        return blocks

    def held_blocks(self, request_id: str) -> int:
        """Physical blocks this request holds now (freed positions hold the null block)."""
        blocks = self.req_to_blocks.get(request_id)
        return len(blocks) - self._freed.get(request_id, 0) if blocks else 0

    def held_blocks_all(self) -> int:
        return sum(self.held_blocks(r) for r in self.req_to_blocks)

    def publish(self, force: bool = False) -> None:
        """Push this manager's numbers to the metrics (metrics.py keys)."""
        self.metrics.publish({
            "freed_blocks": self.blocks_freed_total,
            "evicted_tokens": self.tokens_evicted_total,
            "cache_shadow_copies": self.shadow_copies_total,
            "cache_hit_copies": self.adopt_copies_total,
            "cache_dropped_blocks": self.unhashed_total,
            "held_blocks": self.held_blocks_all(),
            "streams": len(self.req_to_blocks),
            "pinned_blocks": len(self.pin_holders),
            "pinned_block_refs": sum(len(h) for h in self.pin_holders.values()),
            "pinned_streams": sum(1 for r in self.shapes if self.req_to_blocks.get(r)),
            "pool_used_blocks": self.block_pool.num_gpu_blocks - 1
            - self.block_pool.get_num_free_blocks()}, force=force)


def register_kv_policy() -> None:
    """Register the spec/manager pair, after the built-ins (the registry only registers the
    built-ins lazily when it is empty, so registering first would hide them)."""
    prefix_cache.check_target()  # refuse loudly if the vLLM internals it relies on moved
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager,
                                 uniform_type_base_spec=StreamingSinkSpec)
