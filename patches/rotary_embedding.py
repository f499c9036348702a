"""Patch: the RoPE table of a streaming engine covers its rows, from float64 angles.

Why: a streaming engine feeds the model *row positions* (row_window.py), which stay below
max_model_len however long a stream runs, so vLLM's own RotaryEmbedding, its table and a graph
compiled once serve every step. Two things differ from stock: max_model_len may exceed the model's
max_position_embeddings (a dense window wider than the model's context), and streamsink re-rotates
cached keys and sink shadows with float64 angles, so the table should agree with them to the
last bit rather than carry fp32 angle error (~3e-4 rad at position 4096).
How: RotaryEmbeddingBase._compute_cos_sin_cache (called once, when the layer is built) is wrapped:
for an engine with a streamsink config it returns max(max_position_embeddings, max_model_len)
rows of cos/sin from float64 angles. get_rope caches instances by their parameters only, so its
cache (_ROPE_DICT) is keyed also by the streaming engine's row width: a stock engine built in
the same process never gets a streaming table, nor the other way round. Nothing runs per step.
Delete when: vLLM sizes the table by max_model_len and computes it in float64 (or lets a plugin
pick the table), and keys get_rope's cache by it.
"""
from __future__ import annotations

import inspect

import torch
from vllm.model_executor.layers import rotary_embedding as rope_pkg
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase

from streamsink.engine_setup import engine_being_built
from streamsink.errors import PatchTargetMoved
from streamsink.rope import RopeSpec

_original_compute = None


def _streaming_row_width() -> int | None:
    """max_model_len of the streaming engine being built in this process, else None."""
    cfg, vllm_config = engine_being_built()
    return None if cfg is None else vllm_config.model_config.max_model_len


def _compute_cos_sin_cache(self) -> torch.Tensor:
    rows = _streaming_row_width()
    if rows is None:
        return _original_compute(self)
    spec = RopeSpec(head_dim=self.head_size, rotary_dim=self.rotary_dim, theta=float(self.base))
    positions = torch.arange(max(self.max_position_embeddings, rows))
    return spec.cos_sin(positions, torch.float32)


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


def check_target() -> None:
    compute = _original_compute or RotaryEmbeddingBase.__dict__.get("_compute_cos_sin_cache")
    source = inspect.getsource(rope_pkg.get_rope)
    init = inspect.getsource(RotaryEmbeddingBase.__init__)
    if compute is None or list(inspect.signature(compute).parameters) != ["self"] or \
            "cache = self._compute_cos_sin_cache()" not in init or \
            "if key in _ROPE_DICT:" not in source or "_ROPE_DICT[key] = rotary_emb" not in source:
        raise PatchTargetMoved("RotaryEmbeddingBase._compute_cos_sin_cache(self) / get_rope's "
                               "_ROPE_DICT cache changed")
    for attr in ("head_size", "rotary_dim", "base", "max_position_embeddings"):
        if f"self.{attr} = " not in init:
            raise PatchTargetMoved(f"RotaryEmbeddingBase no longer sets self.{attr}")


def apply() -> None:
    global _original_compute
    if _original_compute is not None:
        return
    check_target()
    _original_compute = RotaryEmbeddingBase._compute_cos_sin_cache
    RotaryEmbeddingBase._compute_cos_sin_cache = _compute_cos_sin_cache
    cache = _RopeCacheByEngine()
    cache.update({(k, None): v for k, v in rope_pkg._ROPE_DICT.items()})
    rope_pkg._ROPE_DICT = cache
