"""`streamsink serve --ray`: two streaming replicas on Ray Serve LLM behind one OpenAI endpoint,
with per-replica metrics on Ray's Prometheus export. One real Ray and one app for the module,
started and stopped here (a tiny random Llama with the default model's tokenizer keeps it cheap).
The last test stops the app with SIGTERM in the middle of a streamed request and checks that
nothing of it is left; another stops a second app while its replicas start."""
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
import urllib.error
import urllib.request

import psutil
import pytest
import tagged
from openai_server import NotReady, ReadyLineServer, free_port

from streamsink.serving.ray_serve import READY_LINE as READY

MAX_MODEL_LEN = 1024
SINK, WINDOW = 4, 252
MAX_PINNED = 128
START_TIMEOUT = 900
API_KEY = "test-key-4b1d"
# No KV budget, as a user starts it: each replica's engine sizes its own pool from its window
# (stock vLLM's CPU worker would size it from the node's free memory, which two replicas
# share). The app runs with --api-key: every OpenAI call below must send it.
APP_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "256",
            "--max-num-seqs", "4", "--enforce-eager"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamsink.serving.cli", *args]


def clean_env(tag: str | None = None) -> dict:
    # This module starts (and stops) its own Ray: no RAY_ADDRESS (tagged_env drops it).
    return tagged.tagged_env(tag or tagged.new_tag(), VLLM_LOGGING_LEVEL="INFO")


