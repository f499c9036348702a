"""Patch: no max_model_len limit on prompts in vLLM's OpenAI server, for streaming engines.

Why: the OpenAI completion and chat requests build their tokenization limits from
model_config.max_model_len (CompletionRequest/ChatCompletionRequest.build_tok_params), so the
server refuses a prompt longer than max_model_len, and a max_tokens above it, before the engine
sees them. A streaming engine serves both.
How: both build_tok_params methods are wrapped; for the model config of a streaming engine
(config.streaming_model_config) the original runs against a stand-in whose
max_model_len is None, vLLM's own "no limit".
Delete when: vLLM takes the request length limit from the engine (a KV cache spec or plugin
hook) instead of max_model_len.
"""
from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from streamsink.config import streaming_model_config
from streamsink.errors import PatchTargetMoved
from streamsink.patches._install import require, wrap

_NO_LIMIT = SimpleNamespace(max_model_len=None)


def _targets():
    return [CompletionRequest, ChatCompletionRequest]


def check_target() -> None:
    """Raise PatchTargetMoved unless build_tok_params reads nothing from the model config but
    max_model_len (what the stand-in provides)."""
    for cls in _targets():
        target = require(cls, "build_tok_params", ["self", "model_config"], exact=True)
        uses = set(re.findall(r"model_config\.(\w+)", inspect.getsource(target)))
        if uses != {"max_model_len"}:
            raise PatchTargetMoved(f"{cls.__name__}.build_tok_params reads model_config "
                                   f"fields {sorted(uses)}, expected only max_model_len")


def _build_tok_params(original, self, model_config):
    if streaming_model_config(model_config) is not None:
        return original(self, _NO_LIMIT)
    return original(self, model_config)


def apply() -> None:
    check_target()
    for cls in _targets():
        wrap(cls, "build_tok_params", _build_tok_params)
