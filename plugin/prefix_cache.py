"""Prefix caching for streaming requests, exact (the scheduler side; the worker side is in
row_window.py).

For a fixed (S, W) the KV a stream stores for token j is a function of its tokens <= j
(chunking invariance), so full blocks can be keyed by the token prefix, as vLLM does. What a
request continuing at token h needs from the cache is the sink blocks and the C-1 = S+W-1
tokens before h: the window's W-1 and the S slots its decodes overwrite with sink shadows
(attention.py). Three things stop a plain sliding-window prefix cache from being exact:

1. Shadows. A kernel decode at token q overwrites the slots of tokens q-C+1 .. q-W with the
   sinks (re-rotated). vLLM hashes a block long before that happens, so a cached block would
   later hold another request's shadows where the next request must read real keys.
   Here a block that holds a shadow is never in the cache:
   - the first time a step's shadows reach a hashed block, its hashes move to a fresh copy
     (block_pool.move_block_hashes) and the copy runs on the worker before the step's forward
     writes the shadows (vLLM's own copy-on-write path, kv_cache_block_copies), so the request
     keeps writing into its block while the cache keeps the clean copy. This is decided at the
     end of the scheduling pass, from the blocks left free after every request of the step was
     given its own, so it can never make a request unschedulable; with no block left, the block
     just loses its hashes;
   - a block is hashed only once its tokens are processed (not when they are scheduled), and
     never if a shadow already reached it (possible when W < B).
2. Rotation. Keys are stored rotated at the position of the worker's row, which depends on the
   stream's history (row_window.py). The worker tags each physical block with the offset its
   keys are rotated for and re-rotates the blocks a request adopts; nothing here.
3. Sharing. Another request's shadows and row rebases change a block in place, so a block is
   never held by two running requests: a hit on a block that a running request holds is copied
   (the same copy-on-write path). A hit on a block nobody holds is adopted without a copy.

Hits: vLLM's sliding-window search with a window of C (stream_rule.cache_hit_window) finds the
last run of cdiv(C-1, B) cached blocks ending at the hit length h (null blocks before it); the
sink blocks (a pinning request's pinned blocks) are then looked up by their own hashes. No sink
block in the cache means no hit.

Pinned prefixes (request_options.py) are the exception to 3: a request with options of its own
writes no shadows and its row never moves its pinned blocks, so once written they never change.
A hit on a block that only such requests hold, and only inside their pinned prefixes, is shared
(one physical copy for every request pinning the same system prompt) instead of copied.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import NamedTuple

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import (
    SingleTypeKVCacheManager,
    SlidingWindowManager,
)

from streamsink.errors import PatchTargetMoved
from streamsink.request_options import request_shape
from streamsink.stream_rule import StreamShape, cache_hit_window, front_blocks, shadow_span


class _Lookup(NamedTuple):
    """The request whose cache hit vLLM is about to search (note_lookup)."""

    block_hashes: list        # the request's own list, which vLLM hands on to the search
    shape: StreamShape


@functools.lru_cache(maxsize=8)
def _hit_spec(spec):
    """The spec vLLM's sliding-window search should see: the engine's cache_hit_window (C), so
    that a hit carries the C-1 tokens a streaming request keeps before its next query (and the
    W_r-1 of a request with a shape of its own, W_r <= W)."""
    return dataclasses.replace(spec, sliding_window=cache_hit_window(spec.engine_shape))


class StreamingPrefixCache(SlidingWindowManager):
    """The prefix-caching half of the streaming KV manager (kv_policy.StreamingSinkManager)."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        # Totals over this manager's life, for metrics (blocks).
        self.shadow_copies_total = 0   # cached blocks copied before a shadow reached them
        self.adopt_copies_total = 0    # hits copied because a running request held them
        self.unhashed_total = 0        # cached blocks dropped from the cache instead
        self._engine_shape = kv_cache_spec.engine_shape
        self.shapes: dict[str, StreamShape] = {}   # req_id -> its shape, when not the engine's
        self._lookup: _Lookup | None = None         # note_lookup -> find_longest_cache_hit
        # block id -> requests holding it inside their pinned prefix (shapes without shadows).
        self.pin_holders: dict[int, set[str]] = {}
        self._requests: dict = {}                  # req_id -> Request (hashing at free)
        self._scheduled: dict[str, int] = {}       # this pass: req_id -> tokens after the step
        # req_id -> (lowest, highest) token position a shadow of this request was written to.
        self._shadowed: dict[str, tuple[int, int]] = {}

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
        # vLLM declares this a classmethod but calls it on the manager: here it needs the shape
        # of the request being looked up.
        shape = self._looked_up_shape(block_hashes)
        blocks, length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, _hit_spec(kv_cache_spec),
            drop_eagle_block, alignment_tokens, dcp_world_size, pcp_world_size)
        if not length:
            return blocks, 0
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size,
                                      kv_cache_spec.block_size)
        for j in range(min(front_blocks(shape, self.block_size), len(blocks[0]))):
            if not blocks[0][j].is_null:
                continue
            sink = block_pool.get_cached_block(hashes[j], kv_cache_group_ids)
            if sink is None:  # every query sees the sinks: no sinks, no hit
                return tuple([] for _ in kv_cache_group_ids), 0
            for group, block in zip(blocks, sink):
                group[j] = block
        return blocks, length

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, apply_admission_cap=False,
                                   prefill_end=0):
        if request_id in self.num_cached_block or not new_computed_blocks:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap,
                prefill_end)
        # A new request with a hit. vLLM's count skips the hit's first blocks as out of the
        # window, which here are the sinks; and a held hit costs a fresh block (its copy).
        required = cdiv(num_tokens, self.block_size)
        if apply_admission_cap and self.max_admission_blocks_per_request is not None:
            required = min(required, self.max_admission_blocks_per_request)
        skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        fresh = max(required - max(skipped, len(new_computed_blocks)), 0)
        # Each non-null hit takes one block from the free count: out of the free queue when
        # nobody holds it, else a fresh block for its copy; a shared pinned block takes none.
        shared = self._shared_hits(request_id, new_computed_blocks)
        return fresh + sum(not b.is_null for b in new_computed_blocks) - len(shared)

    def _shared_hits(self, request_id: str, hits) -> set[int]:
        """Indices of the hits this request shares rather than copies: held blocks inside its
        pinned prefix that every holder holds inside its own (none for the engine's shape)."""
        shape = self.shape(request_id)
        if shape.writes_shadows:
            return set()
        return {i for i, b in enumerate(hits[:front_blocks(shape, self.block_size)])
                if not b.is_null and b.ref_cnt
                and b.ref_cnt == len(self.pin_holders.get(b.block_id, ()))}

    def add_local_computed_blocks(self, request_id, new_computed_blocks,
                                  num_local_computed_tokens, num_external_computed_tokens):
        req_blocks = self.req_to_blocks[request_id]
        assert not req_blocks and not num_external_computed_tokens
        shared = self._shared_hits(request_id, new_computed_blocks)
        held = [i for i, b in enumerate(new_computed_blocks)
                if not b.is_null and b.ref_cnt and i not in shared]
        # Touch first: the copies' get_new_blocks below must not evict the adopted hits.
        self.block_pool.touch([b for b in new_computed_blocks if not b.is_null])
        req_blocks.extend(new_computed_blocks)
        for i in held:
            copy = self.block_pool.get_new_blocks(1)[0]
            # vLLM's copy-on-write: the hit keeps its touch until the copy has run.
            self._apply_cow(request_id, i, req_blocks[i], copy)
            if self._record_new_block_ids:
                self.new_block_ids.append(copy.block_id)
        self.adopt_copies_total += len(held)
        self.num_cached_block[request_id] = len(req_blocks)
        self._note_pins(request_id)

    def _note_pins(self, request_id: str) -> None:
        """Record the request as a holder of the blocks of its pinned prefix it holds now."""
        shape = self.shape(request_id)
        if shape.writes_shadows:
            return
        for block in self._front_blocks_held(request_id, shape):
            if not block.is_null:
                self.pin_holders.setdefault(block.block_id, set()).add(request_id)

    def _front_blocks_held(self, request_id: str, shape: StreamShape) -> list:
        return self.req_to_blocks.get(request_id, [])[:front_blocks(shape, self.block_size)]

    def _drop_pins(self, request_id: str) -> None:
        shape = self.shapes.pop(request_id, None)
        if shape is None:
            return
        for block in self._front_blocks_held(request_id, shape):
            holders = self.pin_holders.get(block.block_id)
            if holders is not None:
                holders.discard(request_id)
                if not holders:
                    del self.pin_holders[block.block_id]

    # -- hashing ----------------------------------------------------------------------------
    def cache_blocks(self, request, num_tokens, retention_interval=None, *,
                     replay_boundaries=()):
        """Called by allocate_slots once a step is allocated: num_tokens is where the step ends.
        Hashes only what earlier steps processed; remembers the step for the shadow pass."""
        request_id = request.request_id
        self._requests[request_id] = request
        self._scheduled[request_id] = num_tokens
        self._hash_processed(request, num_tokens)
        if request_id in self.shapes:
            self._note_pins(request_id)

    def _hash_processed(self, request, num_tokens: int) -> None:
        request_id = request.request_id
        cached = self.num_cached_block.setdefault(request_id, 0)
        processed = request.num_computed_tokens - request.num_in_flight_tokens
        full = min(num_tokens, processed) // self.block_size
        if full <= cached:
            return
        B = self.block_size
        mask = None
        if request_id in self._shadowed:  # never hash a block a shadow may have reached
            lo, hi = self._shadowed[request_id]
            mask = [not (i * B <= hi and (i + 1) * B > lo) for i in range(cached, full)]
        self.block_pool.cache_full_blocks(
            request=request, blocks=self.req_to_blocks[request_id], num_cached_blocks=cached,
            num_full_blocks=full, block_size=B, kv_cache_group_id=self.kv_cache_group_id,
            block_mask=mask)
        self.num_cached_block[request_id] = full

    # -- shadows ----------------------------------------------------------------------------
    def take_pending_cow_copies(self):
        """The end of a scheduling pass (vLLM drains the copies once per schedule())."""
        self._protect_from_shadows()
        return super().take_pending_cow_copies()

    def _protect_from_shadows(self) -> None:
        B = self.block_size
        for request_id, end in self._scheduled.items():
            request = self._requests.get(request_id)
            blocks = self.req_to_blocks.get(request_id)
            if request is None or not blocks:
                continue
            # On absolute positions; the worker's, on row positions, is the same span
            # (tests/test_stream_rule.py).
            span = shadow_span(self.shape(request_id), request.num_computed_tokens,
                               end - request.num_computed_tokens)
            if span is None:
                continue
            lo, hi = span
            old_lo, old_hi = self._shadowed.get(request_id, (lo, hi))
            self._shadowed[request_id] = (min(lo, old_lo), max(hi, old_hi))
            for i in range(lo // B, min(hi // B + 1, len(blocks))):
                block = blocks[i]
                if block.is_null or block.block_hash is None:
                    continue
                if self.block_pool.get_num_free_blocks() > 0:
                    clean = self.block_pool.get_new_blocks(1)[0]
                    self.block_pool.move_block_hashes(block, clean)
                    # Both ends stay retained until the copy has run: the block by this extra
                    # ref, the copy by get_new_blocks' (nobody else holds it); the scheduler
                    # frees both refs right after this pass.
                    block.ref_cnt += 1
                    self._pending_cow_copies.append((block, clean))
                    self.shadow_copies_total += 1
                else:
                    self.block_pool._maybe_evict_cached_block(block)
                    self.unhashed_total += 1
        self._scheduled.clear()

    # -- end of a request -------------------------------------------------------------------
    def pop_blocks_for_free(self, request_id: str):
        # Finish, abort and preemption: the last step's blocks are processed now.
        request = self._requests.pop(request_id, None)
        if request is not None and self.req_to_blocks.get(request_id):
            self._hash_processed(request, request.num_computed_tokens)
        self._scheduled.pop(request_id, None)
        self._shadowed.pop(request_id, None)
        self._drop_pins(request_id)
        return super().pop_blocks_for_free(request_id)


def check_target() -> None:
    """Raise PatchTargetMoved unless the vLLM internals this module relies on are the ones it
    was written against (private helpers and the order of calls in allocate_slots/schedule)."""
    def need(obj, name, params):
        target = getattr(obj, name, None)
        if target is None or list(inspect.signature(target).parameters)[:len(params)] != params:
            raise PatchTargetMoved(f"{obj.__name__}.{name}({', '.join(params)}) changed")
        return inspect.getsource(target)

    def contains(source, needles, where):
        for needle in needles:
            if needle not in source:
                raise PatchTargetMoved(f"{where} no longer contains {needle!r}")

    # The hit search runs on the manager instance (it reads the looked-up request's shape).
    contains(need(UnitaryKVCacheCoordinator, "find_longest_cache_hit",
                  ["self", "block_hashes", "max_cache_hit_length"]),
             ["self.single_type_managers[0].find_longest_cache_hit("],
             "UnitaryKVCacheCoordinator.find_longest_cache_hit")
    need(BlockPool, "move_block_hashes", ["self", "src_block", "dst_block"])
    need(BlockPool, "_maybe_evict_cached_block", ["self", "block"])
    contains(need(SingleTypeKVCacheManager, "_apply_cow",
                  ["self", "request_id", "block_idx", "source_block", "cow_block"]),
             ["self._pending_cow_copies.append((source_block, cow_block))"], "_apply_cow")
    contains(need(SingleTypeKVCacheManager, "take_pending_cow_copies", ["self"]),
             ["self._pending_cow_copies = []"], "take_pending_cow_copies")
    # Hashing happens in allocate_slots after the allocation, with the step's end.
    contains(need(KVCacheManager, "allocate_slots", ["self", "request", "num_new_tokens"]),
             ["self.coordinator.allocate_new_computed_blocks(",
              "self.coordinator.cache_blocks(request, num_tokens_to_cache)"], "allocate_slots")
    # The copies are taken once per pass, after every allocation and before the computed
    # counts advance (the shadow pass reads num_computed_tokens as the step's start).
    source = need(Scheduler, "schedule", ["self"])
    contains(source, ["self.kv_cache_manager.take_kv_cache_block_copies()",
                      "self._update_after_schedule(scheduler_output)"], "Scheduler.schedule")
    if source.index("take_kv_cache_block_copies()") > \
            source.index("self._update_after_schedule(scheduler_output)"):
        raise PatchTargetMoved("Scheduler.schedule takes the block copies after advancing "
                               "num_computed_tokens")
