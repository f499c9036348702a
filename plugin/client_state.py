"""What a response tells its client about its stream: the tokens evicted so far, the shape it
sees (sinks or pinned tokens, and a window), and whether the prompt alone outgrew the cache.

Everything is known in the API process from the request's resolved shape (the engine's S and W,
or the P tokens it pinned and its window W_r, request_options.py) and its token counts, so
nothing travels back from the engine core: a stream of L tokens (prompt and generated) evicted
stream_rule.evicted_tokens(shape, L) of them, the tokens its last query no longer sees.

The client reads it as one object under ``usage``, beside OpenAI's own counts::

    "usage": {"prompt_tokens": 9214, "completion_tokens": 48, "total_tokens": 9262,
              "streamsink": {"evicted_tokens": 8238, "sink_tokens": 4, "pinned_tokens": 0,
                             "window_tokens": 1020, "prompt_outgrew_cache": true}}

One nested object rather than flat keys: OpenAI may add usage keys of its own (as it did with
``prompt_tokens_details``), and vLLM adds some; a single key named like the request's own
``streamsink`` field cannot collide with either, and a client finds all of it in one place
(OpenAI's Python client keeps it as ``usage.model_extra["streamsink"]``, a dict). Every key is
always there, so clients need no case analysis:
- ``evicted_tokens``: tokens of the stream its last token's query no longer sees (0 while the
  stream fits its cache); summed over the streams of a response with several (n > 1, or a
  completion of several prompts), as usage sums tokens;
- ``sink_tokens``: the engine's sinks the stream keeps (0 when the request pinned a prefix);
- ``pinned_tokens``: the tokens the request pinned in their place (``pin`` / ``pin_tokens``;
  0 otherwise); a query sees sink_tokens + pinned_tokens + window_tokens keys at most;
- ``window_tokens``: the window (the engine's W, or the request's W_r);
- ``prompt_outgrew_cache``: the prompt alone was longer than the cache, so even the first
  generated token did not see all of it (any of the response's prompts).

`vllm.LLM` and `AsyncLLM` outputs carry the same through `stream_state(output)` (exported as
``streamsink.stream_state``). A leaf module: it imports no vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from streamsink.config import StreamsinkConfig
from streamsink.request_options import PIN, PIN_TOKENS, WINDOW_TOKENS
from streamsink.stream_rule import StreamShape, evicted_tokens

# The key under `usage` (and of the request options: one name for the client to know).
USAGE_KEY = "streamsink"
# Where the API process keeps a request's ReportedShape: on its SamplingParams (the request's
# own copy), its output state and each RequestOutput (patches/input_length.py,
# patches/output_stream_state.py). Private: read it with stream_state() or shape_of().
SHAPE_ATTR = "_streamsink_shape"


@dataclass(frozen=True)
class ReportedShape:
    """A request's shape as the client is told it: `front_tokens` every query sees (the
    engine's sinks, or the tokens the request pinned: `pinned`) and its window."""

    front_tokens: int
    window_tokens: int
    pinned: bool = False

    @property
    def shape(self) -> StreamShape:
        return StreamShape(self.front_tokens, self.window_tokens,
                           writes_shadows=not self.pinned)


def reported_shape(cfg: StreamsinkConfig, raw_options: Any,
                   resolved: Mapping | None) -> ReportedShape:
    """The shape of a request of a streaming engine: its resolved options
    (request_options.resolve_options) or, without options, the engine's sinks and window.
    `pinned` when the request asked to pin (pin / pin_tokens); a request that only narrows its
    window keeps the engine's first S tokens, its sinks."""
    if not resolved:
        return ReportedShape(cfg.sink_tokens, cfg.window_tokens)
    asked = isinstance(raw_options, Mapping) and (PIN in raw_options or PIN_TOKENS in raw_options)
    return ReportedShape(int(resolved[PIN_TOKENS]), int(resolved[WINDOW_TOKENS]), bool(asked))


def state(reported: ReportedShape, streams: Iterable[tuple[int, int]]) -> dict:
    """The usage object for streams of (prompt tokens, generated tokens) of one request."""
    shape = reported.shape
    evicted, outgrew = 0, False
    for prompt, generated in streams:
        evicted += evicted_tokens(shape, prompt + generated)
        outgrew = outgrew or evicted_tokens(shape, prompt) > 0
    return {"evicted_tokens": evicted,
            "sink_tokens": 0 if reported.pinned else reported.front_tokens,
            "pinned_tokens": reported.front_tokens if reported.pinned else 0,
            "window_tokens": reported.window_tokens,
            "prompt_outgrew_cache": outgrew}


def shape_of(obj) -> ReportedShape | None:
    """The ReportedShape kept on a request's params, output state or output; None for a stock
    engine's (or anything else)."""
    found = getattr(obj, SHAPE_ATTR, None)
    return found if isinstance(found, ReportedShape) else None


def keep_shape(obj, reported: ReportedShape | None) -> None:
    if reported is not None:
        setattr(obj, SHAPE_ATTR, reported)


def stream_state(output) -> dict | None:
    """The stream state of a vLLM RequestOutput (what `usage["streamsink"]` says over HTTP),
    or None when a stock engine produced it::

        out = llm.generate(prompts, params)[0]
        streamsink.stream_state(out)["evicted_tokens"]

    It counts the tokens the output carries: its prompt and each of its completions whole, as
    `vllm.LLM` returns them (and AsyncLLM with its default output kind; a DELTA output carries
    only its latest tokens: count those yourself, as the OpenAI server does)."""
    reported = shape_of(output)
    if reported is None:
        return None
    prompt = len(getattr(output, "prompt_token_ids", None) or ())
    completions = getattr(output, "outputs", None) or ()
    streams = [(prompt, len(c.token_ids)) for c in completions] or [(prompt, 0)]
    return state(reported, streams)
