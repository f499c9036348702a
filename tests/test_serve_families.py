"""`streamsink serve` with families beyond Llama, started as a user starts it (`--model <dir>`):
Qwen2 (q/k/v biases) and BLOOM (ALiBi, no RoPE). Each server answers a chat request, and scores
a prompt several times S+W long (chunked prefill past the cache) exactly: the prompt
log-probabilities it returns over HTTP equal the reference's streaming NLLs — with the engine's
S and W, and with a request's own pinned prefix and window (a `streamsink` field in the body);
a chat pinning its system prompt is answered, and bad request options get a one-line 400."""
import json
import sys
import urllib.error
import urllib.request

import pytest
import tiny_models
from conftest import References, random_tokens
from openai_server import running_server

SINK, WINDOW = 4, 60
PROMPT_TOKENS = 300  # ~5 x (S + W): several evictions, several prefill chunks of 64
PIN, PIN_WINDOW, MAX_PINNED = 100, 40, 128  # a request's own shape, and the engine's bound
FAMILIES = {"qwen2": tiny_models.make_tiny_qwen2, "bloom": tiny_models.make_tiny_bloom}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_serve_answers_and_streams_exactly(family, tmp_path):
    model = tiny_models.add_default_tokenizer(
        FAMILIES[family](tmp_path / family, vocab=tiny_models.DEFAULT_VOCAB))
    tokens = random_tokens(PROMPT_TOKENS)
    # Computed while the server starts.
    refs = References([(model, tokens, SINK, WINDOW), (model, tokens, PIN, PIN_WINDOW)])
    argv = [sys.executable, "-m", "streamsink.serving.cli", "serve", "--model", model,
            "--sink", str(SINK), "--window", str(WINDOW), "--enforce-eager",
            "--max-pinned-tokens", str(MAX_PINNED),
            "--max-num-seqs", "2", "--max-num-batched-tokens", "64"]
    with running_server(argv, tmp_path / "serve.log") as base:
        (served,) = [m["id"] for m in json.loads(
            urllib.request.urlopen(base + "/v1/models", timeout=10).read())["data"]]
        chat = post(base + "/v1/chat/completions", {
            "model": served, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}]})
        assert chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] == 8
        pinned_chat = post(base + "/v1/chat/completions", {
            "model": served, "max_tokens": 8, "temperature": 0,
            "streamsink": {"pin": "system", "window_tokens": 32},
            "messages": [{"role": "system", "content": "You keep the lighthouse."},
                         {"role": "user", "content": "Tell me about lighthouses."}]})
        assert pinned_chat["usage"]["completion_tokens"] == 8
        scored = [post(base + "/v1/completions", {
            "model": served, "prompt": tokens, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0, **extra})
            for extra in ({}, {"streamsink": {"pin_tokens": PIN, "window_tokens": PIN_WINDOW}})]
        refusals = [refused(base + path, {"model": served, "max_tokens": 4, **body, **extra})
                    for path, body in (("/v1/completions", {"prompt": tokens}),
                                       ("/v1/chat/completions", {"messages": [
                                           {"role": "user", "content": "Hello."}]}))
                    for extra in ({"streamsink": {"pin_tokens": MAX_PINNED + 1}},
                                  {"streamsink": {"pin": "user"}},
                                  {"streamsink": {"window_tokens": WINDOW + 1}},
                                  {"streamsink": {"pin": "system"}})]
    for reply, reference in zip(scored, refs.all()):
        logprobs = reply["choices"][0]["prompt_logprobs"]
        assert logprobs[0] is None and len(logprobs) == PROMPT_TOKENS
        served_nll = [-entry[str(token)]["logprob"]
                      for entry, token in zip(logprobs[1:], tokens[1:])]
        assert len(served_nll) == len(reference) == PROMPT_TOKENS - 1
        gap = max(abs(a - b) for a, b in zip(served_nll, reference))
        assert gap < 1e-3, gap
    for status, message in refusals:
        assert status == 400 and "streamsink" in message and "\n" not in message, message


def refused(url: str, body: dict) -> tuple[int, str]:
    """(HTTP status, error message) of a request the server must refuse."""
    try:
        post(url, body)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]["message"]
    return 200, ""
