"""Every patch is applied, guarded to the pinned vLLM and Ray, and fails loudly if its target
moves; each is installed one way (patches/_install.py): checked first, once, undoable."""
import functools
import importlib
import inspect
import types

import pytest
import vllm

import streamsink
from streamsink import patches
from streamsink.patches._install import (
    installed,
    original_of,
    replace,
    require,
    undo,
    wrap,
)

# Every vLLM patch register() applies, with the targets it wraps: (owner's module, owner's name
# or None for the module itself, attribute).
VLLM_PATCHES = {
    "rotary_embedding": [
        ("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbeddingBase",
         "_compute_cos_sin_cache"),
        ("vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope",
         "Phi3LongRoPEScaledRotaryEmbedding", "__init__"),
        ("vllm.model_executor.layers.rotary_embedding", None, "_ROPE_DICT")],
    "hf_gpt_neox_rope": [
        ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXRotaryEmbedding", "__init__"),
        ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXRotaryEmbedding", "forward")],
    "engine_config": [("vllm.platforms.cpu", "CpuPlatform", "check_and_update_config")],
    "default_chunk": [("vllm.engine.arg_utils", "EngineArgs",
                       "_set_default_max_num_seqs_and_batched_tokens_args")],
    "input_length": [("vllm.v1.engine.input_processor", "InputProcessor", "_validate_prompt_len"),
                     ("vllm.v1.engine.input_processor", "InputProcessor", "process_inputs")],
    "renderer_length": [("vllm.renderers.base", "BaseRenderer", "default_cmpl_tok_params"),
                        ("vllm.renderers.base", "BaseRenderer", "default_chat_tok_params")],
    "openai_prompt_length": [
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest", "build_tok_params"),
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
         "build_tok_params")],
    "openai_max_tokens": [
        ("vllm.entrypoints.serve.utils.api_utils", None, "get_max_tokens"),
        ("vllm.entrypoints.openai.completion.serving", None, "get_max_tokens"),
        ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
         "_create_completion")],
    "openai_request_options": [
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest",
         "to_sampling_params"),
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest",
         "to_sampling_params")],
    "llm_chat_options": [("vllm.entrypoints.common.offline", "OfflineInferenceMixin",
                          "_add_chat_requests")],
    "output_stream_state": [
        ("vllm.v1.engine.output_processor", "OutputProcessor", "add_request"),
        ("vllm.v1.engine.output_processor", "RequestState", "_new_request_output")],
    "openai_usage": [
        ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
         "chat_completion_full_generator"),
        ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
         "chat_completion_stream_generator"),
        ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
         "request_output_to_completion_response"),
        ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
         "completion_stream_generator")],
    "early_refusal": [("vllm.v1.engine.async_llm", "AsyncLLM", "generate")],
    "scheduler_length_cap": [("vllm.v1.core.sched.scheduler", "Scheduler", "__init__")],
    "kv_cache_spec": [("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "get_kv_cache_spec")],
    "kv_request_shapes": [("vllm.v1.core.kv_cache_manager", "KVCacheManager",
                           "get_computed_blocks")],
    "worker_batch_rows": [("vllm.v1.worker.gpu_input_batch", "InputBatch", "add_request"),
                          ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_update_states"),
                          ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner",
                           "_prepare_inputs")],
}


@pytest.fixture(autouse=True, scope="module")
def registered():
    streamsink.register()


def patch_module(name: str):
    return importlib.import_module(f"streamsink.patches.{name}")


def owner_of(module: str, cls: str | None):
    found = importlib.import_module(module)
    return found if cls is None else getattr(found, cls)


def test_pinned_version_guard(monkeypatch):
    patches.check_version()
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(patches.PatchTargetMoved, match="0.32.0"):
        patches.check_version()


def test_every_patch_module_is_listed_here():
    """VLLM_PATCHES (what register() applies) and the Ray patches are all of patches/."""
    import os

    folder = os.path.dirname(patches.__file__)
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_"}
    assert modules == set(VLLM_PATCHES) | {"ray_agent_ports", "ray_prefix_router",
                                           "ray_serve_api_key"}


@pytest.mark.parametrize("name", VLLM_PATCHES)
def test_patch_target_is_where_expected_and_wrapped(name):
    """Each target is what its patch was written against (checked again after install, on the
    original) and is wrapped once."""
    patch_module(name).check_target()
    for module, cls, attribute in VLLM_PATCHES[name]:
        owner = owner_of(module, cls)
        assert (owner, attribute) in installed()
        assert vars(owner)[attribute] is not original_of(owner, attribute)


