"""What the client is told (client_state.py), without an engine: the usage object of a stream
from its shape and token counts, the shape a request reports, how the API process carries it to
vLLM's outputs (a real OutputProcessor fed engine-core outputs by hand), how the OpenAI
handlers' usage gets it (full responses and streamed chunks, as vLLM serializes them, read back
by OpenAI's client), and a refused request stopped when generate() is called, before a stream
could begin. tests/test_usage_served.py checks the same through a real server and vllm.LLM."""
import asyncio
import json

import pytest

import streamsink
from streamsink.client_state import (
    USAGE_KEY,
    ReportedShape,
    keep_shape,
    reported_shape,
    shape_of,
    state,
)
from streamsink.config import parse_config


@pytest.fixture(autouse=True, scope="module")
def registered():
    streamsink.register()


def told(evicted, sink, pinned, window, outgrew):
    return {"evicted_tokens": evicted, "sink_tokens": sink, "pinned_tokens": pinned,
            "window_tokens": window, "prompt_outgrew_cache": outgrew}


@pytest.mark.parametrize("prompt, generated, want", [
    (0, 0, (0, False)),
    (10, 5, (0, False)),            # within the cache
    (60, 4, (0, False)),            # exactly C = 64 tokens: the last query sees them all
    (60, 5, (1, False)),            # one past: the oldest window token is gone
    (64, 0, (0, False)),            # a prompt of exactly C: not outgrown
    (65, 0, (1, True)),
    (300, 8, (244, True)),
])
def test_state_of_one_stream(prompt, generated, want):
    evicted, outgrew = want
    assert state(ReportedShape(4, 60), [(prompt, generated)]) == told(evicted, 4, 0, 60, outgrew)


def test_pinned_shape_and_several_streams():
    """A pinned prefix takes the sinks' place; several streams (n > 1, several prompts) add up
    their evictions, as usage adds up tokens; any outgrown prompt counts."""
    pinned = ReportedShape(100, 40, pinned=True)
    assert state(pinned, [(300, 8)]) == told(168, 0, 100, 40, True)
    assert state(pinned, [(100, 50), (100, 45), (20, 0)]) == told(10 + 5, 0, 100, 40, False)
    assert state(ReportedShape(4, 60), [(10, 2), (70, 0)])["prompt_outgrew_cache"]


def test_reported_shape_of_a_request():
    cfg = parse_config({"sink_tokens": 4, "window_tokens": 60, "max_pinned_tokens": 128})
    assert reported_shape(cfg, None, None) == ReportedShape(4, 60)
    assert reported_shape(cfg, {"pin_tokens": 100, "window_tokens": 40},
                          {"pin_tokens": 100, "window_tokens": 40}) == ReportedShape(100, 40, True)
    assert reported_shape(cfg, {"pin": "system"},
                          {"pin_tokens": 12, "window_tokens": 60}) == ReportedShape(12, 60, True)
    # A narrower window alone keeps the engine's sinks: they are reported as sinks.
    assert reported_shape(cfg, {"window_tokens": 30},
                          {"pin_tokens": 4, "window_tokens": 30}) == ReportedShape(4, 30, False)


def fake_processor(streamsink_entry):
    """What input_length's wrapper reads of an InputProcessor."""
    from types import SimpleNamespace

    from vllm.config import VllmConfig

    additional = {} if streamsink_entry is None else {"streamsink": streamsink_entry}
    return SimpleNamespace(vllm_config=VllmConfig(additional_config=additional),
                           model_config=SimpleNamespace(max_model_len=1024), tokenizer=None)


def engine_request(params, prompt_tokens: int, request_id: str = "r"):
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(request_id=request_id, prompt_token_ids=list(range(prompt_tokens)),
                             mm_features=None, sampling_params=params, pooling_params=None,
                             arrival_time=0.0, lora_request=None, cache_salt=None,
                             data_parallel_rank=None, external_req_id=request_id)


@pytest.mark.parametrize("options, want", [
    (None, ReportedShape(4, 60)),
    ({"pin_tokens": 100, "window_tokens": 40}, ReportedShape(100, 40, True)),
    ({"window_tokens": 30}, ReportedShape(4, 30)),
])
def test_process_inputs_keeps_the_shape_on_the_request_copy(options, want):
    """input_length's wrapper resolves the options and keeps the reported shape on the
    request's own params (never on the caller's, never for a stock engine)."""
    from vllm.sampling_params import SamplingParams

    from streamsink.patches import input_length

    mine = SamplingParams(max_tokens=4, extra_args={"streamsink": options} if options else None)

    def original(self, request_id, prompt, params, *args, **kwargs):
        return engine_request(params.clone(), 300, request_id)

    cfg = {"sink_tokens": 4, "window_tokens": 60, "max_pinned_tokens": 128}
    request = input_length._process_inputs(original, fake_processor(cfg), "r", {}, mine)
    assert shape_of(request.sampling_params) == want and shape_of(mine) is None
    stock = input_length._process_inputs(original, fake_processor(None), "r", {},
                                         SamplingParams(max_tokens=4))
    assert shape_of(stock.sampling_params) is None


