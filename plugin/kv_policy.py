"""The paged KV policy: pin the sink blocks, free window blocks once no query can see them.

A registered KV cache spec and manager (vLLM's own extension point, kv_cache_spec_registry). The
manager is the one object vLLM calls. It answers for the policy itself: what a stream keeps and
frees (stream_rule.py, with each request's own shape, request_options.py) and what admission
leaves room for; and it hands what concerns exact prefix caching (which cached blocks a hit may
reuse, which blocks may be hashed) to its StreamingPrefixCache (prefix_cache.py). The spec is in
kv_spec.py; the private vLLM members both use are in vllm_internals.py.
"""
from __future__ import annotations

from typing import NamedTuple

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import (
    SlidingWindowManager,
    register_all_kvcache_specs,
)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from streamsink import vllm_internals
from streamsink.kv_spec import StreamingSinkSpec
from streamsink.metrics import Publisher
from streamsink.prefix_cache import StreamingPrefixCache, hit_spec
from streamsink.request_options import request_shape
from streamsink.stream_rule import (
    StreamShape,
    first_live_block,
    front_blocks,
    max_blocks_held,
    skipped_tokens,
)


class _Lookup(NamedTuple):
    """The request whose cache hit vLLM is about to search (note_lookup)."""

    block_hashes: list        # the request's own list, which vLLM hands on to the search
    shape: StreamShape


