"""Every patch is applied, guarded to the pinned vLLM, and fails loudly if its target moves."""
import inspect

import pytest
import vllm

import streamsink
from streamsink import patches


@pytest.fixture(autouse=True, scope="module")
def registered():
    streamsink.register()


def test_pinned_version_guard(monkeypatch):
    patches.check_version()
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(patches.PatchTargetMoved, match="0.32.0"):
        patches.check_version()


def test_rotary_embedding_patch_target():
    from vllm.model_executor.layers import rotary_embedding as rope_pkg

    from streamsink.patches import rotary_embedding

    for owner in rotary_embedding._TABLE_METHODS:   # each class's own table method is wrapped
        assert owner.__dict__["_compute_cos_sin_cache"] is not rotary_embedding._originals[owner]
    assert rope_pkg.Phi3LongRoPEScaledRotaryEmbedding.__init__ is rotary_embedding._longrope_init
    assert isinstance(rope_pkg._ROPE_DICT, rotary_embedding._RopeCacheByEngine)
    rotary_embedding.check_target()


def streaming_vllm_config(hf_config, max_model_len: int):
    """A VllmConfig that reads as a streaming engine being built (only what the RoPE patch
    reads: max_model_len and the model's config)."""
    from vllm.config import VllmConfig

    class FakeModelConfig:
        pass

    model_config = FakeModelConfig()
    model_config.max_model_len, model_config.hf_text_config = max_model_len, hf_config
    streaming = VllmConfig(additional_config={"streamsink": {}})
    object.__setattr__(streaming, "model_config", model_config)
    return streaming


def test_rotary_table_is_float64_and_row_wide_for_streaming_engines_only():
    """Built inside a streaming engine's config, the table covers max_model_len rows from
    float64 angles; outside one (stock) it is vLLM's own; get_rope never mixes the two."""
    import torch
    from transformers import LlamaConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from streamsink.rope import RopeSpec

    llama = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64)
    with set_current_vllm_config(VllmConfig()):
        stock = get_rope(64, 4096, dtype=torch.float32)
    with set_current_vllm_config(streaming_vllm_config(llama, 6000)):
        ours = get_rope(64, 4096, dtype=torch.float32)
    assert ours is not stock
    assert stock.cos_sin_cache.shape[0] == 4096 and ours.cos_sin_cache.shape[0] == 6000
    want = RopeSpec(64, 64, 10000.0).cos_sin(torch.arange(6000), torch.float32)
    assert torch.equal(ours.cos_sin_cache, want)
    # vLLM's fp32 angles differ from float64 ones at large positions: the tables are distinct.
    assert not torch.equal(stock.cos_sin_cache, want[:4096])
    with set_current_vllm_config(VllmConfig()):
        assert get_rope(64, 4096, dtype=torch.float32) is stock


def test_rotary_table_refuses_a_module_its_config_does_not_describe():
    """A streaming table is built from the model's config: a rotary module of another shape
    (here: GPT-J pairing where the config says halves) stops the engine rather than get a
    table that is not its own."""
    import torch
    from transformers import LlamaConfig
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    llama = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64)
    with set_current_vllm_config(streaming_vllm_config(llama, 512)), \
            pytest.raises(RuntimeError, match="does not describe"):
        get_rope(64, 1024, is_neox_style=False, dtype=torch.float32)


def test_rotary_embedding_patch_refuses_a_moved_target(monkeypatch):
    from streamsink.patches import rotary_embedding

    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved):
        rotary_embedding.check_target()


def test_default_chunk_patch_target(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from streamsink.patches import default_chunk

    assert EngineArgs._set_default_max_num_seqs_and_batched_tokens_args is \
        default_chunk._set_defaults
    default_chunk.check_target()
    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved):
        default_chunk.check_target()


def test_hf_gpt_neox_rope_patch_target():
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    from streamsink.patches import hf_gpt_neox_rope

    assert hf.GPTNeoXRotaryEmbedding.forward is hf_gpt_neox_rope._forward
    assert hf.GPTNeoXRotaryEmbedding.__init__ is hf_gpt_neox_rope._init
    original = inspect.signature(hf_gpt_neox_rope._original_forward)
    assert list(original.parameters) == ["self", "x", "position_ids"]


def test_engine_config_patch_target():
    from vllm.platforms.cpu import CpuPlatform

    from streamsink.patches import engine_config

    assert CpuPlatform.check_and_update_config.__func__.__qualname__.endswith(
        "apply.<locals>.check_and_update_config")
    assert list(inspect.signature(engine_config._original).parameters) == ["cls", "vllm_config"]


def test_kv_spec_registered_alongside_builtins():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from streamsink.kv_policy import StreamingSinkManager, StreamingSinkSpec

    spec = StreamingSinkSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=None,
                             sliding_window=60, sink_tokens=4)
    assert KVCacheSpecRegistry.get_manager_class(spec) is StreamingSinkManager
    full = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=None)
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager


