"""`streamsink loadtest` end to end: the command starts a streaming server (a tiny random Llama
with the default model's tokenizer: an OpenAI server needs a real one) and a real Prometheus,
runs a ~30-second load in which 30% of the requests (by a seeded plan) hang up mid-stream, and
stops everything again.

One run of the command serves the whole module (module-scoped fixture); the assertions read its
report, its dashboard and the process table."""
import json
import os
import subprocess
import sys

import pytest

from streamsink.serving.loadtest.prometheus import find_prometheus

pytestmark = pytest.mark.skipif(find_prometheus() is None,
                                reason="prometheus not installed (scripts/setup.sh installs it)")

# C = 64 tokens; a stream of 448 tokens (3.5 blocks of 128) outgrows it by two blocks, which
# the policy frees while it runs (the first block, holding the sinks, stays).
SINK, WINDOW = 4, 60
PROMPT, OUTPUT = 320, 128
DURATION = 30


def _cmd(out, *extra):
    return [sys.executable, "-m", "streamsink.serving.cli", "loadtest", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def loadtest(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    model = make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"), sharp=False)
    out = tmp_path_factory.mktemp("loadtest")
    done = subprocess.run(
        _cmd(out, "--model", model, "--duration", str(DURATION), "--concurrency", "4",
             "--requests", "200",
             "--prompt-tokens", str(PROMPT), "--output-tokens", str(OUTPUT),
             "--abort-fraction", "0.3", "--seed", "1",
             "--sink", str(SINK), "--window", str(WINDOW),
             "--kv-cache-bytes", str(160 << 20), "--max-num-batched-tokens", "256",
             "--max-model-len", "1024", "--max-num-seqs", "8",
             # compilation buys nothing for a 30-second load and costs start-up time
             "--server-arg=--enforce-eager", "--no-progress"),
        capture_output=True, text=True, timeout=900)
    report_path = out / "report.json"
    assert report_path.exists(), f"no report (rc {done.returncode}):\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    with open(report_path) as f:
        report = json.load(f)
    return done, report, out


def test_exit_and_summary_line(loadtest):
    done, report, _out = loadtest
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split())
    assert list(fields) == ["requests", "ok", "errors", "aborted", "tokens_per_s",
                            "ttft_p99_ms", "itl_p99_ms", "held_blocks_after"]
    assert last == report["summary_line"]
    # Every stream was released when the load drained: aborted clients included.
    assert fields["held_blocks_after"] == "0"
    assert report["runs"][0]["drained"] is True


def test_client_counts_add_up(loadtest):
    _done, report, _out = loadtest
    c = report["runs"][0]["client"]
    assert c["requests"] == c["ok"] + c["errors"] + c["aborted"]
    assert c["errors"] == 0 and c["http_5xx"] == 0, c["error_samples"]
    # The first four requests always start; with seed 1 the first and third are planned to
    # hang up (after 109 and 16 tokens), the other two to complete.
    assert c["ok"] >= 2 and c["aborted_planned"] >= 2
    # Completed streams got every token they asked for; aborted ones hung up before the end.
    assert c["ttft_ms"]["count"] == c["ok"]
    # Streamed: one chunk a token, except that vLLM's API server merges the tokens that arrive
    # while it is busy (partial UTF-8 characters, or a loaded machine: 10% merged when this ran
    # beside another test module), so at least half of the gaps are seen, never more than exist.
    assert 0.5 * c["ok"] * (OUTPUT - 1) <= c["itl_ms"]["count"] <= c["ok"] * (OUTPUT - 1)
    assert c["tokens_received"] >= c["ok"] * OUTPUT
    assert c["tokens_per_s"] > 0


def test_prometheus_series(loadtest):
    """Prometheus scraped the server during the load: the series are not empty, and they show
    what happened (requests ran, streams held blocks and the policy freed some)."""
    _done, report, _out = loadtest
    series = report["runs"][0]["series"]
    for key in ("running", "waiting", "kv_usage_pct", "held_blocks", "freed_blocks_per_s",
                "gen_tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms", "ttft_p99_ms"):
        assert series[key], f"empty series {key}"
    peak = lambda key: max(v for _t, v in series[key])  # noqa: E731
    assert peak("running") >= 1
    assert peak("held_blocks") >= 2
    assert peak("freed_blocks_per_s") > 0
    assert peak("gen_tokens_per_s") > 0
    # The load started at t=0: Prometheus saw the held blocks go back to zero at the end.
    assert series["held_blocks"][-1][1] == 0


def test_dashboard_written(loadtest):
    _done, report, out = loadtest
    png = out / "dashboard.png"
    assert png.exists() and png.stat().st_size > 20_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_everything_stopped(loadtest):
    """Prometheus and the server (its whole process group) are gone after the command."""
    _done, report, _out = loadtest
    procs = report["processes"]
    assert {p["what"] for p in procs} == {"streamsink server", "streamsink prometheus"}
    for p in procs:
        with pytest.raises(ProcessLookupError):
            if p["group"]:
                os.killpg(p["pid"], 0)
            else:
                os.kill(p["pid"], 0)


def test_bad_input_is_one_line(tmp_path):
    done = subprocess.run(_cmd(tmp_path, "--abort-fraction", "1.5"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "streamsink: error: --abort-fraction must be within [0, 1]"]


def test_client_accounting_against_a_fake_server():
    """The load client alone, against a tiny SSE server in this process that streams
    `max_tokens` chunks and answers every fifth request with HTTP 503: open loop (Poisson),
    planned aborts, 5xx counted as errors, and counts that add up."""
    import asyncio
    import json as _json
    import threading

    from aiohttp import web

    from streamsink.serving.loadtest import client as load_client
    from streamsink.serving.network import free_port

    seen = []

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if len(seen) % 5 == 0:
            return web.Response(status=503, text="overloaded")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(body["max_tokens"]):
            chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
            await resp.write(f"data: {_json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.002)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(web.Application())
    runner.app.router.add_post("/v1/completions", completions)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        spec = load_client.LoadSpec(
            api_url=f"http://127.0.0.1:{port}/v1", model="m", prompts=[("hello", 1)],
            output_tokens=20, requests=20, duration_s=60, rate=50.0, abort_fraction=0.3,
            seed=1, progress=False)
        result = load_client.run_load(spec)
        summary = load_client.summarize(result, {"tpot": 1000.0})
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    assert len(seen) == summary["requests"] == 20, {k: v for k, v in summary.items() if "_ms" not in k}
    assert summary["http_5xx"] == 4 and summary["errors"] == 4
    assert summary["ok"] + summary["errors"] + summary["aborted"] == 20
    planned = [r for r in result.records if r.abort_after is not None and r.status == 200]
    assert summary["aborted_planned"] == len(planned) >= 1
    for r in planned:  # each hung up right after its planned token
        assert r.outcome == "aborted" and r.tokens == r.abort_after
    for r in result.records:
        if r.outcome == "ok":
            assert r.tokens == 20 and len(r.itl) == 19
    assert summary["goodput_rps"] is not None and summary["goodput_rps"] > 0
