"""Patch: the streaming KV manager learns each request's shape before its cache lookup.

Why: a request may pin a prefix of its own instead of the S sinks, and keep a narrower window
(request_options.py); which blocks a cache hit must include, and which held blocks may be shared
instead of copied, depend on that shape. vLLM hands its single-type managers a request id, or
(for the hit search) only the request's block hashes.
How: KVCacheManager.get_computed_blocks(request), where the scheduler looks up every new or
resumed request before admitting it, is wrapped to pass the request to each streaming manager
(kv_policy.StreamingSinkManager.note_lookup) first. Stock managers are left alone.
Delete when: vLLM passes the Request (or per-request KV hints) to the single-type managers'
find_longest_cache_hit and allocation calls.
"""
from __future__ import annotations

from vllm.v1.core.kv_cache_manager import KVCacheManager

from streamsink.patches._install import require, wrap


def _get_computed_blocks(original, self, request):
    for manager in self.coordinator.single_type_managers:
        note = getattr(manager, "note_lookup", None)
        if note is not None:
            note(request)
    return original(self, request)


def check_target() -> None:
    # It must search hits through its coordinator, whose managers note_lookup has told.
    require(KVCacheManager, "get_computed_blocks", ["self", "request"], exact=True,
            needles=["self.coordinator.find_longest_cache_hit("])


def apply() -> None:
    check_target()
    wrap(KVCacheManager, "get_computed_blocks", _get_computed_blocks)