@pytest.mark.parametrize("name", [n for n in VLLM_PATCHES if n != "engine_config"])
def test_patch_refuses_a_moved_source(name, monkeypatch):
    """Each guard reads vLLM's source for the lines it relies on: if they change, it refuses,
    in one line."""
    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved) as refused:
        patch_module(name).check_target()
    assert "\n" not in str(refused.value)


def test_engine_config_refuses_a_moved_target(monkeypatch):
    """The platform hook must stay a classmethod(cls, vllm_config)."""
    from vllm.platforms.cpu import CpuPlatform

    from streamsink.patches import engine_config

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", lambda vllm_config: None)
    with pytest.raises(patches.PatchTargetMoved, match="no longer a classmethod"):
        engine_config.check_target()
    monkeypatch.setattr(CpuPlatform, "check_and_update_config",
                        classmethod(lambda cls, config: None))
    with pytest.raises(patches.PatchTargetMoved, match=r"\(cls, vllm_config\) changed"):
        engine_config.check_target()


def test_every_patch_installs_once_and_undoes():
    """A second apply() wraps nothing again; undo puts back exactly what was there; applying
    again afterwards installs the patches anew."""
    targets = installed()
    wrappers = {(owner, name): vars(owner)[name] for owner, name in targets}
    originals = {key: original_of(*key) for key in targets}
    for name in VLLM_PATCHES:
        patch_module(name).apply()
    assert installed() == targets
    assert all(vars(owner)[name] is wrappers[(owner, name)] for owner, name in targets)
    try:
        for owner, name in targets:
            undo(owner, name)
        assert installed() == []
        assert all(original_of(*key) is originals[key] for key in targets)
        from vllm.platforms.cpu import CpuPlatform

        kept = vars(CpuPlatform)["check_and_update_config"]   # a classmethod stays one
        assert isinstance(kept, classmethod) and kept.__func__ is originals[
            (CpuPlatform, "check_and_update_config")]
    finally:
        for name in VLLM_PATCHES:
            patch_module(name).apply()
    assert sorted(map(repr, installed())) == sorted(map(repr, targets))


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
    from streamsink import vllm_internals

    vllm_internals.check_target()
    monkeypatch.setattr(inspect, "getsource", lambda obj: "def moved(): pass\n")
    with pytest.raises(patches.PatchTargetMoved):
        vllm_internals.check_target()


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


def test_ray_patch_targets(monkeypatch):
    """The Ray patches' targets are the ones they were written against (ray 2.60.0)."""
    import ray

    from streamsink.patches import ray_agent_ports, ray_prefix_router, ray_serve_api_key

    ray_agent_ports.check_target()
    ray_serve_api_key.check_target()
    ray_prefix_router.check_target()
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(patches.PatchTargetMoved, match="2.60.0"):
        ray_serve_api_key.check_target()


def test_agent_ports_hold_only_inside_their_block():
    """fixed_agent_ports wraps RayParams.__init__ for its block and undoes it after (no Ray is
    started: RayParams only holds ray.init's parameters)."""
    from ray._private import parameter

    from streamsink.patches.ray_agent_ports import FIELDS, fixed_agent_ports

    stock = vars(parameter.RayParams)["__init__"]
    ports = iter(range(50001, 50001 + len(FIELDS)))
    with fixed_agent_ports(lambda: next(ports)) as given:
        params = parameter.RayParams()
        assert {field: getattr(params, field) for field in FIELDS} == given
    assert vars(parameter.RayParams)["__init__"] is stock
    assert (parameter.RayParams, "__init__") not in installed()


class _TreeHere:
    """A prefix tree in this process, called as its actor (PrefixTreeActor) would be; ray.get
    is the identity in the test below."""

    def __init__(self, tree):
        self.tree = tree

    def __getattr__(self, name):
        if name == "getattr":  # the actor's reader of the tree's attributes
            return types.SimpleNamespace(remote=lambda attribute: getattr(self.tree, attribute))
        return types.SimpleNamespace(remote=getattr(self.tree, name))