class StreamingSinkManager(SlidingWindowManager):
    """SlidingWindowManager that never frees the blocks holding the first S tokens (a request's
    pinned tokens, for one with a shape of its own), and caches prefixes exactly through its
    `cache`."""

    def __init__(self, kv_cache_spec: StreamingSinkSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self._engine_shape = kv_cache_spec.engine_shape
        self.shapes: dict[str, StreamShape] = {}   # req_id -> its shape, when not the engine's
        self._lookup: _Lookup | None = None         # note_lookup -> find_longest_cache_hit
        self.cache = StreamingPrefixCache(self)
        self._freed: dict[str, int] = {}  # per request: blocks replaced by the null block
        # A stream past C, decoding: the engine's shape (a pinning request has its own bound).
        self.decode_blocks = max_blocks_held(self._engine_shape, self.block_size, 1,
                                             self.extra_retained_tokens)
        # Totals over this manager's life, for metrics.
        self.blocks_freed_total = 0
        self.tokens_evicted_total = 0
        self.metrics = Publisher()

    # -- per-request shapes -----------------------------------------------------------------
    def note_lookup(self, request) -> None:
        """A request about to be looked up in the cache and admitted (new or resumed): its shape
        (patches/kv_request_shapes.py)."""
        shape = request_shape(self._engine_shape, request.sampling_params.extra_args
                              if request.sampling_params is not None else None)
        if shape.writes_shadows:   # the engine's shape
            self.shapes.pop(request.request_id, None)
        else:
            self.shapes[request.request_id] = shape
        self._lookup = _Lookup(request.block_hashes, shape)

    def _looked_up_shape(self, block_hashes) -> StreamShape:
        """The shape of the request whose hit is being searched: vLLM's search gets its block
        hashes alone, so they must be those of the request note_lookup was told of last."""
        lookup = self._lookup
        assert lookup is not None and lookup.block_hashes is block_hashes, \
            "streamsink: a prefix-cache search for a request the KV manager was not told of"
        return lookup.shape

    def shape(self, request_id: str) -> StreamShape:
        return self.shapes.get(request_id, self._engine_shape)

    # -- hits -------------------------------------------------------------------------------
    def find_longest_cache_hit(self, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size=1, pcp_world_size=1):
        # vLLM declares this a classmethod but calls it on the manager (vllm_internals.py):
        # here it needs the shape of the request being looked up. vLLM's sliding-window search
        # finds the run a hit carries; the cache adds the front blocks it skips.
        shape = self._looked_up_shape(block_hashes)
        blocks, length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, hit_spec(kv_cache_spec),
            drop_eagle_block, alignment_tokens, dcp_world_size, pcp_world_size)
        return self.cache.with_front_blocks(shape, blocks, length, block_hashes, block_pool,
                                            kv_cache_spec, kv_cache_group_ids)

    def add_local_computed_blocks(self, request_id, new_computed_blocks,
                                  num_local_computed_tokens, num_external_computed_tokens):
        # The cache adopts the hit in place of vLLM's adoption (which would take the hit's
        # sinks for blocks out of the window).
        self.cache.adopt(request_id, new_computed_blocks, num_external_computed_tokens)
        # A prefix hit skips the middle of the history: null blocks, as if freed.
        nulls = sum(b.is_null for b in self.req_to_blocks[request_id])
        if nulls:
            self._freed[request_id] = nulls

    # -- admission and allocation -----------------------------------------------------------
    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0) -> int:
        if request_id in self.num_cached_block or not new_computed_blocks:
            need = super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap,
                prefill_end)
        else:
            # A new request with a hit. vLLM's count skips the hit's first blocks as out of the
            # window, which here are the sinks; and what the hit's blocks take is the cache's.
            need = (self._blocks_past_hit(num_tokens, len(new_computed_blocks),
                                          total_computed_tokens, apply_admission_cap)
                    + self.cache.hit_cost(request_id, new_computed_blocks))
        if self.req_to_blocks.get(request_id):
            return need  # a running request: what its step needs
        # A request to admit. A stream past C frees its oldest window block a step or more before
        # it takes a new one, so for those steps the pool looks bigger than it is; admitting into
        # that room preempts the streams the next step (each then recomputes its window through
        # the prefill path: seconds-long steps, periodically, under load). So admission leaves
        # room for the blocks those streams are sure to take back. Streams not yet past C grow
        # as in stock vLLM (no reservation: the scheduler preempts if it must).
        return need + self.reserved_for_running()

    def _blocks_past_hit(self, num_tokens: int, hit_blocks: int, total_computed_tokens: int,
                         apply_admission_cap: bool) -> int:
        """Fresh blocks a new request with a hit of `hit_blocks` blocks takes for the rest of
        its first step."""
        required = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self.max_admission_blocks_per_request is not None:
            required = min(required, self.max_admission_blocks_per_request)
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        return max(required - max(skipped, hit_blocks), 0)

    def reserved_for_running(self) -> int:
        """Blocks the streams already past C will take back before they free any again."""
        return sum(max(0, self._decode_blocks(r) - self.held_blocks(r)) for r in self._freed)

    def _decode_blocks(self, request_id: str) -> int:
        shape = self.shapes.get(request_id)
        if shape is None:
            return self.decode_blocks
        return max_blocks_held(shape, self.block_size, 1, self.extra_retained_tokens)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args, **kwargs):
        blocks = super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)
        if blocks:
            if request_id in self.shapes:   # with prefix caching off, the only place it shows
                self.cache.note_pins(request_id)
            self.publish()
        return blocks

    def cache_blocks(self, request, num_tokens, retention_interval=None, *,
                     replay_boundaries=()):
        """Called by allocate_slots once a step is allocated: num_tokens is where the step ends
        (the cache hashes only what earlier steps processed)."""
        self.cache.step_allocated(request, num_tokens)

    def take_pending_cow_copies(self):
        """The end of a scheduling pass (vLLM drains the copies once per schedule())."""
        self.cache.protect_from_shadows()
        return super().take_pending_cow_copies()

    # -- freeing ----------------------------------------------------------------------------
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
        null = self.block_pool.null_block
        freed = []
        for i in range(min(live, len(blocks)) - 1, front - 1, -1):
            if blocks[i] is null:
                break
            freed.append(blocks[i])
            blocks[i] = null
        if freed:
            # Oldest first: with prefix caching on, the free queue evicts from its front.
            self.block_pool.free_blocks(reversed(freed))
            self._freed[request_id] = self._freed.get(request_id, 0) + len(freed)
            self.blocks_freed_total += len(freed)
            self.tokens_evicted_total += len(freed) * self.block_size
            self.publish()

    def pop_blocks_for_free(self, request_id: str):
        # Finish, abort and preemption all come through here (free() included). The cache
        # hashes the last step's blocks and drops the request's pins while its shape is known.
        self._freed.pop(request_id, None)
        self.cache.release(request_id)
        self.shapes.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def free(self, request_id: str) -> None:
        # Publish once vLLM has returned the blocks to the pool, not from pop_blocks_for_free:
        # there the blocks are still out of the pool, so pool_used_blocks kept the last
        # request's blocks on an idle server. Reading the pool after its own free_blocks is
        # exact whatever the ref counts (shared pinned blocks, copies still retained, the null
        # block); computing "used minus what is about to be freed" would re-implement them.
        # vLLM's other caller of pop_blocks_for_free, the scheduler's deferred free, needs more
        # than one batch in flight, which a streaming engine never has (the CPU platform forces
        # synchronous scheduling; pipeline parallelism is refused, engine_setup.py).
        super().free(request_id)
        self.publish(force=True)

    # -- numbers ----------------------------------------------------------------------------
    def held_blocks(self, request_id: str) -> int:
        """Physical blocks this request holds now (freed positions hold the null block)."""
        blocks = self.req_to_blocks.get(request_id)
        return len(blocks) - self._freed.get(request_id, 0) if blocks else 0

    def held_blocks_all(self) -> int:
        return sum(self.held_blocks(r) for r in self.req_to_blocks)

    def publish(self, force: bool = False) -> None:
        """Push this manager's numbers to the metrics (metrics.py keys)."""
        cache = self.cache
        self.metrics.publish({
            "freed_blocks": self.blocks_freed_total,
            "evicted_tokens": self.tokens_evicted_total,
            "cache_shadow_copies": cache.shadow_copies_total,
            "cache_hit_copies": cache.adopt_copies_total,
            "cache_dropped_blocks": cache.unhashed_total,
            "held_blocks": self.held_blocks_all(),
            "streams": len(self.req_to_blocks),
            "pinned_blocks": len(cache.pin_holders),
            "pinned_block_refs": sum(len(h) for h in cache.pin_holders.values()),
            "pinned_streams": sum(1 for r in self.shapes if self.req_to_blocks.get(r)),
            "pool_used_blocks": self.block_pool.num_gpu_blocks - 1
            - self.block_pool.get_num_free_blocks()}, force=force)


def register_kv_policy() -> None:
    """Register the spec/manager pair, after the built-ins (the registry only registers the
    built-ins lazily when it is empty, so registering first would hide them)."""
    vllm_internals.check_target()  # refuse loudly if the vLLM internals relied on moved
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(StreamingSinkSpec, StreamingSinkManager,
                                 uniform_type_base_spec=StreamingSinkSpec)
