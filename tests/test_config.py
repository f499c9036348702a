"""streamsink configuration: parsing, and refusal at engine start-up with a one-line reason."""
import pytest

from streamsink.config import StreamsinkConfig, StreamsinkConfigError, parse_config


def test_defaults():
    assert parse_config({}) == StreamsinkConfig(4, 1020)
    assert parse_config({}).cache_tokens == 1024
    assert parse_config({"sink_tokens": 0, "window_tokens": 1}) == StreamsinkConfig(0, 1)


@pytest.mark.parametrize("raw,message", [
    ({"sink_tokens": -1}, "sink_tokens must be >= 0"),
    ({"window_tokens": 0}, "window_tokens must be >= 1"),
    ({"window_tokens": 2.5}, "must be an integer"),
    ({"sink_tokens": "4"}, "must be an integer"),
    ({"sink_tokens": True}, "must be an integer"),
    ({"window": 100}, "unknown streamsink option"),
    ([4, 1020], "must be a JSON object"),
])
def test_invalid_values_are_refused(raw, message):
    with pytest.raises(StreamsinkConfigError, match=message) as err:
        parse_config(raw)
    assert "\n" not in str(err.value)


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    max_model_len = kwargs.pop("max_model_len_override", 4096)
    return EngineArgs(model=model, skip_tokenizer_init=True, dtype="float32",
                      max_model_len=max_model_len, **kwargs).create_engine_config()


@pytest.mark.parametrize("streamsink,message", [
    ({"sink_tokens": -4}, "sink_tokens must be >= 0"),
    ({"windows": 10}, "unknown streamsink option"),
])
def test_engine_refuses_bad_config(tiny_llama, streamsink, message):
    with pytest.raises(Exception, match=message):
        engine_config(tiny_llama, additional_config={"streamsink": streamsink})


def test_engine_refuses_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=1, n_head=2, vocab_size=256)).save_pretrained(
        tmp_path)
    with pytest.raises(Exception, match="streamsink does not support GPT2LMHeadModel"):
        engine_config(str(tmp_path), additional_config={"streamsink": {}},
                      max_model_len_override=1024)


def test_engine_refuses_model_with_own_sliding_window(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    MistralForCausalLM(MistralConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                     vocab_size=256, sliding_window=512)).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="own sliding window"):
        engine_config(str(tmp_path), additional_config={"streamsink": {}})


def test_engine_refuses_quantized_kv_cache(tiny_llama):
    with pytest.raises(Exception, match="unquantized KV cache"):
        engine_config(tiny_llama, additional_config={"streamsink": {}}, kv_cache_dtype="fp8")


def test_engine_refuses_rows_too_narrow_for_one_step(tiny_llama):
    """Streams run past max_model_len, but one step (sinks, window, chunk) must fit a row."""
    with pytest.raises(Exception, match="needs max_model_len >= 1536") as err:
        engine_config(tiny_llama, additional_config={"streamsink": {"window_tokens": 1020}},
                      max_num_batched_tokens=256, max_model_len_override=1024)
    assert "streamsink needs" in str(err.value)


def test_streaming_engine_settings(tiny_llama):
    from vllm.config import CompilationMode

    config = engine_config(tiny_llama, additional_config={"streamsink": {}})
    # Prefix caching stays on (streaming-exact, plugin/prefix_cache.py); the user may turn it off.
    assert config.cache_config.enable_prefix_caching is True
    assert config.scheduler_config.async_scheduling is False
    off = engine_config(tiny_llama, additional_config={"streamsink": {}},
                        enable_prefix_caching=False)
    assert off.cache_config.enable_prefix_caching is False
    # Compiled like stock (vLLM's default CPU mode), not forced eager.
    assert config.compilation_config.mode != CompilationMode.NONE
    assert config.model_config.enforce_eager is False


def test_unset_step_size_is_fitted_to_the_row(tiny_llama):
    """vLLM's default step does not fit max_model_len 2048 with 4+1020: an unset
    max_num_batched_tokens becomes the largest step that fits, instead of a refusal."""
    from streamsink.stream_rule import min_row_tokens

    config = engine_config(tiny_llama, additional_config={"streamsink": {}},
                           max_model_len_override=2048)
    step = config.scheduler_config.max_num_batched_tokens
    assert step == 2048 - min_row_tokens(4, 1020, 0, 128, 0) == 768
    assert config.scheduler_config.max_num_seqs <= step
    stock = engine_config(tiny_llama, max_model_len_override=2048)
    assert stock.scheduler_config.max_num_batched_tokens > step  # stock keeps vLLM's default


def test_engine_without_streamsink_is_stock(tiny_llama):
    config = engine_config(tiny_llama)
    assert config.cache_config.enable_prefix_caching is True
    assert config.model_config.enforce_eager is False
