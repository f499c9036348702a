"""What the client is told, through a real `streamsink serve` (a tiny Llama with the default
model's tokenizer, S = 4, W = 60): every completion and chat response carries its stream's state
in ``usage.streamsink`` — non-streamed, and streamed with ``stream_options.include_usage`` (each
usage chunk with ``continuous_usage_stats``) — with the engine's sinks or a request's pinned
prefix and window; OpenAI's Python client reads it as a usage extra; and a request whose options
the engine refuses gets an HTTP 400 before any stream begins, streamed or not.
tests/test_client_state.py checks the pieces without an engine."""
import json
import sys
import urllib.error
import urllib.request

import pytest
from conftest import random_tokens
from openai_server import running_server

SINK, WINDOW, MAX_PINNED = 4, 60, 128
CACHE = SINK + WINDOW
PROMPT_TOKENS, NEW_TOKENS = 300, 8
SYSTEM = "You keep the lighthouse on the northern cape, and you answer every question briefly."
QUESTION = ("Tell me, in as much detail as you can, everything you know about lighthouses, "
            "their keepers, their lamps and lenses, and the ships they have guided home. ") * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    folder = tmp_path_factory.mktemp("usage")
    model = make_tiny_llama_with_tokenizer(folder / "llama")
    argv = [sys.executable, "-m", "streamsink.serving.cli", "serve", "--model", model,
            "--sink", str(SINK), "--window", str(WINDOW), "--max-pinned-tokens",
            str(MAX_PINNED), "--enforce-eager", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "64"]
    with running_server(argv, folder / "serve.log") as base:
        (served,) = [m["id"] for m in json.loads(
            urllib.request.urlopen(base + "/v1/models", timeout=10).read())["data"]]
        yield base, served


def post(url: str, body: dict):
    """The JSON reply, or for a stream the list of its events' JSON (without [DONE])."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        if not body.get("stream"):
            return json.loads(r.read())
        events = [line[len("data: "):] for line in r.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def expected(prompt: int, completion: int, front: int, window: int, pinned: bool) -> dict:
    """The definition: tokens the stream's last query does not see (docs/serving.md)."""
    return {"evicted_tokens": max(0, prompt + completion - front - window),
            "sink_tokens": 0 if pinned else front, "pinned_tokens": front if pinned else 0,
            "window_tokens": window, "prompt_outgrew_cache": prompt > front + window}


def final_usage(reply, stream: bool) -> dict:
    if not stream:
        return reply["usage"]
    (last,) = [chunk for chunk in reply if chunk.get("usage")]
    assert last is reply[-1] and last["choices"] == []
    return last["usage"]


# (options, front tokens, window, pinned) for a completion of PROMPT_TOKENS token ids.
COMPLETION_SHAPES = [
    (None, SINK, WINDOW, False),
    ({"pin_tokens": 100, "window_tokens": 40}, 100, 40, True),
    ({"window_tokens": 30}, SINK, 30, False),    # a narrower window keeps the engine's sinks
]


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
@pytest.mark.parametrize("options, front, window, pinned", COMPLETION_SHAPES,
                         ids=["engine", "pinned", "window"])
def test_completion_usage_tells_the_stream_state(server, stream, options, front, window,
                                                 pinned):
    base, model = server
    body = {"model": model, "prompt": random_tokens(PROMPT_TOKENS), "max_tokens": NEW_TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if options:
        body["streamsink"] = options
    usage = final_usage(post(base + "/v1/completions", body), stream)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, NEW_TOKENS)
    assert usage["streamsink"] == expected(PROMPT_TOKENS, NEW_TOKENS, front, window, pinned)


def test_a_stream_within_its_cache_evicted_nothing(server):
    base, model = server
    reply = post(base + "/v1/completions", {
        "model": model, "prompt": random_tokens(20), "max_tokens": NEW_TOKENS,
        "ignore_eos": True})
    assert reply["usage"]["streamsink"] == expected(20, NEW_TOKENS, SINK, WINDOW, False)


def test_continuous_usage_counts_as_the_stream_grows(server):
    """With continuous_usage_stats every chunk's usage carries the state so far."""
    base, model = server
    prompt = CACHE - 3    # the stream outgrows its cache while it generates
    chunks = post(base + "/v1/completions", {
        "model": model, "prompt": random_tokens(prompt), "max_tokens": NEW_TOKENS,
        "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    usages = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    assert len(usages) > 2
    for usage in usages:
        assert usage["streamsink"] == expected(prompt, usage["completion_tokens"], SINK, WINDOW,
                                               False), usage
    assert usages[-1]["streamsink"]["evicted_tokens"] == prompt + NEW_TOKENS - CACHE


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
@pytest.mark.parametrize("pin", [False, True], ids=["sinks", "pin-system"])
def test_chat_usage_tells_the_stream_state(server, stream, pin):
    """A chat past the cache; pinning the system prompt reports it as the pinned tokens."""
    base, model = server
    body = {"model": model, "max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if pin:
        body["streamsink"] = {"pin": "system"}
    usage = final_usage(post(base + "/v1/chat/completions", body), stream)
    told = usage["streamsink"]
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    assert prompt > CACHE and completion == NEW_TOKENS
    if pin:
        # The system message's rendering: more than the sinks, less than the whole prompt.
        assert SINK < told["pinned_tokens"] < prompt
    front = told["pinned_tokens"] if pin else SINK
    assert told == expected(prompt, completion, front, WINDOW, pin)


def test_openai_client_reads_the_usage_extras(server):
    """OpenAI's Python client keeps the object as a usage extra, full and streamed."""
    from openai import OpenAI

    base, model = server
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    want = expected(PROMPT_TOKENS, NEW_TOKENS, 100, 40, True)
    options = {"ignore_eos": True, "streamsink": {"pin_tokens": 100, "window_tokens": 40}}
    reply = client.completions.create(model=model, prompt=random_tokens(PROMPT_TOKENS),
                                      max_tokens=NEW_TOKENS, extra_body=options)
    assert reply.usage.model_extra["streamsink"] == want
    chunks = list(client.completions.create(
        model=model, prompt=random_tokens(PROMPT_TOKENS), max_tokens=NEW_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body=options))
    assert chunks[-1].usage.model_extra["streamsink"] == want


def refusal(url: str, body: dict) -> tuple[int, str, str]:
    """(HTTP status, content type, error message) of a request the server must refuse."""
    try:
        post(url, body)
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), \
            json.loads(err.read())["error"]["message"]
    return 200, "", ""


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
def test_refused_options_are_a_400_before_any_stream(server, stream):
    """Options the engine cannot honour (resolved against the prompt: a window over the
    engine's, a pin over max_pinned_tokens, "pin": "system" without a system message; and one
    malformed) are an HTTP 400 with one line, a JSON error and no event stream, streamed or
    not."""
    base, model = server
    for path, body in (("/v1/completions", {"prompt": random_tokens(PROMPT_TOKENS)}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": QUESTION}]})):
        for options in ({"window_tokens": WINDOW + 1}, {"pin_tokens": MAX_PINNED + 1},
                        {"pin": "system"}, {"pin": "user"}):
            status, kind, message = refusal(base + path, {
                "model": model, "max_tokens": 4, "stream": stream, "streamsink": options,
                **body})
            assert status == 400, (path, options, status)
            assert kind.startswith("application/json"), (path, options, kind)
            assert "streamsink" in message and "\n" not in message, message
