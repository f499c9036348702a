"""The private members of vLLM that the KV policy and its prefix cache use, in one place.

Patches (patches/) replace vLLM code; this module changes nothing. It names each private member
the plugin reads or calls, says why, reaches it only through the functions below, and checks at
registration (check_target, from kv_policy.register_kv_policy) that each one, and each order of
calls relied on, is the one it was written against; otherwise PatchTargetMoved, one line.

Private members:
- SingleTypeKVCacheManager._apply_cow(request_id, block_idx, source_block, cow_block): vLLM's
  copy-on-write of a prefix hit. It puts the copy in the request's block table in place of the
  hit and queues the copy for the worker, keeping both ends retained until the copy has run. A
  request adopting a hit that a running request holds takes a copy this way (apply_cow;
  prefix_cache.py, rule 3: shadows and rebases change a block in place).
- SingleTypeKVCacheManager._pending_cow_copies: the block copies the worker runs before the
  step's forward (drained by the public take_pending_cow_copies). A hashed block about to get
  sink shadows has its hashes moved to a clean copy queued here (queue_block_copy; rule 1)
  while the request keeps writing into its own block, which _apply_cow would swap out.
- BlockPool._maybe_evict_cached_block(block): takes a block's hashes out of the cache. When no
  block is free for that clean copy, the block leaves the cache instead (evict_cached_block).
- vllm.v1.attention.backends.cpu_attn._get_attn_isa(dtype, block_size, head_size,
  kv_cache_dtype): the KV cache layout vLLM's CPU backend will pick. The attention path reads
  the "vec" layout only, so engine_setup refuses any other before the engine starts
  (attention_isa).
- vllm._custom_ops: vLLM's bindings of its C++ kernels, a private module by name that vLLM's
  own CPU backend imports the same way. The attention backend calls the kernels it shares with
  that backend through it (custom_ops: cpu_attn_get_scheduler_metadata,
  cpu_attn_reshape_and_cache, rotary_embedding).

Orders of calls relied on:
- UnitaryKVCacheCoordinator.find_longest_cache_hit calls find_longest_cache_hit on the manager
  instance, though vLLM declares it a classmethod: the streaming manager's search reads the
  shape of the request being looked up.
- KVCacheManager.allocate_slots hashes (cache_blocks) after the step's allocation, with the
  step's end: blocks are hashed only once processed.
- Scheduler.schedule takes the block copies once per pass, after every allocation and before
  num_computed_tokens advance: the shadow pass reads them as each step's start.
"""
from __future__ import annotations

import inspect

from vllm import _custom_ops as custom_ops  # noqa: F401  (re-exported: attention.py)
from vllm.v1.attention.backends import cpu_attn
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_coordinator import UnitaryKVCacheCoordinator
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

from streamsink.errors import PatchTargetMoved


def apply_cow(manager, request_id: str, index: int, hit, copy) -> None:
    """The request's block `index` becomes `copy` of `hit`, run on the worker before its next
    forward (vLLM's copy-on-write)."""
    manager._apply_cow(request_id, index, hit, copy)


def queue_block_copy(manager, source, destination) -> None:
    """Copy `source` into `destination` on the worker before the next forward; the request
    keeps `source`."""
    manager._pending_cow_copies.append((source, destination))


def evict_cached_block(block_pool, block) -> None:
    """Take a block's hashes out of the prefix cache (its contents stay the request's)."""
    block_pool._maybe_evict_cached_block(block)


def attention_isa(dtype, block_size: int, head_size: int, kv_cache_dtype) -> str:
    """The KV cache layout ("vec", "amx", ...) vLLM's CPU attention picks for these."""
    return cpu_attn._get_attn_isa(dtype, block_size, head_size, kv_cache_dtype)


def check_target() -> None:
    """Raise PatchTargetMoved unless the vLLM internals named above are the ones this module was
    written against (the private members and the orders of calls)."""
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
    need(cpu_attn, "_get_attn_isa", ["dtype", "block_size", "head_size", "kv_cache_dtype"])
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
