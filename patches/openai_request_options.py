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

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from streamsink.config import CONFIG_KEY
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import require, wrap
from streamsink.request_options import (
    PIN,
    SYSTEM_MESSAGES,
    check_options,
    leading_system_messages,
)


def _to_sampling_params(original, self, *args, **kwargs):
    params = original(self, *args, **kwargs)
    raw = (self.model_extra or {}).get(CONFIG_KEY)
    if raw is None:
        return params
    options = check_options(raw)
    if options.get(PIN) == "system":
        options[SYSTEM_MESSAGES] = leading_system_messages(getattr(self, "messages", None))
    params.extra_args = {**(params.extra_args or {}), CONFIG_KEY: options}
    return params


def check_target() -> None:
    for cls in (ChatCompletionRequest, CompletionRequest):
        # It must set SamplingParams.extra_args, which the wrapper extends.
        require(cls, "to_sampling_params", ["self"], needles=["extra_args=extra_args"])
        if cls.model_config.get("extra") != "allow":
            raise PatchTargetMoved(f"{cls.__name__} no longer keeps unknown fields")


def apply() -> None:
    check_target()
    for cls in (ChatCompletionRequest, CompletionRequest):
        wrap(cls, "to_sampling_params", _to_sampling_params)
