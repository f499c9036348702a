"""Patch: the RoPE table of a streaming engine covers its rows, from float64 angles.

Why: a streaming engine feeds the model *row positions* (row_window.py), which stay below
max_model_len however long a stream runs, so vLLM's own rotary module, its table and a graph
compiled once serve every step. Three things differ from stock: max_model_len may exceed the
rows of vLLM's table (a dense window wider than the model's context); streamsink re-rotates
cached keys and sink shadows with float64 angles (rope.py), so the table should agree with them
to the last bit rather than carry fp32 angle error (~3e-4 rad at position 4096); and LongRoPE
must keep its short factors for every row position (vLLM picks the long ones for the whole
engine when max_model_len exceeds original_max_position_embeddings, while a stream's in-cache
length, which is what the factors follow, stays within it: engine_setup.py refuses otherwise).
How: the methods that build the table (called once, when the layer is built) are wrapped: for an
engine with a streamsink config they return max(vLLM's rows, max_model_len) rows of the model's
RoPE (streamsink.rope.RopeSpec of the engine's model config: the variant's frequencies and
attention factor) from float64 angles. vLLM's scaled variants override the table method
(linear, dynamic NTK, YaRN; llama3 only changes the frequencies, which the base method reads), so
each class's own method is wrapped; Phi-3's LongRoPE module is not a RotaryEmbedding, and its
constructor is wrapped instead. The spec must describe the module being built (rotated features,
pairing), else the engine refuses to start. get_rope caches instances by their parameters only,
so its cache (_ROPE_DICT) is keyed also by the streaming engine's row width: a stock engine built
in the same process never gets a streaming table, nor the other way round. Nothing runs per step.
Delete when: vLLM sizes the table by max_model_len and computes it in float64 (or lets a plugin
pick the table), and keys get_rope's cache by it.
"""
from __future__ import annotations

import functools

import torch
from vllm.model_executor.layers import rotary_embedding as rope_pkg
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding, RotaryEmbeddingBase
from vllm.model_executor.layers.rotary_embedding.dynamic_ntk_scaling_rope import (
    DynamicNTKScalingRotaryEmbedding,
)
from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import (
    LinearScalingRotaryEmbedding,
)
from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
    Phi3LongRoPEScaledRotaryEmbedding,
)
from vllm.model_executor.layers.rotary_embedding.yarn_scaling_rope import (
    YaRNScalingRotaryEmbedding,
)

from streamsink.engine_setup import engine_being_built
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import contains, replace, require, wrap
from streamsink.rope import RopeSpec, rope_spec_from_hf_config

# Classes whose own _compute_cos_sin_cache is replaced, and the classes each one builds for.
_TABLE_METHODS = {RotaryEmbeddingBase: (RotaryEmbedding, Llama3RotaryEmbedding),
                  LinearScalingRotaryEmbedding: (LinearScalingRotaryEmbedding,),
                  DynamicNTKScalingRotaryEmbedding: (DynamicNTKScalingRotaryEmbedding,),
                  YaRNScalingRotaryEmbedding: (YaRNScalingRotaryEmbedding,)}


def _streaming_row_width() -> int | None:
    """max_model_len of the streaming engine being built in this process, else None."""
    cfg, vllm_config = engine_being_built()
    return None if cfg is None else vllm_config.model_config.max_model_len


def _streaming_engine():
    """(RopeSpec, max_model_len) of the streaming engine being built in this process, else
    None."""
    cfg, vllm_config = engine_being_built()
    if cfg is None:
        return None
    model_config = vllm_config.model_config
    return rope_spec_from_hf_config(model_config.hf_text_config), model_config.max_model_len


def _spec_for(module, spec: RopeSpec | None) -> RopeSpec:
    """The engine's spec, checked against the module it is to fill."""
    if spec is None or (spec.head_dim, spec.rotary_dim, spec.neox_style) != (
            module.head_size, module.rotary_dim, getattr(module, "is_neox_style", True)):
        raise RuntimeError(
            f"streamsink: the model builds {type(module).__name__}(head_size={module.head_size}, "
            f"rotary_dim={module.rotary_dim}), which its config's RoPE ({spec}) does not "
            f"describe; this model is not supported")
    return spec


