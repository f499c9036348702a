"""Patch: the OpenAI server's max_tokens for streaming engines.

Why: vLLM's OpenAI server computes each request's max_tokens with
serve.utils.api_utils.get_max_tokens(max_model_len, ...), which raises when the prompt is longer
than max_model_len and caps prompt + output at max_model_len. A streaming engine has no such
limit. get_max_tokens is handed numbers only, not the engine it serves.
How: the serving methods that call it (completions, chat, batch chat) are wrapped to note, for
the length of the request, the model config of the engine they serve (a context variable: per
request, per engine); get_max_tokens (in api_utils and in those modules, which imported it by
name) is wrapped: for a streaming engine it is called with max_model_len = prompt length +
max(max_model_len, requested max_tokens): any prompt length, the requested max_tokens as asked,
and, when none is asked, up to max_model_len new tokens (the same default as
patches/input_length.py). Stock engines take the original path.
Delete when: vLLM takes the request length limit from the engine instead of max_model_len.
"""
from __future__ import annotations

import contextvars
import importlib
import inspect

from streamsink.config import streaming_model_config
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import original_of, require, wrap

API_UTILS = "vllm.entrypoints.serve.utils.api_utils"
# (module, class, method that calls get_max_tokens with self.model_config.max_model_len)
CALLERS = [("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
            "_create_completion"),
           ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
            "_create_chat_completion"),
           ("vllm.entrypoints.openai.chat_completion.batch_serving", "OpenAIServingChatBatch",
            "create_batch_chat_completion")]
PARAMS = ["max_model_len", "max_tokens", "input_length", "default_sampling_params"]

_serving_model_config = contextvars.ContextVar("streamsink_serving_model_config", default=None)


def check_target() -> None:
    get_max_tokens = require(importlib.import_module(API_UTILS), "get_max_tokens", PARAMS)
    for module, cls, method in CALLERS:
        serving = importlib.import_module(module)
        if original_of(serving, "get_max_tokens") is not get_max_tokens:
            raise PatchTargetMoved(f"{module} no longer uses api_utils.get_max_tokens")
        target = require(require(serving, cls), method,
                         needles=["max_model_len = self.model_config.max_model_len"])
        if not inspect.iscoroutinefunction(target):
            raise PatchTargetMoved(f"{cls}.{method} is no longer a coroutine function")


def _get_max_tokens(original, max_model_len, max_tokens, input_length, default_sampling_params,
                    *args, **kwargs):
    if streaming_model_config(_serving_model_config.get()) is not None:
        max_model_len = input_length + max(max_model_len, max_tokens or 0)
    return original(max_model_len, max_tokens, input_length, default_sampling_params, *args,
                    **kwargs)


async def _noting_model_config(original, self, *args, **kwargs):
    token = _serving_model_config.set(self.model_config)
    try:
        return await original(self, *args, **kwargs)
    finally:
        _serving_model_config.reset(token)


def apply() -> None:
    check_target()
    wrap(importlib.import_module(API_UTILS), "get_max_tokens", _get_max_tokens)
    for module, cls, method in CALLERS:
        serving = importlib.import_module(module)
        wrap(serving, "get_max_tokens", _get_max_tokens)
        wrap(getattr(serving, cls), method, _noting_model_config)