def finish(processor, request_id, tokens):
    from vllm.v1.engine import EngineCoreOutput, FinishReason

    return processor.process_outputs([EngineCoreOutput(
        request_id=request_id, new_token_ids=tokens, finish_reason=FinishReason.LENGTH)])


def test_outputs_carry_the_shape_and_stream_state_reads_them():
    """A real OutputProcessor (the API process's, for vllm.LLM and the server alike): its
    RequestOutputs carry the request's shape; streamsink.stream_state reads them; a request
    without a kept shape (a stock engine's) gives None."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.engine.output_processor import OutputProcessor

    processor = OutputProcessor(None, log_stats=False)
    params = SamplingParams(max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY)
    keep_shape(params, ReportedShape(4, 60))
    processor.add_request(engine_request(params, 100, "ours"), None)
    processor.add_request(engine_request(SamplingParams(max_tokens=3), 100, "stock"), None)
    processor.process_outputs([EngineCoreOutput(request_id="ours", new_token_ids=[5, 6])])
    (out,) = finish(processor, "ours", [7]).request_outputs
    assert streamsink.stream_state(out) == told(100 + 3 - 64, 4, 0, 60, True)
    (stock,) = finish(processor, "stock", [7]).request_outputs
    assert streamsink.stream_state(stock) is None


def test_n_children_report_their_parents_shape():
    """n > 1: each child's params may be a copy (a seed per child); the shape comes from the
    parent's. vllm.LLM's final output aggregates the n completions: their evictions add up."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.engine.parallel_sampling import ParentRequest

    processor = OutputProcessor(None, log_stats=False)
    params = SamplingParams(n=2, seed=7, max_tokens=3, output_kind=RequestOutputKind.FINAL_ONLY)
    keep_shape(params, ReportedShape(10, 20, pinned=True))
    parent_request = engine_request(params, 40, "p")
    parent = ParentRequest(parent_request)
    for index in range(2):
        child_id, child_params = parent.get_child_info(index)
        processor.add_request(engine_request(child_params, 40, child_id), None, parent, index)
    finish(processor, "0_p", [1, 2, 3])
    (out,) = finish(processor, "1_p", [1]).request_outputs
    assert len(out.outputs) == 2
    assert streamsink.stream_state(out) == told((43 - 30) + (41 - 30), 0, 10, 20, True)


def request_output(prompt_tokens, completions, shape=ReportedShape(4, 60)):
    from vllm.outputs import CompletionOutput, RequestOutput

    out = RequestOutput("r", None, list(range(prompt_tokens)), None,
                        [CompletionOutput(index=i, text="", token_ids=list(range(n)),
                                          cumulative_logprob=None, logprobs=None)
                         for i, n in enumerate(completions)], finished=True)
    keep_shape(out, shape)
    return out


def test_tally_adds_deltas_and_takes_full_counts():
    from streamsink.patches.openai_usage import StreamTally

    streamed = StreamTally(delta=True)
    for chunk in (5, 1, 1, 3):
        streamed.see(request_output(100, [chunk]))
    assert streamed.usage() == told(100 + 10 - 64, 4, 0, 60, True)
    full = StreamTally(delta=False)
    full.see(request_output(30, [40, 20]))
    full.see(request_output(50, [0]), prompt_index=1)
    assert full.usage() == told(6 + 0 + 0, 4, 0, 60, False)
    assert StreamTally(delta=False).usage() is None   # a stock engine's outputs: nothing


async def collect(agen):
    return [item async for item in agen]


async def results(*outputs):
    for item in outputs:
        yield item