def _table(builds_for: tuple[type, ...], original, self) -> torch.Tensor:
    """A streaming engine's table for the classes that use this _compute_cos_sin_cache
    (builds_for); vLLM's own otherwise."""
    engine = _streaming_engine()
    if engine is None:
        return original(self)
    if type(self) not in builds_for:
        raise RuntimeError(f"streamsink: no streaming RoPE table for {type(self).__name__}")
    spec, rows = _spec_for(self, engine[0]), engine[1]
    stock_rows = self.max_position_embeddings
    if isinstance(self, LinearScalingRotaryEmbedding):
        if len(self.scaling_factors) != 1:
            raise RuntimeError("streamsink: one linear RoPE scaling factor per engine")
        self._scaling_factor_to_offset = {float(self.scaling_factors[0]): 0}
        stock_rows = int(self.max_position_embeddings * self.scaling_factors[0])
    elif isinstance(self, YaRNScalingRotaryEmbedding):
        stock_rows = int(self.max_position_embeddings * self.scaling_factor)
    return spec.model_table(torch.arange(max(stock_rows, rows)), torch.float32)


def _longrope_init(original, self, *args, **kwargs) -> None:
    original(self, *args, **kwargs)
    engine = _streaming_engine()
    if engine is None:
        return
    spec, rows = _spec_for(self, engine[0]), engine[1]
    # Short factors at every row position: index the table by position alone.
    self.use_long_rope = False
    rows = max(self.original_max_position_embeddings, rows)
    table = spec.model_table(torch.arange(rows), torch.float32).to(
        self.long_short_cos_sin_cache.dtype)
    self.register_buffer("long_short_cos_sin_cache", table, persistent=False)


class _RopeCacheByEngine(dict):
    """get_rope's instance cache, with the streaming row width (or None) added to each key."""

    @staticmethod
    def _key(key):
        return key, _streaming_row_width()

    def __contains__(self, key):
        return super().__contains__(self._key(key))

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __setitem__(self, key, value):
        super().__setitem__(self._key(key), value)


def _keyed_by_engine(cache: dict) -> _RopeCacheByEngine:
    """get_rope's cache, its entries so far kept as stock ones."""
    keyed = _RopeCacheByEngine()
    keyed.update({(k, None): v for k, v in cache.items()})
    return keyed


def check_target() -> None:
    # The table is built once, by __init__, which sets what the streaming table reads.
    contains(RotaryEmbeddingBase.__init__,
             ["cache = self._compute_cos_sin_cache()",
              *(f"self.{attr} = " for attr in ("head_size", "rotary_dim",
                                               "max_position_embeddings", "is_neox_style"))],
             "RotaryEmbeddingBase.__init__")
    contains(rope_pkg.get_rope, ["if key in _ROPE_DICT:", "_ROPE_DICT[key] = rotary_emb"],
             "get_rope")
    for owner in _TABLE_METHODS:
        require(owner, "_compute_cos_sin_cache", ["self"], exact=True)
    if "_compute_cos_sin_cache" in Llama3RotaryEmbedding.__dict__ or \
            "_compute_inv_freq" not in Llama3RotaryEmbedding.__dict__:
        raise PatchTargetMoved("Llama3RotaryEmbedding no longer only overrides _compute_inv_freq")
    contains(LinearScalingRotaryEmbedding,
             ["self.scaling_factors", "self._scaling_factor_to_offset"],
             "LinearScalingRotaryEmbedding")
    require(Phi3LongRoPEScaledRotaryEmbedding, "__init__",
            needles=["self.use_long_rope = ", '"long_short_cos_sin_cache", long_short_cache'])
    contains(Phi3LongRoPEScaledRotaryEmbedding.forward,
             ["if self.use_long_rope:", "idx = positions"],
             "Phi3LongRoPEScaledRotaryEmbedding.forward")


def apply() -> None:
    check_target()
    for owner, builds_for in _TABLE_METHODS.items():
        wrap(owner, "_compute_cos_sin_cache", functools.partial(_table, builds_for))
    wrap(Phi3LongRoPEScaledRotaryEmbedding, "__init__", _longrope_init)
    replace(rope_pkg, "_ROPE_DICT", _keyed_by_engine)
