"""Patch: per-request streaming options in the OpenAI server's request bodies.

Why: a request asks for its own pinned prefix or window with ``{"streamsink": {...}}`` in its
body (request_options.py). vLLM's request models keep unknown fields (pydantic extra="allow") but
pass to the engine only ``vllm_xargs``, whose values must be strings or numbers (no object), and
"pin the system prompt" needs the request's messages, which the engine never sees.
How: ChatCompletionRequest.to_sampling_params and CompletionRequest.to_sampling_params are
wrapped: a ``streamsink`` field is checked (a malformed one is a ValueError, which vLLM answers
with HTTP 400) and copied into the SamplingParams' extra_args under the same key; for a chat
asking ``"pin": "system"`` the leading system messages go along, so that the InputProcessor
(patches/input_length.py) can count their tokens in the rendered prompt. Requests without the
field take the original path unchanged.
Delete when: vLLM forwards structured per-request plugin data (a JSON object in vllm_xargs, or a
plugin hook on request conversion) and tells a plugin which prompt tokens a message produced.
"""
from __future__ import annotations

import functools
import inspect

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from streamsink.config import CONFIG_KEY
from streamsink.errors import PatchTargetMoved
from streamsink.request_options import (
    PIN,
    SYSTEM_MESSAGES,
    check_options,
    leading_system_messages,
)

_originals: dict[type, object] = {}


def _with_options(cls):
    original = _originals[cls]

    @functools.wraps(original)
    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        raw = (self.model_extra or {}).get(CONFIG_KEY)
        if raw is None:
            return params
        options = check_options(raw)
        if options.get(PIN) == "system":
            options[SYSTEM_MESSAGES] = leading_system_messages(getattr(self, "messages", None))
        params.extra_args = {**(params.extra_args or {}), CONFIG_KEY: options}
        return params
    return to_sampling_params


def check_target() -> None:
    for cls in (ChatCompletionRequest, CompletionRequest):
        target = _originals.get(cls) or cls.__dict__.get("to_sampling_params")
        if target is None or list(inspect.signature(target).parameters)[:1] != ["self"]:
            raise PatchTargetMoved(f"{cls.__name__}.to_sampling_params changed")
        if "extra_args=extra_args" not in inspect.getsource(target):
            raise PatchTargetMoved(f"{cls.__name__}.to_sampling_params no longer sets "
                                   "SamplingParams.extra_args")
        if cls.model_config.get("extra") != "allow":
            raise PatchTargetMoved(f"{cls.__name__} no longer keeps unknown fields")


def apply() -> None:
    if _originals:
        return
    check_target()
    for cls in (ChatCompletionRequest, CompletionRequest):
        _originals[cls] = cls.to_sampling_params
        cls.to_sampling_params = _with_options(cls)