def test_attention_backend_override():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from streamsink.attention import StreamsinkAttentionBackend

    assert AttentionBackendEnum.CPU_ATTN.get_class() is StreamsinkAttentionBackend
    assert StreamsinkAttentionBackend.get_name() == "CPU_ATTN"


LENGTH_PATCHES = ["worker_batch_rows", "scheduler_length_cap", "input_length", "renderer_length",
                  "openai_prompt_length", "kv_request_shapes", "openai_request_options", "llm_chat_options",
                  "openai_max_tokens"]


@pytest.mark.parametrize("name", LENGTH_PATCHES)
def test_length_patch_targets_are_where_expected(name):
    import importlib

    importlib.import_module(f"streamsink.patches.{name}").check_target()


@pytest.mark.parametrize("name", LENGTH_PATCHES[:-1])
def test_length_patch_refuses_a_moved_target(name, monkeypatch):
    """Each guard reads vLLM's source for the lines it relies on: if they change, it refuses."""
    import importlib

    module = importlib.import_module(f"streamsink.patches.{name}")
    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved):
        module.check_target()


def test_length_patches_are_installed():
    from vllm.renderers.base import BaseRenderer
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from streamsink.patches import (
        input_length,
        renderer_length,
        scheduler_length_cap,
        worker_batch_rows,
    )

    assert InputBatch.add_request is worker_batch_rows._add_request
    assert GPUModelRunner._update_states is worker_batch_rows._update_states
    assert GPUModelRunner._prepare_inputs is worker_batch_rows._prepare_inputs
    assert Scheduler.__init__.__module__ == scheduler_length_cap.__name__
    assert InputProcessor._validate_prompt_len is input_length._validate_prompt_len
    assert InputProcessor.process_inputs is input_length._process_inputs
    from vllm.entrypoints.openai.completion import serving
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from streamsink.patches import openai_max_tokens, openai_prompt_length

    assert serving.get_max_tokens is openai_max_tokens._streaming
    assert CompletionRequest.build_tok_params is not openai_prompt_length._originals[
        CompletionRequest]
    for name in renderer_length.NAMES:
        assert BaseRenderer.__dict__[name] is not renderer_length._originals[name]


def test_max_tokens_patch_refuses_a_moved_target(monkeypatch):
    """The server's max_tokens comes from api_utils.get_max_tokens, imported by name: if a
    serving module stops using it, the guard refuses."""
    from vllm.entrypoints.openai.completion import serving

    from streamsink.patches import openai_max_tokens

    monkeypatch.setattr(serving, "get_max_tokens", lambda *args, **kwargs: 16)
    with pytest.raises(patches.PatchTargetMoved, match="completion.serving"):
        openai_max_tokens.check_target()


def test_prefix_cache_targets(monkeypatch):
    """Streaming prefix caching leans on vLLM's copy-on-write helpers and on the order of
    allocate_slots / schedule; a move refuses loudly."""
    from streamsink import prefix_cache

    prefix_cache.check_target()
    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved):
        prefix_cache.check_target()


def test_worker_rows_need_the_copies_before_added_requests(monkeypatch):
    from streamsink.patches import worker_batch_rows

    worker_batch_rows.check_target()
    real = inspect.getsource

    def swapped(obj):  # add_request first, then the copies
        source = real(obj)
        if "copy_kv_cache_blocks_inplace(" in source:
            source = source.replace("copy_kv_cache_blocks_inplace(", "COPY(").replace(
                "self.input_batch.add_request(request)",
                "self.input_batch.add_request(request)\ncopy_kv_cache_blocks_inplace(")
        return source

    monkeypatch.setattr(inspect, "getsource", swapped)
    with pytest.raises(patches.PatchTargetMoved, match="block copies"):
        worker_batch_rows.check_target()


def test_request_option_patches_are_installed():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from streamsink.patches import kv_request_shapes, openai_request_options

    assert KVCacheManager.get_computed_blocks is kv_request_shapes._get_computed_blocks
    for cls in (ChatCompletionRequest, CompletionRequest):
        assert cls.to_sampling_params.__wrapped__ is openai_request_options._originals[cls]


def test_request_options_reach_the_sampling_params():
    """A body's streamsink field goes to extra_args; pin "system" carries the system messages."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from streamsink.errors import StreamsinkConfigError

    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hi"}],
            "streamsink": {"pin": "system", "window_tokens": 64}}
    params = ChatCompletionRequest(**body).to_sampling_params(16, {})
    assert params.extra_args["streamsink"] == {
        "pin": "system", "window_tokens": 64,
        "_system_messages": [{"role": "system", "content": "Be brief."}]}
    plain = ChatCompletionRequest(**{**body, "streamsink": None})
    assert not (plain.to_sampling_params(16, {}).extra_args or {}).get("streamsink")
    with pytest.raises(StreamsinkConfigError, match="pin must be"):
        ChatCompletionRequest(**{**body, "streamsink": {"pin": "user"}}).to_sampling_params(
            16, {})
