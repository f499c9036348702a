"""Patch: the OpenAI server's max_tokens for streaming engines.

Why: vLLM's OpenAI server computes each request's max_tokens with
serve.utils.api_utils.get_max_tokens(max_model_len, ...), which raises when the prompt is longer
than max_model_len and caps prompt + output at max_model_len. A streaming engine has no such
limit.
How: get_max_tokens is wrapped (in api_utils and in the serving modules that imported it by name:
completions, chat, batch chat); when this process built a streaming engine's config, it is called
with max_model_len = prompt length + max(max_model_len, requested max_tokens): any prompt
length, the requested max_tokens as asked, and, when none is asked, up to max_model_len new
tokens (the same default as patches/input_length.py).
Delete when: vLLM takes the request length limit from the engine instead of max_model_len.
"""
from __future__ import annotations

import importlib
import inspect

from streamsink.patches import PatchTargetMoved

API_UTILS = "vllm.entrypoints.serve.utils.api_utils"
IMPORTERS = ["vllm.entrypoints.openai.completion.serving",
             "vllm.entrypoints.openai.chat_completion.serving",
             "vllm.entrypoints.openai.chat_completion.batch_serving"]
PARAMS = ["max_model_len", "max_tokens", "input_length", "default_sampling_params"]

_original = None


def check_target() -> None:
    original = _original or importlib.import_module(API_UTILS).get_max_tokens
    if list(inspect.signature(original).parameters)[:4] != PARAMS:
        raise PatchTargetMoved(f"get_max_tokens({', '.join(PARAMS)}, ...) changed")
    for name in IMPORTERS:
        if getattr(importlib.import_module(name), "get_max_tokens", None) not in (original,
                                                                                  _streaming):
            raise PatchTargetMoved(f"{name} no longer uses api_utils.get_max_tokens")


def _streaming(max_model_len, max_tokens, input_length, default_sampling_params, *args,
               **kwargs):
    from streamsink.engine_setup import streaming_engine_built

    if streaming_engine_built():
        max_model_len = input_length + max(max_model_len, max_tokens or 0)
    return _original(max_model_len, max_tokens, input_length, default_sampling_params, *args,
                     **kwargs)


def apply() -> None:
    global _original
    if _original is not None:
        return
    check_target()
    _original = importlib.import_module(API_UTILS).get_max_tokens
    for name in [API_UTILS, *IMPORTERS]:
        importlib.import_module(name).get_max_tokens = _streaming
