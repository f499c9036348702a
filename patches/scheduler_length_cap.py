"""Patch: no max_model_len cap on a streaming engine's requests in vLLM's scheduler.

Why: the scheduler stops a request at max_model_len (check_stop, FINISHED_LENGTH_CAPPED), caps
the tokens it schedules to max_model_len - num_computed_tokens, and KVCacheManager.allocate_slots
caps the slots it allocates at max_model_len. A stream is meant to run past it: its KV is
bounded by the window, not by its length.
How: Scheduler.__init__ is wrapped; for an engine with a streamsink config the scheduler's and
its KV cache manager's max_model_len attributes (read by exactly those caps, after __init__) are
set to an unreachable value. Everything sized by max_model_len was sized in __init__ already; the
worker's rows are handled by patches/worker_batch_rows.py.
Delete when: vLLM lets a KV cache spec declare that its requests are not bounded by
max_model_len (a windowed spec with a "no length cap" flag).
"""
from __future__ import annotations

from vllm.v1.core import kv_cache_manager
from vllm.v1.core.sched import scheduler
from vllm.v1.core.sched.scheduler import Scheduler

from streamsink.config import streaming_config
from streamsink.patches._install import contains, require, wrap

UNBOUNDED = 1 << 62


def _init(original, self, vllm_config, *args, **kwargs):
    original(self, vllm_config, *args, **kwargs)
    if streaming_config(vllm_config) is not None:
        self.max_model_len = UNBOUNDED
        self.kv_cache_manager.max_model_len = UNBOUNDED


def check_target() -> None:
    """Raise PatchTargetMoved unless the caps are where this patch was written to find them."""
    require(Scheduler, "__init__", ["self", "vllm_config"])
    # The caps this patch lifts, as vLLM 0.32.0 writes them.
    contains(scheduler, ["check_stop(request, self.max_model_len)",
                         "self.max_model_len\n                - request.num_computed_tokens",
                         "self.max_model_len = vllm_config.model_config.max_model_len"],
             scheduler.__name__)
    contains(kv_cache_manager, ["num_tokens_main_model + num_lookahead_tokens, self.max_model_len",
                                "self.max_model_len = max_model_len"],
             kv_cache_manager.__name__)


def apply() -> None:
    check_target()
    wrap(Scheduler, "__init__", _init)
