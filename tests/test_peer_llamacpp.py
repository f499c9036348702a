"""The llama.cpp comparison (benchmarks/peer_llamacpp.py).

- The load test's Prometheus queries read llama-server's own series (`llamacpp:...`): a stand-in
  /metrics endpoint in llama-server's format, scraped by a real Prometheus.
- The benchmark's --quick mode end to end, only where llama-server is already built in the cache
  (building it takes long; `make bench-peers` does it) and STREAMSINK_PEER_SMOKE=1 asks for it
  (it takes longer than the whole rest of the suite allows): every stream of every system completes,
  both systems run the same weights, llama-server refuses a prompt longer than its slot, and with
  nothing evicted yet both systems score the book's tokens alike (to fp32 arithmetic).
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import ROOT

from streamsink.serving.loadtest.prometheus import PrometheusServer, find_prometheus

BENCH = os.path.join(ROOT, "benchmarks")
needs_prometheus = pytest.mark.skipif(find_prometheus() is None,
                                      reason="prometheus not installed (scripts/setup.sh)")

# What llama-server's /metrics answers (the pinned version's names and types).
LLAMACPP_METRICS = """# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total {predicted}
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 3
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 7
"""


@pytest.fixture
def llamacpp_metrics_endpoint():
    scrapes = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            scrapes["n"] += 1
            body = LLAMACPP_METRICS.format(predicted=100 * scrapes["n"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


@needs_prometheus
def test_loadtest_queries_read_llama_server_series(llamacpp_metrics_endpoint):
    import time

    from streamsink.serving.loadtest import SERIES

    exprs = {key: expr("llama") for key, _title, expr in SERIES}
    with PrometheusServer({"llama": llamacpp_metrics_endpoint}, interval_s=1) as prom:
        assert prom.wait_scraped("llama", timeout_s=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not prom.query(exprs["gen_tokens_per_s"]):
            time.sleep(0.5)  # a rate needs two scrapes
        assert prom.query(exprs["running"]) == 3
        assert prom.query(exprs["waiting"]) == 2
        # The counter is found (its rate is positive: 100 tokens a scrape).
        assert prom.query(exprs["gen_tokens_per_s"]) > 0
        # A series llama-server does not have stays empty instead of matching something else.
        assert prom.query(exprs["held_blocks"]) is None


def _llama_server_cached() -> bool:
    sys.path.insert(0, BENCH)
    try:
        import llamacpp_build
    finally:
        sys.path.remove(BENCH)
    return llamacpp_build.is_built()


@pytest.mark.skipif(not _llama_server_cached(),
                    reason="llama-server is not built in the cache (make bench-peers builds it; "
                           "about half an hour on 2 cores)")
@pytest.mark.skipif(os.environ.get("STREAMSINK_PEER_SMOKE") != "1",
                    reason="the quick comparison takes 10+ minutes: set STREAMSINK_PEER_SMOKE=1")
@needs_prometheus
def test_quick_comparison(tmp_path):
    env = dict(os.environ, STREAMSINK_BENCH_RESULTS=str(tmp_path))
    done = subprocess.run([sys.executable, os.path.join(BENCH, "peer_llamacpp.py"), "--quick"],
                          capture_output=True, text=True, timeout=3600, env=env, cwd=BENCH)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result_file,) = (tmp_path / "peer_llamacpp").glob("*-quick.json")
    result = json.loads(result_file.read_text())
    args = result["args"]

    # The same weights: the converted F32 GGUF is the shipped Q4_1 GGUF, dequantized.
    assert result["model"]["f32_gguf_vs_q4_dequantized"]["max_abs_diff"] == 0.0

    # Every system served every level, every stream to its last token.
    names = {s["name"] for s in result["systems"]}
    assert {(r["system"], r["streams"]) for r in result["load"]["runs"]} == \
        {(n, s) for n in names for s in args["streams"]}
    for run in result["load"]["runs"]:
        s = run["summary"]
        assert s["ok"] == s["requests"] == run["streams"], (run["system"], s["error_samples"])
        assert s["tokens_received"] >= run["streams"] * args["output_tokens"]
        assert run["memory"]["peak_rss_mib"] > 0
        # llama-server's prompts fit its slot; ours is the whole prompt.
        slot = args["sink"] + args["window"]
        if run["system"].startswith("llamacpp"):
            assert run["prompt_tokens"] < slot
            assert "--context-shift" in run["server_argv"]
        else:
            assert run["prompt_tokens"] == args["prompt_tokens"] > slot

    # A prompt longer than the slot is refused, not streamed through.
    for probe in result["long_prompt_probe"].values():
        assert probe["plain"]["http_status"] >= 400
        assert "context" in probe["plain"]["body"]

    # One stream's token times, past the point where its cache is full.
    for trace in result["load"]["traces"].values():
        assert len(trace["token_times_s"]) >= args["output_tokens"] - 2

    # Perplexity: nothing evicted yet -> both systems score alike, to the two engines' fp32
    # arithmetic (docs/peer_llamacpp.md: a per-token gap of a few 1e-3 on average, up to several
    # 1e-2 on single tokens, growing with the position); a misaligned token or position would
    # be off by whole nats. With eviction every mode yields a finite perplexity.
    ppl = result["ppl"]
    for label, agreement in ppl["agreement"].items():
        assert agreement["tokens"] > 0, label
        assert agreement["mean_abs_diff"] < 1e-2, (label, agreement)
        assert agreement["max_abs_diff"] < 0.2, (label, agreement)
    for label, r in ppl["results"].items():
        if "ppl" in r and "llama-perplexity" not in label:
            assert r["tokens"] == args["ppl_tokens"] - 1, label
            assert 1.0 < r["ppl"] < 1e4, label
