"""Prefix caching for streaming requests, exact (the scheduler side; the worker side is in
row_window.py): which cached blocks a hit may reuse and which blocks may be hashed. The KV policy
(kv_policy.py, what a stream keeps and frees) holds one StreamingPrefixCache and calls it from
vLLM's calls.

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

from vllm.v1.core.kv_cache_utils import resolve_block_hashes

from streamsink.stream_rule import StreamShape, cache_hit_window, front_blocks, shadow_span
from streamsink.vllm_internals import apply_cow, evict_cached_block, queue_block_copy


@functools.lru_cache(maxsize=8)
def hit_spec(spec):
    """The spec vLLM's sliding-window search should see: the engine's cache_hit_window (C), so
    that a hit carries the C-1 tokens a streaming request keeps before its next query (and the
    W_r-1 of a request with a shape of its own, W_r <= W)."""
    return dataclasses.replace(spec, sliding_window=cache_hit_window(spec.engine_shape))


class StreamingPrefixCache:
    """The prefix cache of one streaming KV manager (kv_policy.StreamingSinkManager).

    It keeps no blocks of its own: it works on the manager's vLLM bookkeeping (each request's
    block table, its count of hashed blocks, the block pool, vLLM's copy-on-write) and asks the
    manager one thing, a request's shape (manager.shape). The manager calls it from vLLM's calls:
    find_longest_cache_hit (hit_spec, with_front_blocks), get_num_blocks_to_allocate (hit_cost),
    add_local_computed_blocks (adopt), allocate_new_blocks (note_pins), cache_blocks
    (step_allocated), take_pending_cow_copies (protect_from_shadows) and pop_blocks_for_free
    (release)."""

    def __init__(self, manager) -> None:
        self._manager = manager
        self.block_size = manager.block_size
        self.block_pool = manager.block_pool
        # Totals over the manager's life, for metrics (blocks).
        self.shadow_copies_total = 0   # cached blocks copied before a shadow reached them
        self.adopt_copies_total = 0    # hits copied because a running request held them
        self.unhashed_total = 0        # cached blocks dropped from the cache instead
        # block id -> requests holding it inside their pinned prefix (shapes without shadows).
        self.pin_holders: dict[int, set[str]] = {}
        self._requests: dict = {}                  # req_id -> Request (hashing at free)
        self._scheduled: dict[str, int] = {}       # this pass: req_id -> tokens after the step
        # req_id -> (lowest, highest) token position a shadow of this request was written to.
        self._shadowed: dict[str, tuple[int, int]] = {}

    # -- hits -------------------------------------------------------------------------------
    def with_front_blocks(self, shape: StreamShape, blocks, length: int, block_hashes,
                          block_pool, kv_cache_spec, kv_cache_group_ids):
        """A hit of vLLM's search (hit_spec) for a request of `shape`, completed with the front
        blocks (sinks or pinned tokens) it skipped, looked up by their own hashes: (blocks,
        length), or no hit when one of them is not cached."""
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

    def hit_cost(self, request_id: str, hits) -> int:
        """Blocks a new request's hits take from the free count. Each non-null hit takes one:
        out of the free queue when nobody holds it, else a fresh block for its copy; a shared
        pinned block takes none."""
        shared = self._shared_hits(request_id, hits)
        return sum(not b.is_null for b in hits) - len(shared)

    def _shared_hits(self, request_id: str, hits) -> set[int]:
        """Indices of the hits this request shares rather than copies: held blocks inside its
        pinned prefix that every holder holds inside its own (none for the engine's shape)."""
        shape = self._manager.shape(request_id)
        if shape.writes_shadows:
            return set()
        return {i for i, b in enumerate(hits[:front_blocks(shape, self.block_size)])
                if not b.is_null and b.ref_cnt
                and b.ref_cnt == len(self.pin_holders.get(b.block_id, ()))}

    def adopt(self, request_id: str, hits, num_external_computed_tokens: int) -> None:
        """A new request takes its hits as its first blocks (vLLM's add_local_computed_blocks,
        whole): the hits nobody holds, and the pinned blocks it shares, as they are; a copy of
        each other held hit."""
        manager = self._manager
        req_blocks = manager.req_to_blocks[request_id]
        assert not req_blocks and not num_external_computed_tokens
        shared = self._shared_hits(request_id, hits)
        held = [i for i, b in enumerate(hits) if not b.is_null and b.ref_cnt and i not in shared]
        # Touch first: the copies' get_new_blocks below must not evict the adopted hits.
        self.block_pool.touch([b for b in hits if not b.is_null])
        req_blocks.extend(hits)
        for i in held:
            copy = self.block_pool.get_new_blocks(1)[0]
            # vLLM's copy-on-write: the hit keeps its touch until the copy has run.
            apply_cow(manager, request_id, i, req_blocks[i], copy)
            if manager.records_new_block_ids:
                manager.new_block_ids.append(copy.block_id)
        self.adopt_copies_total += len(held)
        manager.num_cached_block[request_id] = len(req_blocks)
        self.note_pins(request_id)

    # -- pinned blocks ----------------------------------------------------------------------
    def note_pins(self, request_id: str) -> None:
        """Record the request as a holder of the blocks of its pinned prefix it holds now."""
        shape = self._manager.shape(request_id)
        if shape.writes_shadows:
            return
        for block in self._front_blocks_held(request_id, shape):
            if not block.is_null:
                self.pin_holders.setdefault(block.block_id, set()).add(request_id)

    def _front_blocks_held(self, request_id: str, shape: StreamShape) -> list:
        return self._manager.req_to_blocks.get(request_id, [])[:front_blocks(shape,
                                                                            self.block_size)]

    def _drop_pins(self, request_id: str) -> None:
        shape = self._manager.shape(request_id)
        if shape.writes_shadows:
            return
        for block in self._front_blocks_held(request_id, shape):
            holders = self.pin_holders.get(block.block_id)
            if holders is not None:
                holders.discard(request_id)
                if not holders:
                    del self.pin_holders[block.block_id]

    # -- hashing ----------------------------------------------------------------------------
    def step_allocated(self, request, num_tokens: int) -> None:
        """vLLM's cache_blocks, called by allocate_slots once a step is allocated: num_tokens is
        where the step ends. Hashes only what earlier steps processed; remembers the step for
        the shadow pass."""
        request_id = request.request_id
        self._requests[request_id] = request
        self._scheduled[request_id] = num_tokens
        self._hash_processed(request, num_tokens)
        self.note_pins(request_id)

    def _hash_processed(self, request, num_tokens: int) -> None:
        manager = self._manager
        request_id = request.request_id
        cached = manager.num_cached_block.setdefault(request_id, 0)
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
            request=request, blocks=manager.req_to_blocks[request_id],
            num_cached_blocks=cached, num_full_blocks=full, block_size=B,
            kv_cache_group_id=manager.kv_cache_group_id, block_mask=mask)
        manager.num_cached_block[request_id] = full

    # -- shadows ----------------------------------------------------------------------------
    def protect_from_shadows(self) -> None:
        """The end of a scheduling pass, before vLLM takes its block copies: every hashed block
        a shadow of this pass's steps will reach gets its hashes moved to a clean copy (or, with
        no block free for one, dropped from the cache)."""
        B = self.block_size
        manager = self._manager
        for request_id, end in self._scheduled.items():
            request = self._requests.get(request_id)
            blocks = manager.req_to_blocks.get(request_id)
            if request is None or not blocks:
                continue
            # On absolute positions; the worker's, on row positions, is the same span
            # (tests/test_stream_rule.py).
            span = shadow_span(manager.shape(request_id), request.num_computed_tokens,
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
                    queue_block_copy(manager, block, clean)
                    self.shadow_copies_total += 1
                else:
                    evict_cached_block(self.block_pool, block)
                    self.unhashed_total += 1
        self._scheduled.clear()

    # -- end of a request -------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Finish, abort and preemption, before the manager lets go of the request's blocks and
        shape: the last step's blocks are processed now, so they are hashed; its pins go."""
        request = self._requests.pop(request_id, None)
        if request is not None and self._manager.req_to_blocks.get(request_id):
            self._hash_processed(request, request.num_computed_tokens)
        self._scheduled.pop(request_id, None)
        self._shadowed.pop(request_id, None)
        self._drop_pins(request_id)
