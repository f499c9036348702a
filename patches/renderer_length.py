"""Patch: no max_model_len limit on prompts in vLLM's renderer, for streaming engines.

Why: before the InputProcessor sees a prompt, the renderer (API process) checks its length
against TokenizeParams.max_total_tokens = max_model_len and refuses longer prompts ("This model's
maximum context length is ..."). A streaming engine serves prompts of any length.
How: the renderer's default tokenization parameters (BaseRenderer.default_cmpl_tok_params and
default_chat_tok_params, cached properties used by vllm.LLM) are wrapped to carry
max_total_tokens=None ("no limit", vLLM's own meaning) when the engine has a streamsink config.
Delete when: vLLM derives the renderer's limit from a hook a KV cache spec or plugin can set.
"""
from __future__ import annotations

import dataclasses
from functools import cached_property

from vllm.renderers.base import BaseRenderer
from vllm.renderers.params import TokenizeParams

from streamsink.config import streaming_config
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import require, wrap

NAMES = ("default_cmpl_tok_params", "default_chat_tok_params")


def _unlimited_for_streaming(original, self):
    params = original(self)
    if streaming_config(self.config) is None:
        return params
    return dataclasses.replace(params, max_total_tokens=None)


def check_target() -> None:
    """Raise PatchTargetMoved unless the renderer's limits are where this patch expects them."""
    for name in NAMES:
        require(BaseRenderer, name, kind=cached_property,
                needles=["max_total_tokens=model_config.max_model_len"])
    if "max_total_tokens" not in {f.name for f in dataclasses.fields(TokenizeParams)}:
        raise PatchTargetMoved("TokenizeParams.max_total_tokens is gone")


def apply() -> None:
    check_target()
    for name in NAMES:
        wrap(BaseRenderer, name, _unlimited_for_streaming)
