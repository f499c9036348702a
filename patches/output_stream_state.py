"""Patch: every RequestOutput of a streaming engine carries the shape its client is told.

Why: a response tells its client the stream's state (client_state.py: tokens evicted, sinks or
pinned tokens, window), computed from the request's resolved shape and its token counts. The
shape is resolved in the API process (patches/input_length.py keeps it on the request's own
SamplingParams), but vLLM's outputs (RequestOutput, for `vllm.LLM`, AsyncLLM and the OpenAI
server alike) are built by the OutputProcessor from a per-request state that keeps no params.
How: OutputProcessor.add_request is wrapped to copy the shape from the request's params (or its
parent's, for the n > 1 children, whose params may be copies) onto the RequestState it creates;
RequestState._new_request_output, which builds every RequestOutput, is wrapped to copy it onto
the output. A plain attribute in the API process: nothing reaches the engine core, and outputs
of a stock engine (no shape kept) are untouched. Readers: streamsink.stream_state(output) and
the OpenAI usage (patches/openai_usage.py).
Delete when: vLLM lets a plugin attach per-request data to its outputs (or RequestOutput
carries the request's SamplingParams, where input_length.py keeps the shape).
"""
from __future__ import annotations

from vllm.outputs import RequestOutput
from vllm.v1.engine.output_processor import OutputProcessor, RequestState

from streamsink.patches._install import require, wrap
from streamsink.client_state import keep_shape, shape_of


def _add_request(original, self, request, *args, **kwargs):
    result = original(self, request, *args, **kwargs)
    state = self.request_states.get(request.request_id)
    if state is not None:
        reported = shape_of(request.sampling_params)
        if reported is None and state.parent_req is not None:
            reported = shape_of(state.parent_req.sampling_params)
        keep_shape(state, reported)
    return result


def _new_request_output(original, self, *args, **kwargs):
    output = original(self, *args, **kwargs)
    if isinstance(output, RequestOutput):
        keep_shape(output, shape_of(self))
    return output


def check_target() -> None:
    """Raise PatchTargetMoved unless the OutputProcessor is the one this patch was written for:
    add_request keeps the RequestState it creates under the request's id, and every
    RequestOutput is built in RequestState._new_request_output."""
    require(OutputProcessor, "add_request", ["self", "request"],
            needles=["self.request_states[request_id] = req_state"])
    require(RequestState, "_new_request_output", ["self", "external_req_id", "outputs"],
            needles=["return RequestOutput("])
    require(RequestState, "make_request_output", needles=["self._new_request_output("])
    require(RequestState, "__init__", needles=["self.parent_req = parent_req"])


def apply() -> None:
    check_target()
    wrap(OutputProcessor, "add_request", _add_request)
    wrap(RequestState, "_new_request_output", _new_request_output)