def scrape(url: str) -> dict:
    """{(name, frozenset(labels.items())): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by_replica(samples: dict, name: str, **match) -> dict:
    """{ReplicaId: summed value} of one metric (optionally only samples whose labels match)."""
    out: dict = {}
    for (n, labels), value in samples.items():
        labels = dict(labels)
        if n == name and all(labels.get(k) == v for k, v in match.items()):
            out[labels.get("ReplicaId", "")] = out.get(labels.get("ReplicaId", ""), 0) + value
    return out


def served_by(metrics_url: str) -> dict:
    return by_replica(scrape(metrics_url), "ray_vllm_request_success_total")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    model = make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"), sharp=False)
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("ray_serve") / "serve.log"
    log = open(log_path, "w")
    tag = tagged.new_tag()
    server = ReadyLineServer(
        cli("serve", "--ray", "--replicas", "2", "--model", model, "--sink", str(SINK),
            "--window", str(WINDOW), "--max-pinned-tokens", str(MAX_PINNED), "--port", str(port),
            "--metrics-port", str(metrics_port), *APP_ARGS, "--api-key", API_KEY),
        READY, log, clean_env(tag))
    proc = server.proc
    try:
        try:
            api, metrics, replicas = server.wait(START_TIMEOUT)
        except NotReady as exc:
            pytest.fail(f"serve --ray {exc}:\n" + log_path.read_text()[-4000:])
        assert api == f"http://127.0.0.1:{port}/v1"
        assert metrics == f"http://127.0.0.1:{metrics_port}/metrics"
        assert replicas == "2"
        yield {"proc": proc, "api": api, "metrics": metrics, "log": log_path, "tag": tag,
               "model": model}
    finally:
        if proc.poll() is None:
            proc.kill()
        tagged.kill_tagged(tag)
        log.close()


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def client(app):
    from openai import OpenAI

    return OpenAI(base_url=app["api"], api_key=API_KEY, timeout=300, max_retries=0)


def model_id(app) -> str:
    return client(app).models.list().data[0].id


def long_prompt(words: int) -> str:
    return " ".join(f"item{i % 97} of the list" for i in range(words))


def complete(app, prompt: str = "Once upon a time", max_tokens: int = 8) -> int:
    reply = client(app).completions.create(model=model_id(app), prompt=prompt,
                                           max_tokens=max_tokens,
                                           extra_body={"ignore_eos": True})
    return reply.usage.completion_tokens


def test_bad_streamsink_config_refused_before_ray():
    """Refused in the launching process with one line and exit 2, before Ray starts: a value
    the streamsink config rejects, and a window that does not fit the engine's rows (found by
    building the engine config a replica would build)."""
    for extra, reason in (
            (["--window", "0"], "streamsink window_tokens must be >= 1, got 0"),
            (["--window", "2000", "--max-model-len", "1024", "--max-num-batched-tokens", "256"],
             "streamsink needs max_model_len >= 2516")):
        done = subprocess.run(cli("serve", "--ray", "--replicas", "2", *extra),
                              capture_output=True, text=True, timeout=900, env=clean_env())
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [l for l in done.stderr.splitlines() if l.startswith("streamsink: error:")]
        assert len(errors) == 1 and reason in errors[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert "Started a local Ray instance" not in done.stderr + done.stdout
        assert READY.pattern[1:20] not in done.stdout


def test_streamed_completion_past_max_model_len(app):
    """A prompt longer than max_model_len streams back through the OpenAI client (SSE)."""
    stream = client(app).completions.create(
        model=model_id(app), prompt=long_prompt(600), max_tokens=40, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text_chunks, usage = 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            text_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    assert usage.prompt_tokens > MAX_MODEL_LEN
    assert usage.completion_tokens == 40
    assert text_chunks > 1  # streamed, not one final piece


def post(app, body: bytes, key: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(app["api"] + "/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_bad_request_is_4xx_and_key_is_required(app):
    model = model_id(app).encode()
    assert post(app, b'{"model": "%s", "prompt": "hi", "max_tokens": -5}' % model, API_KEY) == 400
    good = b'{"model": "%s", "prompt": "hi", "max_tokens": 2}' % model
    assert post(app, good, None) == 401
    assert post(app, good, "wrong") == 401
    assert post(app, good, API_KEY) == 200


def test_pinned_system_prompt_through_ray(app):
    """A request's streamsink options reach the replicas' engines: a chat pinning its system
    prompt past the window is answered, and its usage tells the pinned prefix through Ray; a pin
    over max_pinned_tokens is a 400, streamed or not."""
    messages = [{"role": "system", "content": "You keep the lighthouse. " * 8},
                {"role": "user", "content": long_prompt(400)}]
    reply = client(app).chat.completions.create(
        model=model_id(app), messages=messages, max_tokens=8,
        extra_body={"ignore_eos": True, "streamsink": {"pin": "system"}})
    assert reply.usage.prompt_tokens > SINK + WINDOW and reply.usage.completion_tokens == 8
    told = reply.usage.model_extra["streamsink"]
    assert told["sink_tokens"] == 0 and 0 < told["pinned_tokens"] <= MAX_PINNED
    assert told["window_tokens"] == WINDOW and told["prompt_outgrew_cache"]
    for stream in (False, True):
        body = json.dumps({"model": model_id(app), "prompt": long_prompt(400), "max_tokens": 2,
                           "stream": stream,
                           "streamsink": {"pin_tokens": MAX_PINNED + 1}}).encode()
        assert post(app, body, API_KEY) == 400, stream


def test_open_host_needs_an_api_key():
    """Beyond loopback without a key: refused at once (one line, exit 2), nothing started."""
    env = clean_env()
    env.pop("STREAMSINK_API_KEY", None)
    done = subprocess.run(cli("serve", "--ray", "--host", "0.0.0.0"), capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "streamsink: error: --host 0.0.0.0 opens the API beyond this machine; give --api-key "
        "KEY (or $STREAMSINK_API_KEY) so clients must authenticate"]


def test_both_replicas_serve_and_export_metrics(app):
    """Concurrent requests (completions and chat) reach both replicas; Ray's metrics export
    carries vLLM's latency histograms and the streamsink numbers per replica."""
    def chat():
        client(app).chat.completions.create(
            model=model_id(app), messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=8)

    deadline = time.time() + 180
    while True:
        threads = [threading.Thread(target=complete, args=(app,)) for _ in range(5)]
        threads.append(threading.Thread(target=chat))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = served_by(app["metrics"])
        if len([r for r, n in served.items() if r and n > 0]) >= 2 or time.time() > deadline:
            break
        time.sleep(2)
    assert len([r for r, n in served.items() if r and n > 0]) == 2, served

    # Gauges are re-exported every second or two: wait for both replicas' values, and for the
    # values after the requests ended (a scrape may still carry one taken while they ran).
    deadline = time.time() + 60
    while True:
        samples = scrape(app["metrics"])
        held = by_replica(samples, "ray_vllm_streamsink_held_blocks")
        if (len(held) >= 2 and not any(held.values())) or time.time() > deadline:
            break
        time.sleep(2)
    replicas = set(served)
    for name in ("ray_vllm_time_to_first_token_seconds_bucket",
                 "ray_vllm_inter_token_latency_seconds_bucket",
                 "ray_vllm_e2e_request_latency_seconds_bucket",
                 "ray_vllm_streamsink_held_blocks", "ray_vllm_streamsink_streams"):
        assert set(by_replica(samples, name)) == replicas, (name, by_replica(samples, name))
    ttft_count = by_replica(samples, "ray_vllm_time_to_first_token_seconds_count")
    assert all(ttft_count[r] > 0 for r in replicas)
    # Nothing is running now: no stream holds blocks on either replica.
    assert all(v == 0 for v in held.values()), held
    # The long prompt of the streaming test ran past the window on one replica: its policy
    # freed blocks (128 tokens each), and the counter says so under that replica's label.
    freed = by_replica(samples, "ray_vllm_streamsink_freed_blocks_total")
    evicted = by_replica(samples, "ray_vllm_streamsink_evicted_tokens_total")
    assert sum(freed.values()) >= 2, freed
    assert {r: v * 128 for r, v in freed.items()} == evicted


def test_serve_gives_its_proxy_time_to_start(app):
    """Serve's controller runs with the local instance's environment (ray_cluster.LOCAL_ENV):
    a proxy slow to start on a busy machine is waited for, not killed."""
    from streamsink.serving.ray_cluster import LOCAL_ENV

    controllers = [p for p in _descendants(app["proc"].pid)
                   if "ServeController" in " ".join(_cmd(p))]
    assert len(controllers) == 1, controllers
    environ = controllers[0].environ()
    assert {name: environ.get(name) for name in LOCAL_ENV} == LOCAL_ENV