def test_streamed_usage_chunks_carry_the_state():
    """The completion stream handler, wrapped: every chunk with a usage (as vLLM serializes
    it) gets usage.streamsink as it stands; other chunks pass unchanged; OpenAI's client reads
    it as a usage extra."""
    from openai.types import CompletionUsage
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponseStreamChoice,
        CompletionStreamResponse,
    )
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    from streamsink.patches import openai_usage

    async def handler(self, request, engine_inputs, result_generator, *args, **kwargs):
        tokens = 0
        async for _, res in result_generator:
            tokens += len(res.outputs[0].token_ids)
            yield "data: " + CompletionStreamResponse(model="m", choices=[
                CompletionResponseStreamChoice(index=0, text="é\"usage\":")]).model_dump_json(
                exclude_unset=True) + "\n\n"
        final = CompletionStreamResponse(model="m", choices=[], usage=UsageInfo(
            prompt_tokens=100, completion_tokens=tokens, total_tokens=100 + tokens))
        yield f"data: {final.model_dump_json(exclude_unset=False, exclude_none=True)}\n\n"
        yield "data: [DONE]\n\n"

    outputs = [(0, request_output(100, [n])) for n in (3, 4)]
    chunks = asyncio.run(collect(openai_usage._completion_stream(
        handler, None, None, None, results(*outputs))))
    assert chunks[-1] == "data: [DONE]\n\n"
    assert json.loads(chunks[0][6:])["choices"][0]["text"] == "é\"usage\":"  # untouched
    final = json.loads(chunks[-2][len("data: "):])
    assert chunks[-2].endswith("\n\n") and final["usage"]["completion_tokens"] == 7
    usage = CompletionUsage.model_validate(final["usage"])
    assert usage.model_extra[USAGE_KEY] == told(100 + 7 - 64, 4, 0, 60, True)
    # Without a shape (a stock engine) the chunks are exactly the handler's.
    plain = [(0, request_output(100, [3], shape=None))]
    untouched = asyncio.run(collect(openai_usage._completion_stream(
        handler, None, None, None, results(*plain))))
    assert USAGE_KEY not in untouched[-2]


def test_full_response_usage_gets_the_state():
    """A full response's UsageInfo keeps the extra field, and dumps it as the server sends it."""
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    from streamsink.patches import openai_usage

    def original(self, final_res_batch, *args, **kwargs):
        return CompletionResponse(model="m", choices=[], usage=UsageInfo(prompt_tokens=300))

    pinned = ReportedShape(100, 40, pinned=True)
    response = openai_usage._completion_response(
        original, None, [request_output(300, [8], shape=pinned)])
    assert response.model_dump()["usage"][USAGE_KEY] == told(168, 0, 100, 40, True)

    async def chat(self, request, result_generator, *args, **kwargs):
        async for _ in result_generator:
            pass
        return CompletionResponse(model="m", choices=[], usage=UsageInfo(prompt_tokens=300))

    response = asyncio.run(openai_usage._chat_full(
        chat, None, None, results(request_output(300, [8], shape=pinned))))
    assert json.loads(response.model_dump_json())["usage"][USAGE_KEY] == \
        told(168, 0, 100, 40, True)


def test_refusal_comes_when_generate_is_called():
    """AsyncLLM.generate (wrapped) resolves a request's options when it is called, so a refusal
    leaves the handler before any (streamed) response exists: vLLM answers it with HTTP 400
    (a VLLMClientError). Accepted options give the generator, not yet started."""
    from types import SimpleNamespace

    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = SimpleNamespace(input_processor=fake_processor(
        {"sink_tokens": 4, "window_tokens": 60, "max_pinned_tokens": 128}))
    prompt = {"type": "token", "prompt_token_ids": list(range(300))}
    for options, message in (({"window_tokens": 61}, "exceeds the engine's window_tokens=60"),
                             ({"pin_tokens": 129}, "max_pinned_tokens=128"),
                             ({"pin": "system"}, "needs a chat request")):
        params = SamplingParams(max_tokens=4, extra_args={"streamsink": options})
        with pytest.raises(ValueError, match=message) as refused:
            AsyncLLM.generate(engine, prompt, params, "r")
        assert create_error_response(refused.value).error.code == 400
    stock = SimpleNamespace(input_processor=fake_processor(None))
    with pytest.raises(ValueError, match="need a streaming engine"):
        AsyncLLM.generate(stock, prompt, SamplingParams(
            max_tokens=4, extra_args={"streamsink": {"pin_tokens": 4}}), "r")
    accepted = AsyncLLM.generate(engine, prompt, SamplingParams(
        max_tokens=4, extra_args={"streamsink": {"pin_tokens": 100}}), "r")
    assert hasattr(accepted, "__anext__")
    asyncio.run(accepted.aclose())


def test_a_closed_stream_closes_the_engine_generator():
    """A client that goes away closes the handler's stream: the engine's generator behind the
    tally is closed with it (AsyncLLM.generate aborts the request when closed)."""
    from streamsink.patches import openai_usage

    closed = []

    async def engine():
        try:
            for n in range(100):
                yield request_output(100, [1])
        finally:
            closed.append(True)

    async def handler(self, request, result_generator, *args, **kwargs):
        async for _ in result_generator:
            yield "data: {}\n\n"

    async def client_leaves():
        stream = openai_usage._chat_stream(handler, None, None, engine())
        await stream.__anext__()
        await stream.aclose()
        return list(closed)   # at once, not when the event loop finalizes what is left

    assert asyncio.run(client_leaves()) == [True]
