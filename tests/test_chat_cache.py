"""A conversation through `streamsink serve`'s OpenAI chat endpoint (the default model and its
chat template, history past S+W): from the second turn on, the prompt's history comes from the
prefix cache (usage.prompt_tokens_details.cached_tokens), and every turn's answer and
log-probabilities equal the same request computed without reading the cache (a fresh
cache_salt, so no block of it can hit)."""
import json
import sys
import urllib.request
import uuid

import pytest
from openai_server import get, metric, running_server

SINK, WINDOW = 4, 124            # C = 128: the history outgrows it in the second turn
BLOCK = 32                       # small blocks: short turns still fill some
TURNS, ANSWER_TOKENS = 3, 24
TOLERANCE = 1e-3


def user_turn(t: int) -> str:
    topics = ["lighthouses", "bread baking", "the moons of Jupiter", "chess openings"]
    return (f"Question {t + 1}. Please tell me, in a few sentences, something interesting about "
            f"{topics[t % len(topics)]}. Mention where it comes from, why people care about it, "
            f"and one surprising detail that most people do not know. Keep it friendly and "
            f"avoid lists; a short paragraph is perfect.")


def post(url: str, body: dict, timeout: float = 1800) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # Eager: what is tested is the cache, not the compiler's warm-up. fp32 weights: in bfloat16
    # (auto's choice on some CPUs) a cached prefix and its recomputation in other chunks round
    # differently, far beyond TOLERANCE, which would hide a real cache fault in the noise.
    with running_server([sys.executable, "-m", "streamsink.serving.cli", "serve", "--sink",
                         str(SINK), "--window", str(WINDOW), "--max-num-seqs", "4",
                         "--enforce-eager", "--block-size", str(BLOCK), "--weights", "fp32"],
                        log) as base:
        model = json.loads(get(base + "/v1/models"))["data"][0]["id"]
        yield base, model


def ask(base, model, messages, salt=None):
    body = {"model": model, "messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0,
            "logprobs": True, "top_logprobs": 1}
    if salt:
        body["cache_salt"] = salt
    reply = post(base + "/v1/chat/completions", body)
    choice = reply["choices"][0]
    return (choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]],
            reply["usage"])


@pytest.fixture(scope="module")
def conversation(server):
    base, model = server
    messages, turns = [], []
    for t in range(TURNS):
        messages.append({"role": "user", "content": user_turn(t)})
        cached = ask(base, model, messages)
        uncached = ask(base, model, messages, salt=uuid.uuid4().hex)
        turns.append((cached, uncached))
        messages.append({"role": "assistant", "content": cached[0]})
    return turns


def test_history_comes_from_the_cache(conversation):
    usage = [cached[2] for cached, _ in conversation]
    assert usage[0]["prompt_tokens_details"]["cached_tokens"] == 0
    for t in range(1, TURNS):
        previous = usage[t - 1]["prompt_tokens"]
        got = usage[t]["prompt_tokens_details"]["cached_tokens"]
        # At least the previous prompt (a block of alignment less); the answer too where its
        # re-tokenized text gives back the generated ids.
        assert got >= previous - BLOCK, (t, usage)
    assert usage[-1]["prompt_tokens"] > SINK + WINDOW + BLOCK
    for _, uncached in conversation:
        assert uncached[2]["prompt_tokens_details"]["cached_tokens"] == 0


def test_answers_equal_the_uncached_computation(conversation):
    for t, (cached, uncached) in enumerate(conversation):
        assert cached[0] == uncached[0], t
        assert len(cached[1]) == len(uncached[1]) == ANSWER_TOKENS
        assert max(abs(a - b) for a, b in zip(cached[1], uncached[1])) < TOLERANCE, t


def test_cache_metrics(server, conversation):
    base, _ = server
    text = get(base + "/metrics")
    assert metric(text, "vllm:prefix_cache_hits_total") > 0
    # The answers' decodes shadowed cached blocks: clean copies were made.
    assert metric(text, "vllm:streamsink_cache_shadow_copies_total") > 0
    assert metric(text, "vllm:streamsink_cache_hit_copies_total") == 0   # one session at a time
