"""Patch: prompts longer than max_model_len, the default max_tokens, and per-request options, for
streaming engines.

Why: vLLM's InputProcessor (API process) refuses a prompt of max_model_len tokens or more, and
turns an unset max_tokens into max_model_len - prompt_len (zero or negative for a long prompt).
A streaming engine serves prompts of any length in bounded memory.
How: InputProcessor._validate_prompt_len is wrapped to keep only the "empty prompt" check for the
decoder prompt of a streaming engine; InputProcessor.process_inputs is wrapped to give an unset
max_tokens the value max_model_len (up to one model context of new tokens, whatever the prompt
length) before vLLM's own default applies, and, once the prompt is tokenized, to resolve a
request's ``streamsink`` options (request_options.py) into the pinned count and window the
engine reads: "pin": "system" counts the tokens the chat template renders for the leading system
messages (their common prefix with the prompt). Options on a stock engine, or ones it cannot
honour, raise a one-line ValueError (HTTP 400 over the OpenAI API). A streaming engine's request
also keeps the shape its client is told (client_state.py) on its params, in this process only.
Stock engines take the original paths otherwise.
Delete when: vLLM asks the KV cache spec (or a plugin hook) for the longest request it serves
instead of using max_model_len.
"""
from __future__ import annotations

from vllm.exceptions import VLLMClientError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from streamsink.config import CONFIG_KEY, streaming_config
from streamsink.patches._install import require, wrap
from streamsink.request_options import SYSTEM_MESSAGES, RequestOptionError, resolve_options
from streamsink.client_state import keep_shape, reported_shape


def _is_streaming(processor) -> bool:
    return streaming_config(processor.vllm_config) is not None


def _validate_prompt_len(original, self, prompt_len, prompt_type):
    if prompt_type == "decoder" and prompt_len > 0 and _is_streaming(self):
        return
    return original(self, prompt_len, prompt_type)


def _process_inputs(original, self, request_id, prompt, params, *args, **kwargs):
    if isinstance(params, SamplingParams) and params.max_tokens is None and _is_streaming(self):
        params = params.clone()  # the caller's params may be shared
        params.max_tokens = self.model_config.max_model_len
    request = original(self, request_id, prompt, params, *args, **kwargs)
    sampling = request.sampling_params
    if sampling is None:
        return request
    raw = resolved = None
    if sampling.extra_args and CONFIG_KEY in sampling.extra_args:
        # The request's own copy (process_inputs clones the params).
        raw = sampling.extra_args[CONFIG_KEY]
        resolved = resolved_options(self, raw, request.prompt_token_ids or [])
        sampling.extra_args = {**sampling.extra_args, CONFIG_KEY: resolved}
    cfg = streaming_config(self.vllm_config)
    if cfg is not None:
        # What its outputs tell the client (client_state.py; patches/output_stream_state.py
        # carries it to them). An attribute of this process's copy: never sent to the engine.
        keep_shape(sampling, reported_shape(cfg, raw, resolved))
    return request


class RefusedRequestOptions(VLLMClientError, ValueError):
    """Request options the engine cannot honour: vLLM's OpenAI server answers its client errors
    with HTTP 400 (any other exception from here becomes a 500); vllm.LLM raises a ValueError."""


def resolved_options(processor, options, prompt_token_ids) -> dict:
    """The pinned count and window of a request's options (request_options.resolve_options);
    RefusedRequestOptions if the engine cannot honour them. Also asked before a request is
    added (patches/early_refusal.py), so that a streamed refusal is an HTTP 400 too."""
    system = None
    messages = options.get(SYSTEM_MESSAGES) if isinstance(options, dict) else None
    if messages and processor.tokenizer is not None:
        rendered = processor.tokenizer.apply_chat_template(messages, tokenize=True,
                                                           add_generation_prompt=False)
        system = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    try:
        return resolve_options(streaming_config(processor.vllm_config), options,
                               prompt_token_ids, system)
    except RequestOptionError as exc:
        raise RefusedRequestOptions(str(exc)) from None


def check_target() -> None:
    """Raise PatchTargetMoved unless InputProcessor is the one this patch was written for."""
    require(InputProcessor, "_validate_prompt_len", ["self", "prompt_len", "prompt_type"])
    require(InputProcessor, "process_inputs", ["self", "request_id", "prompt", "params"],
            needles=["if sampling_params.max_tokens is None:"])
    require(InputProcessor, "__init__", needles=["self.vllm_config = vllm_config"])


def apply() -> None:
    check_target()
    wrap(InputProcessor, "_validate_prompt_len", _validate_prompt_len)
    wrap(InputProcessor, "process_inputs", _process_inputs)
