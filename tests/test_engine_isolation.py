"""Engines in one process keep their own settings: a streaming engine, a stock one and a second
streaming one with other S and W, alive together, each sees only its own configuration (the
config is read through its own VllmConfig; nothing is kept in module globals), and tells its
clients its own stream state (streamsink.stream_state)."""
import gc

import pytest

from conftest import prompt_nlls, random_tokens, tiny_engine


def kv_spec(llm):
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return scheduler.kv_cache_manager.coordinator.single_type_managers[0].kv_cache_spec


def attention_configs(llm):
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    config = llm.llm_engine.vllm_config
    return {layer.impl.streamsink for layer in
            get_layers_from_vllm_config(config, Attention).values()}


@pytest.fixture(scope="module")
def engines(tiny_llama):
    first = tiny_engine(tiny_llama, {"sink_tokens": 4, "window_tokens": 124},
                        kv_cache_memory_bytes=1 << 26)
    prompt = random_tokens(600, seed=3)
    before = prompt_nlls(first, [prompt])[0]
    stock = tiny_engine(tiny_llama, None, kv_cache_memory_bytes=1 << 26)
    second = tiny_engine(tiny_llama, {"sink_tokens": 2, "window_tokens": 60},
                         kv_cache_memory_bytes=1 << 26)
    yield first, stock, second, prompt, before
    # In-process engines share vLLM's distributed state: shut them down now, not whenever the
    # garbage collector meets them during a later module's engine.
    del first, stock, second
    gc.collect()


def test_each_engine_has_its_own_kv_policy(engines):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from streamsink.kv_spec import StreamingSinkSpec

    first, stock, second, _, _ = engines
    a, b, c = kv_spec(first), kv_spec(stock), kv_spec(second)
    assert isinstance(a, StreamingSinkSpec) and (a.sink_tokens, a.sliding_window) == (4, 124)
    assert type(b) is FullAttentionSpec
    assert isinstance(c, StreamingSinkSpec) and (c.sink_tokens, c.sliding_window) == (2, 60)


def test_each_engine_has_its_own_attention_config(engines):
    first, stock, second, _, _ = engines
    (a,), (b,), (c,) = attention_configs(first), attention_configs(stock), \
        attention_configs(second)
    assert (a.sink_tokens, a.window_tokens) == (4, 124)
    assert b is None
    assert (c.sink_tokens, c.window_tokens) == (2, 60)


def test_outputs_do_not_change_when_other_engines_are_built(engines):
    """The first engine computes exactly what it computed alone; the stock engine is dense
    (its NLLs differ from the streaming ones once the prompt outgrows C = 128)."""
    first, stock, second, prompt, before = engines
    assert prompt_nlls(first, [prompt])[0] == before
    dense = prompt_nlls(stock, [prompt])[0]
    narrow = prompt_nlls(second, [prompt])[0]
    assert max(abs(x - y) for x, y in zip(dense[:100], before[:100])) < 1e-3
    assert max(abs(x - y) for x, y in zip(dense[200:], before[200:])) > 1e-2
    assert max(abs(x - y) for x, y in zip(narrow[100:], before[100:])) > 1e-2


def test_request_options_are_refused_by_a_stock_engine(engines):
    """Per-request streaming options on the stock engine: one-line refusal; the streaming
    engines beside it take them."""
    from vllm import SamplingParams

    first, stock, _, prompt, _ = engines
    params = SamplingParams(max_tokens=2, detokenize=False,
                            extra_args={"streamsink": {"window_tokens": 8}})
    with pytest.raises(ValueError, match="need a streaming engine") as caught:
        stock.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert "\n" not in str(caught.value)
    (out,) = first.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2


def test_each_engine_tells_its_own_stream_state(engines):
    """streamsink.stream_state of each engine's output reads that engine's S and W (the
    stock engine's outputs carry none)."""
    from vllm import SamplingParams

    import streamsink

    first, stock, second, prompt, _ = engines
    params = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)
    length = len(prompt) + 8
    for llm, state in ((first, {"evicted_tokens": length - 128, "sink_tokens": 4,
                                "pinned_tokens": 0, "window_tokens": 124,
                                "prompt_outgrew_cache": True}),
                       (stock, None),
                       (second, {"evicted_tokens": length - 62, "sink_tokens": 2,
                                 "pinned_tokens": 0, "window_tokens": 60,
                                 "prompt_outgrew_cache": True})):
        (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 8
        assert streamsink.stream_state(out) == state
