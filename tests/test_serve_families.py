"""`streamsink serve` with families beyond Llama, started as a user starts it (`--model <dir>`):
Qwen2 (q/k/v biases) and BLOOM (ALiBi, no RoPE). Each server answers a chat request, and scores
a prompt several times S+W long (chunked prefill past the cache) exactly: the prompt
log-probabilities it returns over HTTP equal the reference's streaming NLLs."""
import json
import sys
import urllib.request

import pytest
import tiny_models
from conftest import References, random_tokens
from openai_server import running_server

SINK, WINDOW = 4, 60
PROMPT_TOKENS = 300  # ~5 x (S + W): several evictions, several prefill chunks of 64
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
    refs = References([(model, tokens, SINK, WINDOW)])  # computed while the server starts
    argv = [sys.executable, "-m", "streamsink.serving.cli", "serve", "--model", model,
            "--sink", str(SINK), "--window", str(WINDOW), "--enforce-eager",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "64"]
    with running_server(argv, tmp_path / "serve.log") as base:
        (served,) = [m["id"] for m in json.loads(
            urllib.request.urlopen(base + "/v1/models", timeout=10).read())["data"]]
        chat = post(base + "/v1/chat/completions", {
            "model": served, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about lighthouses."}]})
        assert chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] == 8
        scored = post(base + "/v1/completions", {
            "model": served, "prompt": tokens, "max_tokens": 1, "temperature": 0,
            "prompt_logprobs": 0})
    logprobs = scored["choices"][0]["prompt_logprobs"]
    assert logprobs[0] is None and len(logprobs) == PROMPT_TOKENS
    served_nll = [-entry[str(token)]["logprob"] for entry, token in zip(logprobs[1:], tokens[1:])]
    reference = refs[0]
    assert len(served_nll) == len(reference) == PROMPT_TOKENS - 1
    gap = max(abs(a - b) for a, b in zip(served_nll, reference))
    assert gap < 1e-3, gap