def _engine_processes(app) -> list:
    return [p for p in _descendants(app["proc"].pid) if "EngineCore" in " ".join(_cmd(p))]


def _cmd(p) -> list:
    try:
        return p.cmdline() + [p.name()]
    except psutil.Error:
        return []


def _fresh_prompts_round(app, n: int = 3) -> list:
    """n concurrent completions of prompts no replica has seen: the prefix-aware router sends
    an unmatched prompt to the replica holding the least cached text, so every live replica
    gets traffic (an identical prompt would keep following its prefix to one replica). Each
    result is the completion's token count, or the exception a request raised."""
    results = []

    def one():
        try:
            results.append(complete(app, prompt=f"{uuid.uuid4().hex} Once upon a time"))
        except Exception as exc:  # e.g. a request routed to a dead replica
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _prefix_tree_actors(app) -> list:
    return [p for p in _descendants(app["proc"].pid) if "PrefixTreeActor" in " ".join(_cmd(p))]


def test_lost_prefix_tree_is_made_again(app):
    """kill -9 of the actor holding the prefix-aware router's shared tree, as when its node is
    lost while the ingress lives on: new conversations are still answered (Ray's router alone
    would leave them waiting), and the router has made the tree again."""
    complete(app)  # the ingress's router, and with it the tree, exist
    lost = _prefix_tree_actors(app)
    assert len(lost) == 1, [_cmd(p) for p in _descendants(app["proc"].pid)]
    lost[0].kill()
    lost[0].wait(30)
    results = _fresh_prompts_round(app)
    assert results == [8, 8, 8], results
    made = _prefix_tree_actors(app)
    assert len(made) == 1 and made[0].pid != lost[0].pid, [_cmd(p) for p in made]


def test_killed_replica_is_replaced(app):
    """kill -9 of one replica's engine process: the other replica keeps answering, Ray Serve
    starts a replacement, and the replacement serves requests."""
    engines = _engine_processes(app)
    assert len(engines) == 2, [_cmd(p) for p in _descendants(app["proc"].pid)]
    deadline = time.time() + 120
    while len([r for r, n in served_by(app["metrics"]).items() if r and n > 0]) < 2:
        assert time.time() < deadline, f"both replicas never served: {served_by(app['metrics'])}"
        _fresh_prompts_round(app)
        time.sleep(2)
    before = set(served_by(app["metrics"]))
    engines[0].kill()
    answered_meanwhile = 0
    deadline = time.time() + 300
    while time.time() < deadline:
        results = _fresh_prompts_round(app)
        served = served_by(app["metrics"])
        new = {r for r, n in served.items() if r and r not in before and n > 0}
        if new:
            break
        answered_meanwhile += sum(1 for r in results if r == 8)
        time.sleep(2)
    else:
        pytest.fail(f"no replacement replica served within 300 s: {served}")
    assert answered_meanwhile >= 1  # the surviving replica answered while the other was down
    assert len(_engine_processes(app)) == 2


def test_sigterm_mid_request_stops_everything(app):
    """SIGTERM while a request streams: exit 0 within 30 s, and no process the app started is
    left (Ray, replicas, engines)."""
    proc = app["proc"]
    assert any("raylet" in line for line in tagged.tagged_processes(app["tag"]))
    chunks = []

    def stream():
        try:
            for chunk in client(app).completions.create(
                    model=model_id(app), prompt=long_prompt(100), max_tokens=4000, stream=True,
                    extra_body={"ignore_eos": True}):
                chunks.append(chunk)
        except Exception:
            pass  # the app went away mid-stream: expected

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    tagged.wait_for(lambda: len(chunks) > 10, 120, "streamed tokens", proc)
    took = tagged.stop_and_time(proc, signal.SIGTERM, timeout_s=120)
    assert proc.returncode == 0
    assert took < 30, took
    assert tagged.leftovers(app["tag"]) == []


def test_sigterm_while_replicas_start(tmp_path):
    """A second app, stopped while Ray Serve starts its replicas: exit 0 within 30 s, nothing
    left. (Runs after the first app is gone: the module's last test.)"""
    from tiny_models import make_tiny_llama_with_tokenizer

    model = make_tiny_llama_with_tokenizer(tmp_path / "model", sharp=False)
    tag, log = tagged.new_tag(), tmp_path / "serve.log"
    proc = tagged.start(["serve", "--ray", "--model", model, "--port", str(free_port()),
                         "--window", str(WINDOW), *APP_ARGS], tag, log)
    try:
        tagged.wait_for(lambda: any("ServeReplica" in line or "EngineCore" in line
                                    for line in tagged.tagged_processes(tag)),
                        600, "a starting replica", proc, log)
        took = tagged.stop_and_time(proc, signal.SIGTERM, timeout_s=120)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert took < 30, took
        assert tagged.leftovers(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        tagged.kill_tagged(tag)
