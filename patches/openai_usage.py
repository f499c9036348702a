"""Patch: the OpenAI server's ``usage`` tells the client its stream's state.

Why: a client of a streaming engine should know what its stream no longer sees: the tokens
evicted so far, the shape it sees (sinks or pinned tokens + window) and whether the prompt alone
outgrew the cache (client_state.py names and defines the fields). vLLM's chat and completion
handlers build their UsageInfo inline, in four places (a full response and a streamed one, for
each endpoint), from counts that stay in local variables; no hook adds to it.
How: each of the four handler methods is wrapped. The RequestOutputs the handler reads pass
through a tally that counts every stream's prompt and generated tokens (adding up the deltas of
a streamed response, taking the last count of a full one) and picks up the request's shape
(patches/output_stream_state.py); a full response's UsageInfo (pydantic, extra="allow") then
gets ``usage.streamsink``; in a streamed response, every chunk that carries a usage (the final
one with ``stream_options.include_usage``; each one with ``continuous_usage_stats``) gets it,
as it stands at that chunk: the chunk's JSON is read back and written again, since the handler
has already serialized it. A stock engine's outputs carry no shape: its responses are untouched.
The tally sits between the handler and the engine's generator, which the handler leaves open when
its client goes away; the wrapper closes it then, so the request is aborted at once (not when the
garbage collector finalizes the generators).
Delete when: vLLM gives plugins a hook on the usage of a response (or carries per-request
extras from the RequestOutput into UsageInfo).
"""
from __future__ import annotations

import json

from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

from streamsink.patches._install import require, wrap
from streamsink.client_state import USAGE_KEY, shape_of, state

_DATA = "data: "


class StreamTally:
    """The token counts of one response's streams (a prompt index and a choice index each),
    from the RequestOutputs its handler reads. delta: outputs carry only their new tokens
    (streamed responses), else each carries its completion so far."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.reported = None
        self.prompts: dict[int, int] = {}
        self.generated: dict[tuple[int, int], int] = {}

    def see(self, output, prompt_index: int = 0) -> None:
        reported = shape_of(output)
        if reported is None:
            return
        self.reported = reported
        if output.prompt_token_ids is not None:
            self.prompts[prompt_index] = len(output.prompt_token_ids)
        for completion in output.outputs:
            key = (prompt_index, completion.index)
            count = len(completion.token_ids)
            self.generated[key] = self.generated.get(key, 0) + count if self.delta else count

    def usage(self) -> dict | None:
        """usage["streamsink"] so far; None for a stock engine's response."""
        if self.reported is None:
            return None
        streams = [(self.prompts.get(p, 0), n) for (p, _), n in self.generated.items()]
        answered = {p for p, _ in self.generated}
        streams += [(n, 0) for p, n in self.prompts.items() if p not in answered]
        return state(self.reported, streams)


async def _tallied(results, tally: StreamTally, indexed: bool):
    """The handler's result generator, each output seen by the tally first. Closed, it closes
    the engine's generator at once (AsyncLLM.generate aborts an unfinished request)."""
    try:
        async for item in results:
            if indexed:
                tally.see(item[1], item[0])
            else:
                tally.see(item)
            yield item
    finally:
        close = getattr(results, "aclose", None)
        if close is not None:
            await close()


def _add_to(response, tally: StreamTally):
    usage = getattr(response, "usage", None)
    told = tally.usage()
    if usage is not None and told is not None:
        setattr(usage, USAGE_KEY, told)  # an extra field: UsageInfo keeps unknown fields
    return response


def add_to_chunk(chunk, tally: StreamTally):
    """A streamed chunk ("data: {json}\\n\\n") with the stream's state added to its usage, if it
    carries one."""
    if not isinstance(chunk, str) or '"usage":' not in chunk or not chunk.startswith(_DATA):
        return chunk
    told = tally.usage()
    if told is None:
        return chunk
    try:
        payload = json.loads(chunk[len(_DATA):])
    except ValueError:
        return chunk
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return chunk
    payload["usage"][USAGE_KEY] = told
    return f"{_DATA}{json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _told(chunks, tally: StreamTally, source):
    """The handler's chunks with the state added. Closed early (the client went away), it
    closes the handler's stream and then the engine's generator (source, the tallied one),
    which the handler leaves open: AsyncLLM.generate aborts the request when closed."""
    try:
        async for chunk in chunks:
            yield add_to_chunk(chunk, tally)
    finally:
        try:
            await chunks.aclose()
        finally:
            await source.aclose()


async def _chat_full(original, self, request, result_generator, *args, **kwargs):
    tally = StreamTally(delta=False)
    source = _tallied(result_generator, tally, False)
    try:
        response = await original(self, request, source, *args, **kwargs)
    finally:
        await source.aclose()
    return _add_to(response, tally)


def _chat_stream(original, self, request, result_generator, *args, **kwargs):
    tally = StreamTally(delta=True)
    source = _tallied(result_generator, tally, False)
    return _told(original(self, request, source, *args, **kwargs), tally, source)


def _completion_response(original, self, final_res_batch, *args, **kwargs):
    response = original(self, final_res_batch, *args, **kwargs)
    tally = StreamTally(delta=False)
    for index, output in enumerate(final_res_batch):
        tally.see(output, index)
    return _add_to(response, tally)


def _completion_stream(original, self, request, engine_inputs, result_generator, *args,
                       **kwargs):
    tally = StreamTally(delta=True)
    source = _tallied(result_generator, tally, True)
    return _told(original(self, request, engine_inputs, source, *args, **kwargs), tally,
                 source)


def check_target() -> None:
    """Raise PatchTargetMoved unless the handlers are the ones this patch was written for: each
    takes the result generator where the wrapper passes its own, reads RequestOutputs from it
    (completion streams: (prompt index, output) pairs), and builds a UsageInfo; the streams
    serialize their chunks as "data: {json}"."""
    require(OpenAIServingChat, "chat_completion_full_generator",
            ["self", "request", "result_generator"],
            needles=["async for res in result_generator:", "usage = UsageInfo("])
    require(OpenAIServingChat, "chat_completion_stream_generator",
            ["self", "request", "result_generator"],
            needles=["async for res in result_generator:", "final_usage = UsageInfo(",
                     'yield f"data: {final_usage_data}\\n\\n"'])
    require(OpenAIServingCompletion, "request_output_to_completion_response",
            ["self", "final_res_batch", "request"],
            needles=["for final_res in final_res_batch:", "usage = UsageInfo("])
    require(OpenAIServingCompletion, "completion_stream_generator",
            ["self", "request", "engine_inputs", "result_generator"],
            needles=["async for prompt_idx, res in result_generator:",
                     "final_usage_info = UsageInfo(", 'yield f"data: {final_usage_data}\\n\\n"'])


def apply() -> None:
    check_target()
    wrap(OpenAIServingChat, "chat_completion_full_generator", _chat_full)
    wrap(OpenAIServingChat, "chat_completion_stream_generator", _chat_stream)
    wrap(OpenAIServingCompletion, "request_output_to_completion_response", _completion_response)
    wrap(OpenAIServingCompletion, "completion_stream_generator", _completion_stream)
