"""A streaming engine given no KV budget sizes its pool from what it can ever hold
(plugin/kv_budget.py), so vLLM's CPU free-memory check (92% of the node free by default) has
nothing to refuse; a stock engine is untouched."""
import gc
from types import SimpleNamespace

import pytest
import torch

from streamsink.config import StreamsinkConfig
from streamsink.errors import StreamsinkConfigError
from streamsink.kv_budget import GIB, size_kv_pool

MIB = 1 << 20


def fake_config(layers=30, kv_heads=3, head=64, dtype=torch.float32, block=128, seqs=64,
                chunk=2048, caching=True):
    """What size_kv_pool reads of a VllmConfig (the default model's shape by default)."""
    model = SimpleNamespace(dtype=dtype, get_num_layers=lambda p: layers,
                            get_num_kv_heads=lambda p: kv_heads, get_head_size=lambda: head)
    return SimpleNamespace(
        model_config=model, parallel_config=None,
        cache_config=SimpleNamespace(block_size=block, enable_prefix_caching=caching),
        scheduler_config=SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=chunk))


def test_formula_for_the_default_model():
    """4+1020 at block 128: a stream holds 1 sink block + cdiv(1023 + 1, 128) + 1 = 10 blocks;
    64 streams, a 2048-token chunk (16 + 1 blocks), 25% headroom, vLLM's null block."""
    budget = size_kv_pool(fake_config(), StreamsinkConfig(), available=100 * GIB)
    block = 30 * 2 * 128 * 3 * 64 * 4
    assert budget.block_bytes == block == 5.625 * MIB
    assert budget.stream_blocks == 10
    assert budget.chunk_blocks == 17
    base = 64 * 10 + 17
    assert budget.blocks == base + round(base * 0.25) + 1 == 822
    assert budget.bytes == 822 * block
    assert not budget.capped and budget.streams == 64
    assert "holds max_num_seqs=64 streams at full window" in budget.describe()
    off = size_kv_pool(fake_config(caching=False), StreamsinkConfig(), available=100 * GIB)
    assert off.blocks == base + 1
    # The window, not the stream's length, sets it: a wider window, a bigger pool.
    wide = size_kv_pool(fake_config(), StreamsinkConfig(window_tokens=4092), available=100 * GIB)
    assert wide.stream_blocks == 1 + 32 + 1 and wide.blocks > budget.blocks


def test_capped_by_the_machine_and_said_so():
    budget = size_kv_pool(fake_config(seqs=256), StreamsinkConfig(), available=4 * GIB)
    assert budget.capped and 0 < budget.streams < 256
    assert budget.bytes <= 2 * GIB < size_kv_pool(
        fake_config(seqs=budget.streams + 1), StreamsinkConfig(), available=100 * GIB).bytes
    assert f"holds {budget.streams} of max_num_seqs=256 streams" in budget.describe()


def test_refused_when_not_even_one_stream_fits():
    with pytest.raises(StreamsinkConfigError, match=r"needs 0\.\d+ GiB .* for one stream") as e:
        size_kv_pool(fake_config(), StreamsinkConfig(), available=64 * MIB)
    assert "\n" not in str(e.value) and "--kv-cache-memory-bytes" in str(e.value)


def test_engine_without_budget_starts_where_the_free_memory_check_fails(tiny_llama,
                                                                          monkeypatch):
    """Simulate a node whose memory is half taken by page cache: vLLM's check wants 92% free
    and refuses a stock engine; the streaming engine sizes its pool and starts, and the pool
    is the formula's."""
    from vllm import LLM, SamplingParams
    from vllm.utils.cpu_resource_utils import MemoryNodeInfo
    from vllm.v1.worker import cpu_worker

    from streamsink import kv_budget

    real = cpu_worker.get_memory_node_info(0)
    half = MemoryNodeInfo(total_memory=real.total_memory,
                          available_memory=real.total_memory // 2)
    monkeypatch.setattr(cpu_worker, "get_memory_node_info", lambda node=0: half)
    monkeypatch.setattr(kv_budget, "get_memory_node_info", lambda node=0: half)
    common = dict(model=tiny_llama, skip_tokenizer_init=True, dtype="float32",
                  enforce_eager=True, max_model_len=4096, max_num_seqs=8,
                  max_num_batched_tokens=512)
    with pytest.raises(Exception, match="less than desired CPU memory utilization"):
        LLM(**common)
    gc.collect()  # the failed engine's clean-up, before the next engine shares vLLM's state
    llm = LLM(**common, additional_config={"streamsink": {"sink_tokens": 4,
                                                          "window_tokens": 508}})
    config = llm.llm_engine.vllm_config
    expected = size_kv_pool(config, StreamsinkConfig(window_tokens=508),
                            available=half.available_memory)
    assert config.cache_config.kv_cache_memory_bytes == expected.bytes
    assert config.cache_config.num_gpu_blocks == expected.blocks
    assert expected.streams == 8 and not expected.capped
    from conftest import random_tokens

    out = llm.generate([{"prompt_token_ids": random_tokens(900)}],
                       SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    del llm
    gc.collect()
