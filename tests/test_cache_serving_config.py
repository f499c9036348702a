"""How the servers are configured for streaming prefix caching, checked without starting them
(no engine, no Ray): cached-token usage in responses, and prefix-aware routing across Ray
replicas so that a conversation's next turn reaches the replica holding its blocks."""


def test_serve_reports_cached_tokens():
    from streamsink.serving.serve import server_argv

    argv = server_argv(None, 4, 1020, [])
    assert argv.count("--enable-prompt-tokens-details") == 1
    assert "--no-enable-prefix-caching" not in argv        # caching stays vLLM's default (on)
    mine = server_argv(None, 4, 1020, ["--enable-prompt-tokens-details"])
    assert mine.count("--enable-prompt-tokens-details") == 1


def test_ray_replicas_route_by_prefix_and_report_cached_tokens():
    import dataclasses

    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    from streamsink.serving.ray_config import RaySpec

    spec = RaySpec("m", "/nonexistent/model", {"dtype": "float32"}, replicas=2)
    config = spec.llm_config()
    router = config.deployment_config["request_router_config"]
    assert router["request_router_class"] == \
        "streamsink.patches.ray_prefix_router.LiveReplicaPrefixRouter"  # Ray's, patched
    assert router["request_router_kwargs"]["imbalanced_threshold"] < float("inf")
    # Ray hands frontend arguments to vLLM's OpenAI layer, the rest to the engine.
    assert config.engine_kwargs["enable_prompt_tokens_details"] is True
    assert "enable_prompt_tokens_details" in {f.name for f in dataclasses.fields(FrontendArgs)}
    assert "enable_prompt_tokens_details" not in spec.engine_kwargs  # never given to the engine
    single = RaySpec("m", "/nonexistent/model", {}, replicas=1).llm_config()
    assert "request_router_config" not in single.deployment_config


def test_router_config_is_valid_for_ray_serve():
    """Ray Serve's own validation of the router config (pydantic; starts nothing)."""
    import ray
    from ray.serve.config import RequestRouterConfig

    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    from streamsink.serving.ray_config import prefix_router_config

    config = RequestRouterConfig(**prefix_router_config())
    router = config.get_request_router_class()
    assert router.__name__ == "LiveReplicaPrefixRouter"
    assert issubclass(router, PrefixCacheAffinityRouter)
    assert config.request_router_kwargs["do_eviction"] is True
    assert not ray.is_initialized()
