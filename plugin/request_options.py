"""Per-request streaming options: pin a prefix (the system prompt) in place of the sinks, and a
narrower window, for one request.

A request asks with ``{"streamsink": {...}}`` (the OpenAI body, or ``SamplingParams.extra_args``
for ``vllm.LLM``):
- ``"pin": "system"``: pin every token the chat template produced for the leading system
  message(s);
- ``"pin_tokens": N``: pin the first N tokens of the prompt;
- ``"window_tokens": W_r`` (1 <= W_r <= the engine's W): this request's window.
The API process resolves them once, against the prompt's token ids, into the *shape* the engine
core and the workers read: ``{"pin_tokens": P, "window_tokens": W_r}``. Semantics are the
engine's with S replaced by P and W by W_r: a query sees the P pinned tokens and its W_r most
recent ones, at in-cache positions 0..P-1 and right after.

A request with options never writes sink shadows (attention.py): past its own cache size it is
computed by the PyTorch path, which attends the pinned keys as a separate range, stored as they
were written (positions 0..P-1 are their in-cache slots), and merges it with the window by
log-sum-exp. So its pinned blocks never change once written, and requests with the same pinned
prefix can hold the same physical blocks (prefix_cache.py).

A leaf module: the KV policy, the step plan, the worker rows and the API-side patches all read a
request's shape from here; what a shape keeps is stream_rule.py's.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from streamsink.config import CONFIG_KEY, StreamsinkConfig
from streamsink.errors import StreamsinkConfigError
from streamsink.stream_rule import StreamShape

# The resolved form, as it travels in SamplingParams.extra_args[CONFIG_KEY].
PIN_TOKENS, WINDOW_TOKENS, PIN = "pin_tokens", "window_tokens", "pin"
# Set by the OpenAI chat patch for "pin": "system": the leading system messages, so that the
# API process can count their tokens once the prompt is rendered; removed when resolved.
SYSTEM_MESSAGES = "_system_messages"
_OPTIONS = (PIN, PIN_TOKENS, WINDOW_TOKENS)


class RequestOptionError(StreamsinkConfigError):
    """Per-request options the engine cannot honour (one line; HTTP 400)."""


@functools.lru_cache(maxsize=64)
def engine_shape(config: StreamsinkConfig) -> StreamShape:
    """The shape of a request without options (read for every row of every step: cached)."""
    return StreamShape(config.sink_tokens, config.window_tokens, writes_shadows=True)


def request_shape(engine: StreamShape, extra_args: Mapping | None) -> StreamShape:
    """The shape of a request whose options were resolved (resolve_options); `engine`, the
    engine's own shape, without options."""
    options = (extra_args or {}).get(CONFIG_KEY)
    if not options:
        return engine
    pinned, window = int(options[PIN_TOKENS]), int(options[WINDOW_TOKENS])
    if (pinned, window) == (engine.sink_tokens, engine.window_tokens):
        return engine  # asked for what every request gets
    return StreamShape(pinned, window, writes_shadows=False)


def _count(options: Mapping, name: str, lowest: int) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise RequestOptionError(f"streamsink {name} must be an integer >= {lowest}, "
                                 f"got {value!r}")
    return value


def check_options(raw: Any) -> dict:
    """The shape of the options alone (before the prompt is known): a dict with known keys."""
    if not isinstance(raw, Mapping):
        raise RequestOptionError(f"streamsink request options must be a JSON object, got "
                                 f"{type(raw).__name__}")
    unknown = sorted(set(raw) - set(_OPTIONS) - {SYSTEM_MESSAGES})
    if unknown:
        raise RequestOptionError(f"unknown streamsink request option(s) "
                                 f"{', '.join(map(repr, unknown))}; known: {', '.join(_OPTIONS)}")
    if PIN in raw and raw[PIN] != "system":
        raise RequestOptionError(f"streamsink pin must be \"system\", got {raw[PIN]!r} "
                                 f"(pin_tokens pins a number of tokens)")
    if PIN in raw and PIN_TOKENS in raw:
        raise RequestOptionError("give streamsink pin or pin_tokens, not both")
    _count(raw, PIN_TOKENS, 0)
    _count(raw, WINDOW_TOKENS, 1)
    return dict(raw)


def leading_system_messages(messages) -> list[dict]:
    """The system messages a conversation starts with, as plain dicts (what "pin": "system"
    pins)."""
    found = []
    for message in messages or ():
        data = message if isinstance(message, dict) else dict(message)
        if data.get("role") not in ("system", "developer"):
            break
        found.append({"role": "system", "content": data.get("content")})
    return found


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def resolve_options(config: StreamsinkConfig | None, raw: Any, prompt_token_ids: Sequence[int],
                    system_token_ids: Sequence[int] | None = None) -> dict:
    """The resolved shape {pin_tokens, window_tokens} of a request's options, or a
    RequestOptionError. system_token_ids: the chat template's rendering of the leading system
    messages alone ("pin": "system"); the pinned count is its common prefix with the prompt."""
    if config is None:
        raise RequestOptionError("streamsink request options need a streaming engine (start it "
                                 "with a streamsink entry in additional_config)")
    options = check_options(raw)
    window = _count(options, WINDOW_TOKENS, 1)
    if window is None:
        window = config.window_tokens
    if window > config.window_tokens:
        raise RequestOptionError(f"streamsink window_tokens={window} exceeds the engine's "
                                 f"window_tokens={config.window_tokens}")
    if options.get(PIN) == "system":
        if not system_token_ids:
            raise RequestOptionError("streamsink pin \"system\" needs a chat request that "
                                     "starts with a system message")
        pinned = common_prefix(system_token_ids, prompt_token_ids)
    else:
        pinned = _count(options, PIN_TOKENS, 0)
        if pinned is None:
            pinned = config.sink_tokens
        elif pinned > len(prompt_token_ids):
            raise RequestOptionError(f"streamsink pin_tokens={pinned} exceeds the prompt's "
                                     f"{len(prompt_token_ids)} tokens")
    if pinned > config.widest_sink_tokens:
        raise RequestOptionError(
            f"streamsink: pinning {pinned} tokens exceeds the engine's max_pinned_tokens="
            f"{config.max_pinned_tokens} (start the engine with a larger max_pinned_tokens)")
    return {PIN_TOKENS: pinned, WINDOW_TOKENS: window}
