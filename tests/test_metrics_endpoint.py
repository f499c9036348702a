"""The streaming KV metrics on /metrics of a real vLLM OpenAI server (`streamsink serve`, the
engine core in its own process), started as the README gives the command: no KV budget, step
size or max_model_len given, on a machine whose memory holds page cache — the defaults must fit
(the engine runs eager and for 8 streams here, to keep the suite short)."""
import json
import os
import sys
import urllib.request

import pytest
from openai_server import get, metric, running_server

# SmolLM2's context, the default max_model_len of `streamsink serve`.
MAX_MODEL_LEN = 8192
GENERATED = 48
# The README's command, `streamsink serve` (a free port is added instead of 8000), with the
# engine eager (no first-start compilation) and room for 8 streams: the suite's time budget.
README_SERVE = ["serve", "--enforce-eager", "--max-num-seqs", "8"]
SHARED_BOOK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "katrine-14263.txt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    # `streamsink serve` runs vLLM's own OpenAI server module with a streamsink config.
    with running_server([sys.executable, "-m", "streamsink.serving.cli", *README_SERVE],
                        log) as base:
        # The README's requests name the model by its short default name.
        assert json.loads(get(base + "/v1/models"))["data"][0]["id"] == "SmolLM2-135M-Instruct"
        yield base, "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not os.path.exists(SHARED_BOOK), reason="needs ../shared/data")
def test_stream_past_max_model_len_and_policy_metrics(server):
    """A completion whose prompt alone is longer than max_model_len streams through; the
    policy's numbers appear on /metrics beside vLLM's own."""
    base, model = server
    before = get(base + "/metrics")
    assert metric(before, "vllm:streamsink_freed_blocks_total") == 0
    with open(SHARED_BOOK, encoding="utf-8") as f:
        prompt = f.read()[:40_000]  # ~9,000 tokens: past max_model_len and the 1024-token cache
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": GENERATED,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        reply = json.loads(r.read())
    prompt_tokens = reply["usage"]["prompt_tokens"]
    assert prompt_tokens > MAX_MODEL_LEN
    assert reply["usage"]["completion_tokens"] == GENERATED
    after = get(base + "/metrics")
    freed = metric(after, "vllm:streamsink_freed_blocks_total")
    # At its end a stream of prompt + GENERATED tokens keeps at most the sink block and the blocks of
    # its last S+W-1 tokens and the next one: ceil(4/128) + ceil(1024/128) + 1 = 10.
    assert freed >= -(-(prompt_tokens + GENERATED) // 128) - 10
    assert metric(after, "vllm:streamsink_evicted_tokens_total") == freed * 128
    assert metric(after, "vllm:streamsink_held_blocks") == 0
    assert metric(after, "vllm:streamsink_streams") == 0
    # Published once vLLM has returned the blocks to the pool: the finished
    # request's blocks count as free, cached or not.
    assert metric(after, "vllm:streamsink_pool_used_blocks") == 0
    # vLLM's own metrics are still served next to ours.
    assert metric(after, "vllm:generation_tokens_total") >= GENERATED
