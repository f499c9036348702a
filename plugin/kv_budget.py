"""The KV pool a streaming engine needs, when its user gives no budget.

A stream's KV is bounded by its sinks and window, not by its length, so the pool an engine can
ever use follows from its configuration:

    blocks = max_num_seqs x per-stream bound            (every stream decoding past C)
           + cdiv(max_num_batched_tokens, B) + 1        (the step's prefill chunk: only the few
                                                         streams prefilling at once hold more
                                                         than the decode bound)
           + prefix_cache_headroom x the above           (cached blocks of finished requests,
                                                         when prefix caching is on)
           + 1                                           (vLLM's null block)
    bytes  = blocks x layers x 2 (K, V) x B x KV heads x head size x dtype size

with the per-stream bound of stream_rule.max_blocks_per_stream (sinks, the S+W-1 retained
tokens, one decode token, one block of alignment; or a stream pinning max_pinned_tokens where
that is larger: pinned blocks, W-1 retained tokens). vLLM's default max_num_seqs (256 for
vllm.LLM on CPU) can make that larger than the machine: the pool is then capped at
MAX_SHARE_OF_AVAILABLE of the memory vLLM counts as available (the figure its CPU worker
checks), and the start-up line says how many streams it holds at full window; the scheduler
queues the rest. Stock vLLM's CPU default takes 92% of the node's memory; this takes at most
half of what is available.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info
from vllm.utils.math_utils import cdiv

from streamsink.config import StreamsinkConfig
from streamsink.errors import StreamsinkConfigError
from streamsink.stream_rule import max_blocks_per_stream

MAX_SHARE_OF_AVAILABLE = 0.5
GIB = 1 << 30


@dataclass(frozen=True)
class KVBudget:
    blocks: int               # blocks in the pool, vLLM's null block included
    block_bytes: int          # one block of every layer
    stream_blocks: int        # the per-stream bound (decoding past C)
    chunk_blocks: int         # the step's prefill chunk
    headroom: float           # prefix-cache share (0 when prefix caching is off)
    max_num_seqs: int
    streams: int              # streams the pool holds at full window
    available: int            # bytes vLLM counts as available on the engine's memory node
    capped: bool              # True when the machine, not max_num_seqs, set the size

    @property
    def bytes(self) -> int:
        return self.blocks * self.block_bytes

    def describe(self) -> str:
        size = (f"KV pool {self.bytes / GIB:.2f} GiB ({self.blocks} blocks of "
                f"{self.block_bytes / 2**20:.1f} MiB)")
        parts = (f"{self.stream_blocks} blocks a stream, {self.chunk_blocks} for prefill chunks"
                 + (f", {self.headroom:.0%} prefix-cache headroom" if self.headroom else ""))
        if self.capped:
            return (f"{size}: {parts}; capped at {MAX_SHARE_OF_AVAILABLE:.0%} of the "
                    f"{self.available / GIB:.1f} GiB available, it holds {self.streams} of "
                    f"max_num_seqs={self.max_num_seqs} streams at full window (the scheduler "
                    f"queues the rest; set --kv-cache-memory-bytes or --max-num-seqs to choose)")
        return (f"{size}: {parts}; holds max_num_seqs={self.max_num_seqs} streams at full "
                f"window")


def block_bytes(vllm_config) -> int:
    """Bytes of one KV block across every layer of the model."""
    model_config = vllm_config.model_config
    parallel_config = vllm_config.parallel_config
    dtype = model_config.dtype
    return (model_config.get_num_layers(parallel_config) * 2 * vllm_config.cache_config.block_size
            * model_config.get_num_kv_heads(parallel_config) * model_config.get_head_size()
            * dtype.itemsize)


def available_memory() -> int:
    """What vLLM's CPU worker counts as available on the memory node it will use."""
    try:
        node = get_allowed_cpu_list()[0].numa_node
        return get_memory_node_info(node).available_memory
    except Exception:  # no NUMA information: the first node (vLLM falls back likewise)
        return get_memory_node_info(0).available_memory


def size_kv_pool(vllm_config, cfg: StreamsinkConfig, available: int | None = None) -> KVBudget:
    """The pool of a streaming engine given no budget (see the module's formula)."""
    scheduler = vllm_config.scheduler_config
    B = vllm_config.cache_config.block_size
    stream = max_blocks_per_stream(cfg.sink_tokens, cfg.window_tokens, cfg.max_pinned_tokens, B,
                                   1)
    chunk = cdiv(scheduler.max_num_batched_tokens, B) + 1
    headroom = cfg.prefix_cache_headroom if vllm_config.cache_config.enable_prefix_caching else 0.0
    per_block = block_bytes(vllm_config)
    available = available_memory() if available is None else available

    def pool(streams: int) -> int:
        base = streams * stream + chunk
        return base + int(round(base * headroom)) + 1

    seqs = scheduler.max_num_seqs
    blocks, streams = pool(seqs), seqs
    limit = int(available * MAX_SHARE_OF_AVAILABLE) // per_block
    if blocks > limit:
        streams = max(s for s in range(seqs + 1) if s == 0 or pool(s) <= limit)
        if streams == 0:
            need = pool(1) * per_block
            raise StreamsinkConfigError(
                f"streamsink needs {need / GIB:.2f} GiB of KV cache for one stream "
                f"(sink_tokens={cfg.sink_tokens}, window_tokens={cfg.window_tokens}, "
                f"max_num_batched_tokens={scheduler.max_num_batched_tokens}) but "
                f"{available / GIB:.2f} GiB is available; lower window_tokens or "
                "max_num_batched_tokens, or set --kv-cache-memory-bytes")
        blocks = pool(streams)
    return KVBudget(blocks=blocks, block_bytes=per_block, stream_blocks=stream,
                    chunk_blocks=chunk, headroom=headroom, max_num_seqs=seqs,
                    streams=streams, available=available, capped=streams < seqs)
