"""Patch: a streaming engine's attention layers get the streaming KV cache spec.

Why: the KV policy (kv_policy.py) is chosen by the layers' KV cache spec. vLLM's hook for a
backend to change its layers' spec, AttentionBackend.customize_spec(spec), is a classmethod that
receives the spec alone: it cannot tell a streaming engine from a stock one in the same process,
nor one engine's S and W from another's.
How: GPUModelRunner.get_kv_cache_spec (the CPU runner inherits it; it builds the spec of every
layer, in the worker, with the engine's VllmConfig at hand as self.vllm_config) is wrapped: for
a streaming engine, each causal full-attention spec becomes a StreamingSinkSpec with that
engine's S and W and the same layout fields. Stock engines return vLLM's specs untouched.
Delete when: customize_spec (or get_kv_cache_spec) is handed the VllmConfig.
"""
from __future__ import annotations

import dataclasses

from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from streamsink.config import streaming_config
from streamsink.errors import PatchTargetMoved
from streamsink.kv_spec import StreamingSinkSpec
from streamsink.patches._install import require, wrap

# Fields StreamingSinkSpec sets itself rather than copying from the stock spec.
_OWN_FIELDS = {"sliding_window", "sink_tokens", "max_pinned_tokens", "extra_retained_tokens"}


def streaming_spec(spec, sink_tokens: int, window_tokens: int, max_pinned_tokens: int = 0):
    """The streaming spec for one layer's stock spec (other kinds of layers keep theirs)."""
    if type(spec) is not FullAttentionSpec or spec.non_causal:
        return spec
    names = {f.name for f in dataclasses.fields(StreamingSinkSpec)} - _OWN_FIELDS
    copied = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if f.name in names}
    return StreamingSinkSpec(**copied, sliding_window=window_tokens, sink_tokens=sink_tokens,
                             max_pinned_tokens=max_pinned_tokens)


def _get_kv_cache_spec(original, self):
    specs = original(self)
    cfg = streaming_config(self.vllm_config)
    if cfg is None:
        return specs
    return {name: streaming_spec(spec, cfg.sink_tokens, cfg.window_tokens, cfg.max_pinned_tokens)
            for name, spec in specs.items()}


def check_target() -> None:
    require(GPUModelRunner, "get_kv_cache_spec", ["self"], exact=True,
            needles=["attn_module.get_kv_cache_spec(self.vllm_config)",
                     "customize_attention_spec(", "return kv_cache_spec"])
    if "non_causal" not in {f.name for f in dataclasses.fields(FullAttentionSpec)}:
        raise PatchTargetMoved("FullAttentionSpec.non_causal is gone")


def apply() -> None:
    check_target()
    wrap(GPUModelRunner, "get_kv_cache_spec", _get_kv_cache_spec)
