"""Patch: "pin": "system" for vllm.LLM.chat.

Why: a request pinning its system prompt (request_options.py) needs the tokens the chat template
produced for its leading system messages; vLLM renders a conversation into token ids before the
InputProcessor sees the request, and the messages do not travel with it.
How: OfflineInferenceMixin._add_chat_requests (behind LLM.chat and LLM.enqueue_chat) is wrapped: for each
conversation whose SamplingParams ask ``{"streamsink": {"pin": "system"}}``, a copy of its params
carries the leading system messages along (as the OpenAI server's patch does,
patches/openai_request_options.py); the InputProcessor (patches/input_length.py) then counts
their tokens in the rendered prompt. Other calls pass through unchanged.
Delete when: vLLM tells a plugin which prompt tokens each chat message produced.
"""
from __future__ import annotations

from vllm.entrypoints.common.offline import OfflineInferenceMixin
from vllm.sampling_params import SamplingParams

from streamsink.config import CONFIG_KEY
from streamsink.patches._install import require, wrap
from streamsink.request_options import PIN, SYSTEM_MESSAGES, leading_system_messages


def _asks_system_pin(params) -> bool:
    options = (getattr(params, "extra_args", None) or {}).get(CONFIG_KEY)
    return isinstance(options, dict) and options.get(PIN) == "system"


def _add_chat_requests(original, self, messages, params, *args, **kwargs):
    single = isinstance(params, SamplingParams)
    if not (_asks_system_pin(params) if single else any(map(_asks_system_pin, params or ()))):
        return original(self, messages, params, *args, **kwargs)
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    per_conversation = [params] * len(conversations) if single else list(params)
    carried = []
    for conversation, p in zip(conversations, per_conversation):
        if _asks_system_pin(p):
            p = p.clone()
            options = {**p.extra_args[CONFIG_KEY],
                       SYSTEM_MESSAGES: leading_system_messages(conversation)}
            p.extra_args = {**p.extra_args, CONFIG_KEY: options}
        carried.append(p)
    return original(self, messages, carried, *args, **kwargs)


def check_target() -> None:
    # The wrapper, like vLLM, takes one conversation or a list of them.
    require(OfflineInferenceMixin, "_add_chat_requests", ["self", "messages", "params"],
            needles=["conversation_to_seq(messages)"])


def apply() -> None:
    check_target()
    wrap(OfflineInferenceMixin, "_add_chat_requests", _add_chat_requests)
