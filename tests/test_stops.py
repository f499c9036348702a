"""SIGTERM at any moment stops a launcher and everything it started within 30 s, exit 0:
`streamsink serve` while its engine starts and in the middle of a streamed request,
`streamsink loadtest` while its server starts and in the middle of the load (against the serve
test's running server, --target: its Prometheus and client stop, the server is not its to stop),
`streamsink batch` while Ray and its engines start. (`serve --ray` mid-request and batch mid-work
are in test_ray_serve.py and test_batch.py, which run those apps anyway.) After each stop the
process table holds nothing that carries the run's tag (tagged.py)."""
import json
import signal
import threading
import urllib.request

import pytest

import tagged
from openai_server import free_port, get

STOP_WITHIN_S = 30
SERVE_ARGS = ["--max-model-len", "1024", "--max-num-batched-tokens", "256", "--max-num-seqs",
              "2", "--enforce-eager", "--window", "252"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"), sharp=False)


def engine_started(tag):
    return lambda: any("EngineCore" in line for line in tagged.tagged_processes(tag))


def assert_stopped(proc, tag, log, sig=signal.SIGTERM):
    try:
        took = tagged.stop_and_time(proc, sig, timeout_s=STOP_WITHIN_S + 30)
        left = tagged.leftovers(tag)
        assert proc.returncode == 0, open(log).read()[-3000:]
        assert took < STOP_WITHIN_S, took
        assert not left, left
    finally:
        if proc.poll() is None:
            proc.kill()
        tagged.kill_tagged(tag)


def test_serve_stops_while_its_engine_starts(model, tmp_path):
    tag, log = tagged.new_tag(), tmp_path / "serve.log"
    proc = tagged.start(["serve", "--model", model, "--port", str(free_port()), *SERVE_ARGS],
                        tag, log)
    tagged.wait_for(engine_started(tag), 300, "engine process", proc, log)
    assert_stopped(proc, tag, log)


def test_loadtest_stops_while_its_server_starts(model, tmp_path):
    from streamsink.serving.loadtest.prometheus import find_prometheus

    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make setup installs it as root)")
    tag, log = tagged.new_tag(), tmp_path / "loadtest.log"
    proc = tagged.start(["loadtest", "--out", str(tmp_path / "out"), "--model", model,
                         "--requests", "4", "--concurrency", "2", "--prompt-tokens", "32",
                         "--output-tokens", "400", "--max-model-len", "1024",
                         "--max-num-batched-tokens", "256", "--max-num-seqs", "2",
                         "--server-arg=--enforce-eager", "--no-progress"], tag, log)
    tagged.wait_for(engine_started(tag), 300, "server engine", proc, log)
    assert_stopped(proc, tag, log)


def test_batch_stops_while_ray_and_engines_start(model, tmp_path):
    tag, log = tagged.new_tag(), tmp_path / "batch.log"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": "Hello there"}) + "\n"
                           for i in range(4)))
    proc = tagged.start(["batch", "--input", str(inp), "--output", str(tmp_path / "out.jsonl"),
                         "--model", model, *SERVE_ARGS], tag, log)
    tagged.wait_for(lambda: any("raylet" in line for line in tagged.tagged_processes(tag)),
                    300, "Ray", proc, log)
    assert_stopped(proc, tag, log)


@pytest.fixture(scope="module")
def running(model, tmp_path_factory):
    """One `streamsink serve`, up and answering, for the mid-work tests below (the last of them
    stops it)."""
    tag, port = tagged.new_tag(), free_port()
    log = tmp_path_factory.mktemp("running") / "serve.log"
    proc = tagged.start(["serve", "--model", model, "--port", str(port), *SERVE_ARGS], tag, log)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            get(base + "/health", timeout=2)
            return True
        except OSError:
            return False

    try:
        tagged.wait_for(healthy, 600, "/health", proc, log)
        yield {"proc": proc, "tag": tag, "log": log, "base": base,
               "model": json.loads(get(base + "/v1/models"))["data"][0]["id"]}
    finally:
        if proc.poll() is None:
            proc.kill()
        tagged.kill_tagged(tag)


def test_loadtest_stops_mid_load(running, tmp_path):
    from streamsink.serving.loadtest.prometheus import find_prometheus

    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make setup installs it as root)")
    tag, log = tagged.new_tag(), tmp_path / "loadtest.log"
    proc = tagged.start(["loadtest", "--out", str(tmp_path / "out"), "--target",
                         running["base"], "--requests", "4", "--concurrency", "2",
                         "--prompt-tokens", "32", "--output-tokens", "2000", "--no-progress"],
                        tag, log)
    tagged.wait_for(lambda: "] load:" in open(log).read(), 600, "the load", proc, log)
    assert any("prometheus" in line for line in tagged.tagged_processes(tag))
    assert_stopped(proc, tag, log)
    assert running["proc"].poll() is None  # --target: the server was not the load test's


def test_serve_stops_mid_request(running):
    proc, tag, log, base = running["proc"], running["tag"], running["log"], running["base"]
    chunks = []
    body = json.dumps({"model": running["model"], "prompt": "Once upon a time",
                       "max_tokens": 4000, "stream": True, "ignore_eos": True}).encode()

    def stream():
        request = urllib.request.Request(base + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                for line in r:
                    chunks.append(line)
        except OSError:
            pass  # the server went away mid-stream: expected

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    tagged.wait_for(lambda: len(chunks) > 20, 120, "streamed tokens", proc, log)
    assert_stopped(proc, tag, log)
    reader.join(30)
