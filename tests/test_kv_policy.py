"""The paged KV policy in a real engine: sink blocks pinned, window blocks freed, pool intact."""
import gc
import math

import pytest
from conftest import random_tokens, tiny_engine

SINK, WINDOW, CHUNK = 4, 300, 512
MAX_MODEL_LEN = 2048  # the streams below run far past it


def kv_internals(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return scheduler, manager, scheduler.kv_cache_manager.block_pool


def block_bound(sink, window, step_tokens, block_size):
    """ceil(S/B) + ceil((W + Q)/B) + 1: the tighter textbook bound, which equals the built one
    (docs/architecture.md §2) unless S - 1 extra tokens cross a block boundary."""
    return math.ceil(sink / block_size) + math.ceil((window + step_tokens) / block_size) + 1


@pytest.fixture(scope="module")
def engine(tiny_llama):
    llm = tiny_engine(tiny_llama, {"sink_tokens": SINK, "window_tokens": WINDOW},
                      max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=CHUNK)
    yield llm
    del llm
    gc.collect()


def test_spec_and_manager_are_streamsink(engine):
    from streamsink.kv_policy import StreamingSinkManager, StreamingSinkSpec

    _, manager, _ = kv_internals(engine)
    assert isinstance(manager, StreamingSinkManager)
    assert isinstance(manager.kv_cache_spec, StreamingSinkSpec)
    assert manager.kv_cache_spec.sink_tokens == SINK
    assert manager.kv_cache_spec.sliding_window == WINDOW


def test_long_stream_stays_within_block_bound(engine):
    """A 20,000-token prompt through chunked prefill, then decode, ten times max_model_len: the
    blocks the stream holds stay within the bound at every step, its sink block is never freed,
    and the metrics published for /metrics follow the manager."""
    from vllm import SamplingParams

    from streamsink import metrics

    _, manager, pool = kv_internals(engine)
    free_before = pool.get_num_free_blocks()
    manager.publish(force=True)
    totals_before = metrics.read_totals()
    bound = block_bound(SINK, WINDOW, CHUNK, manager.block_size)
    engine.llm_engine.add_request("long", {"prompt_token_ids": random_tokens(20_000)},
                                  SamplingParams(max_tokens=300, ignore_eos=True,
                                                 detokenize=False))
    held, steps = [], 0
    while engine.llm_engine.has_unfinished_requests():
        engine.llm_engine.step()
        steps += 1
        for req_id, blocks in manager.req_to_blocks.items():  # vLLM may suffix request ids
            held.append(manager.held_blocks(req_id))
            assert held[-1] == sum(1 for b in blocks if not b.is_null)
            assert not blocks[0].is_null, "sink block freed"
            if len(blocks) > bound:  # longer than the bound: the middle must have been freed
                assert any(b.is_null for b in blocks[1:-2])
        if steps == 20:
            manager.publish(force=True)
            assert metrics.read_totals()["held_blocks"] == manager.held_blocks_all() > 0
            assert metrics.read_totals()["streams"] == 1
    assert steps > 300  # ~40 prefill chunks + 300 decode steps
    assert max(held) <= bound, (max(held), bound)
    # Without eviction a 20,300-token stream would hold ~159 blocks.
    assert len(held) > 300 and held[-1] <= block_bound(SINK, WINDOW, 1, manager.block_size)
    assert pool.get_num_free_blocks() == free_before
    totals = metrics.read_totals()
    freed = totals["freed_blocks"] - totals_before["freed_blocks"]
    # Everything but the last retained run and the sink block was freed by the policy.
    assert freed >= (20_300 // manager.block_size) - bound
    assert totals["evicted_tokens"] - totals_before["evicted_tokens"] == \
        freed * manager.block_size
    assert totals["held_blocks"] == totals["streams"] == 0


def test_pool_restored_after_finish_and_abort(engine):
    from vllm import SamplingParams

    _, manager, pool = kv_internals(engine)
    free_before = pool.get_num_free_blocks()
    llm = engine.llm_engine
    params = SamplingParams(max_tokens=200, ignore_eos=True, detokenize=False)
    for i in range(6):
        llm.add_request(f"s{i}", {"prompt_token_ids": random_tokens(900 + 250 * i, seed=i)},
                        params)
    for step in range(40):
        llm.step()
        if step == 5:
            llm.abort_request(["s1", "s4"])
        if step == 20:
            llm.abort_request(["s2"])
    while llm.has_unfinished_requests():
        llm.step()
    assert not manager.req_to_blocks
    assert pool.get_num_free_blocks() == free_before


PAGE = 2 * 2 * 2 * 128 * 64 * 4  # tiny Llama: layers x (K,V) x kv heads x block x head_dim x fp32


@pytest.fixture(scope="module")
def small_pool(tiny_llama):
    """A pool of 12 blocks: room for three or four streams past C, not for eight."""
    llm = tiny_engine(tiny_llama, {"sink_tokens": SINK, "window_tokens": 100},
                      max_model_len=1024, max_num_batched_tokens=256,
                      kv_cache_memory_bytes=12 * PAGE)
    scheduler, manager, pool = kv_internals(llm)
    preemptions = []
    original = scheduler._preempt_request

    def spy(request, *args, **kwargs):
        preemptions.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = spy
    yield llm, scheduler, manager, pool, preemptions
    del llm
    gc.collect()


def run_streams(llm, tag: str, prompt_tokens: int, new_tokens: int, count: int = 8) -> set:
    """`count` streams at once; returns the ids that finished with all their tokens."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    for i in range(count):
        llm.llm_engine.add_request(f"{tag}{i}",
                                   {"prompt_token_ids": random_tokens(prompt_tokens, seed=i)},
                                   params)
    finished = set()
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                assert len(out.outputs[0].token_ids) == new_tokens
                finished.add(out.request_id)
    return finished


def test_admission_leaves_room_for_streams_past_c(small_pool, monkeypatch):
    """A stream past C frees its oldest window block a step or more before it takes a new one.
    Admitting waiting streams into that room preempts running ones a moment later (each then
    recomputes its window: seconds-long steps under load, benchmarks/many_streams.py). With the
    reservation, eight streams through a pool for three run without a single preemption; the
    same load with the reservation switched off does preempt (so the load exercises it)."""
    llm, _, manager, pool, preemptions = small_pool
    free_before = pool.get_num_free_blocks()
    with monkeypatch.context() as off:
        off.setattr(manager, "reserved_for_running", lambda: 0)
        assert run_streams(llm, "off", 300, 600) == {f"off{i}" for i in range(8)}
    assert preemptions, "the load did not preempt even without the reservation"
    preemptions.clear()
    assert run_streams(llm, "on", 300, 600) == {f"on{i}" for i in range(8)}
    assert preemptions == []
    assert pool.get_num_free_blocks() == free_before


def test_pool_restored_after_preemption(small_pool):
    """Streams that start short (no reservation: they grow as in stock vLLM) outgrow the pool
    and are preempted; a preempted stream is recomputed from its start, past max_model_len, and
    every block comes back."""
    from vllm.v1.core.sched.scheduler import Scheduler

    llm, scheduler, manager, pool, preemptions = small_pool
    free_before = pool.get_num_free_blocks()
    preemptions.clear()
    assert run_streams(llm, "p", 40, 800) == {f"p{i}" for i in range(8)}
    assert preemptions, "pool was large enough: no preemption exercised"
    assert not manager.req_to_blocks
    assert pool.get_num_free_blocks() == free_before
    assert isinstance(scheduler, Scheduler)