def test_prefix_router_forgets_a_replica_lost_with_its_router(monkeypatch):
    """A node goes with an LLM replica and the ingress whose router knew it: the shared prefix
    tree still names the dead replica, with the fewest characters. The ingress started in its
    place knows only the live replica. Ray's router then fails its routing with a KeyError (the
    request would wait forever); ours drops the dead tenant and routes to the live replica.
    No Ray is started: the tree runs here and the replicas are Ray's own test stand-ins."""
    import asyncio

    import ray
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest
    from ray.serve._private.test_utils import FakeRunningReplica
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    from streamsink.patches.ray_prefix_router import LiveReplicaPrefixRouter

    monkeypatch.setattr(ray, "get", lambda value: value)
    dead, live = FakeRunningReplica("dead"), FakeRunningReplica("live")
    live.set_queue_len_response(0)

    async def first_choice(router_class):
        tree = PrefixTree()  # as the lost router left it
        tree.add_tenants([dead.replica_id.to_full_id_str(), live.replica_id.to_full_id_str()],
                         0.0)
        tree.insert("a conversation the live replica served", live.replica_id.to_full_id_str(),
                    0.0)
        router = router_class(deployment_id=DeploymentID(name="LLMServer:m", app_name="app"),
                              handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(tree_actor=_TreeHere(tree))
        router.update_replicas([live])
        request = PendingRequest(args=[types.SimpleNamespace(prompt="Once upon a time")],
                                 kwargs={}, metadata=RequestMetadata(request_id="r",
                                                                     internal_request_id="r"))
        chosen = await router._prefix_match_best_replicas(request, [live])
        tenants = set(tree.tenant_to_char_count)
        # A replica another ingress's router has just added, unknown here yet: no preference
        # (the power-of-two pick) rather than a routing task ended by a KeyError.
        tree.add_tenants([FakeRunningReplica("other").replica_id.to_full_id_str()], 0.0)
        then = await router._prefix_match_best_replicas(request, [live])
        return chosen, tenants, then

    with pytest.raises(KeyError, match="dead"):  # Ray's router as it stands
        asyncio.run(first_choice(PrefixCacheAffinityRouter))
    chosen, tenants, then = asyncio.run(first_choice(LiveReplicaPrefixRouter))
    assert chosen == [[live]]
    assert tenants == {live.replica_id.to_full_id_str()}
    assert then == [[]]


class _LostTree:
    """A tree actor that went with its node: every call fails (with ray.get the identity,
    at the call rather than at ray.get)."""

    def __getattr__(self, name):
        def remote(*args):
            from ray.exceptions import ActorDiedError

            raise ActorDiedError()
        return types.SimpleNamespace(remote=remote)


def test_prefix_router_makes_a_new_tree_when_its_tree_is_lost(monkeypatch):
    """The shared tree's actor goes with a node while the ingress survives. Ray's router then
    fails every call on the tree; ours creates the deployment's named tree again, with its
    settings, gives it the live replicas and routes without prefix preference meanwhile."""
    import asyncio

    import ray
    from ray.exceptions import RayActorError
    from ray.llm._internal.serve.routing_policies.prefix_aware import prefix_aware_router
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest
    from ray.serve._private.test_utils import FakeRunningReplica
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    from streamsink.patches.ray_prefix_router import LiveReplicaPrefixRouter

    made = []  # (actor options, tree) of each tree the router creates

    class TreeActorHere:
        @staticmethod
        def options(**options):
            def remote():
                made.append((options, PrefixTree()))
                return _TreeHere(made[-1][1])
            return types.SimpleNamespace(remote=remote)

    controller = types.SimpleNamespace(_register_shutdown_cleanup_actor=types.SimpleNamespace(
        remote=lambda actor: None))
    monkeypatch.setattr(ray, "get", lambda value: value)
    monkeypatch.setattr(ray, "get_actor", lambda *args, **kwargs: controller)
    monkeypatch.setattr(prefix_aware_router, "PrefixTreeActor", TreeActorHere)
    live = FakeRunningReplica("live")
    live.set_queue_len_response(0)

    async def route_on_a_lost_tree(router_class):
        request = PendingRequest(args=[types.SimpleNamespace(prompt="Once upon a time")],
                                 kwargs={}, metadata=RequestMetadata(request_id="r",
                                                                     internal_request_id="r"))
        router = router_class(deployment_id=DeploymentID(name="LLMServer:m", app_name="app"),
                              handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(tree_actor=_LostTree(), match_rate_threshold=0.5,
                                do_eviction=True, eviction_interval_secs=3600)
        router.update_replicas([live])
        made_by_update = len(made)
        chosen = [await router.choose_replicas([live], request)]
        router.on_request_routed(request, live.replica_id, None)
        router._tree_actor = _LostTree()  # the new tree's node goes too
        chosen.append(await router._prefix_match_best_replicas(request, [live]))
        return router, made_by_update, chosen

    with pytest.raises(RayActorError):  # Ray's router as it stands
        asyncio.run(route_on_a_lost_tree(PrefixCacheAffinityRouter))
    assert not made

    router, made_by_update, chosen = asyncio.run(route_on_a_lost_tree(LiveReplicaPrefixRouter))
    assert made_by_update == 1
    options, tree = made[0]
    assert options["name"] == "LlmPrefixTreeActor" and options["get_if_exists"]
    assert options["namespace"].endswith("::app::LLMServer:m")
    assert router._match_rate_threshold == 0.5  # its settings kept
    assert chosen == [[[live]], [[]]]
    assert tree.tenant_to_char_count[live.replica_id.to_full_id_str()] > 0  # prompt recorded
    assert set(tree.tenant_to_char_count) == {live.replica_id.to_full_id_str()}
    assert len(made) == 2
    assert set(made[1][1].tenant_to_char_count) == {live.replica_id.to_full_id_str()}
    for _, each in made:  # each new tree got the eviction loop the settings ask for
        assert each._eviction_thread is not None
        each.stop_eviction_loop()


# The helper itself, on stand-ins for vLLM's classes and modules.

def _module_function(a, b):
    return a + b


@pytest.fixture
def target():
    """A fresh class and module to patch; whatever a test installed on them is undone."""

    class Target:
        def method(self, x, y=1):
            return ("method", x, y)

        @classmethod
        def klass(cls, x):
            return ("klass", cls.__name__, x)

        @staticmethod
        def static(x):
            return ("static", x)

        @functools.cached_property
        def cached(self):
            return ["cached"]

        async def coroutine(self, x):
            return ("coroutine", x)

    module = types.ModuleType("stand_in_module")
    module.function, module.table = _module_function, {"a": 1}
    yield Target, module
    for owner, name in installed():
        if owner in (Target, module):
            undo(owner, name)


def _tagged(original, *args, **kwargs):
    return ("around", original(*args, **kwargs))


async def _tagged_async(original, *args, **kwargs):
    return ("around", await original(*args, **kwargs))


def test_wrap_keeps_each_kind_and_wraps_once(target):
    import asyncio

    cls, module = target
    for _ in range(2):   # the second round installs nothing
        for name in ("method", "klass", "static", "cached"):
            wrap(cls, name, _tagged)
        wrap(cls, "coroutine", _tagged_async)
        wrap(module, "function", _tagged)
    item = cls()
    assert item.method(2) == ("around", ("method", 2, 1))
    assert cls.klass(3) == ("around", ("klass", "Target", 3))
    assert cls.static(4) == item.static(4) == ("around", ("static", 4))
    assert item.cached == ("around", ["cached"]) and item.cached is item.cached
    assert inspect.iscoroutinefunction(cls.coroutine)
    assert asyncio.run(item.coroutine(5)) == ("around", ("coroutine", 5))
    assert module.function(1, 2) == ("around", 3)
    # Introspection sees the original's name and parameters.
    assert cls.method.__name__ == "method"
    assert list(inspect.signature(cls.method).parameters) == ["self", "x", "y"]


def test_undo_puts_back_what_was_there(target):
    cls, module = target
    kept = {name: vars(cls)[name] for name in ("method", "klass", "cached")}
    table = module.table
    for name in kept:
        wrap(cls, name, _tagged)
    replace(module, "table", lambda was: {**was, "b": 2})
    assert module.table == {"a": 1, "b": 2}
    for name in kept:
        undo(cls, name)
        undo(cls, name)   # a second undo changes nothing
    undo(module, "table")
    assert all(vars(cls)[name] is was for name, was in kept.items())
    assert module.table is table
    assert [key for key in installed() if key[0] in (cls, module)] == []
    assert cls().method(1) == ("method", 1, 1)


def test_require_checks_the_original_and_refuses_in_one_line(target):
    cls, _ = target
    needle = 'return ("method", x, y)'
    wrap(cls, "method", _tagged)
    # Once wrapped, the check reads the original.
    assert require(cls, "method", ["self", "x", "y"], exact=True, needles=[needle]) is \
        original_of(cls, "method") is not vars(cls)["method"]
    require(cls, "klass", ["cls", "x"], kind=classmethod)
    refusals = {
        "Target.absent is gone": lambda: require(cls, "absent"),
        "Target.method(self, y) changed": lambda: require(cls, "method", ["self", "y"]),
        "Target.method(self, x) changed": lambda: require(cls, "method", ["self", "x"],
                                                          exact=True),
        "Target.method no longer contains 'a\\nb'": lambda: require(cls, "method",
                                                                     needles=["a\nb"]),
        "Target.method is no longer a classmethod": lambda: require(cls, "method",
                                                                     kind=classmethod),
    }
    for message, check in refusals.items():
        with pytest.raises(patches.PatchTargetMoved) as refused:
            check()
        assert str(refused.value) == message


def test_a_patch_replaced_by_someone_else_is_checked_as_found(target, monkeypatch):
    """If something else replaces an installed wrapper, the guard checks what is there now."""
    cls, _ = target
    wrap(cls, "method", _tagged)
    monkeypatch.setattr(cls, "method", lambda self: None)
    with pytest.raises(patches.PatchTargetMoved, match=r"Target.method\(self, x\) changed"):
        require(cls, "method", ["self", "x"])
