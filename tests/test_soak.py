"""benchmarks/soak.py: its checks and its report without a server (seconds), its clients
against a stub OpenAI server in this process (seconds), and the soak itself, shortened: a
streaming server on a tiny random Llama (the default model's tokenizer) with a real Prometheus,
the same mixed load and the same end checks for a few minutes, the windows scaled down."""
import asyncio
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import soak  # noqa: E402


def record(outcome="ok", status=200, abort_reason="", tokens=3, start=0.0, ttft=0.1, itl=()):
    from streamsink.serving.loadtest.client import RequestRecord

    return RequestRecord(index=0, prompt_len=0, outcome=outcome, status=status, tokens=tokens,
                         abort_reason=abort_reason, start=start, ttft=ttft, itl=list(itl))


ARGS = soak.parse_args(["--duration", "100", "--warmup", "10", "--window-s", "30"])
GOOD = [("chat", record()), ("long", record("aborted", abort_reason="planned")),
        ("windowed", record("aborted", abort_reason="deadline")),
        ("bad:unknown_model", record("refused", status=404))]
FLAT_RSS = [(t, 1000.0 + (t % 7)) for t in range(0, 101, 5)]


def evaluate(records=GOOD, drained=True, after=None, rss=FLAT_RSS, tps=None, tracebacks=0):
    after = {"held_blocks": 0, "pool_used_blocks": 0} if after is None else after
    tps = {"first": 100.0, "last": 95.0} if tps is None else tps
    checks = soak.evaluate(ARGS, records, {}, drained, after, rss, tps, tracebacks)
    return {c["name"]: c for c in checks}


def failing(**kwargs) -> set:
    return {name for name, c in evaluate(**kwargs).items() if not c["ok"]}


def test_checks_pass_on_a_clean_run():
    checks = evaluate()
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["rss_growth"]["value"]["growth"] == pytest.approx(0.0)
    assert checks["tokens_per_s"]["value"]["change"] == pytest.approx(-0.05)


def test_each_check_fails_on_its_own_fault():
    assert failing(records=GOOD + [("chat", record("error", status=500))]) == \
        {"answered", "no_errors"}
    assert failing(records=GOOD + [("chat", record("error", status=None))]) == \
        {"answered", "no_errors"}
    assert failing(records=GOOD + [("bad:malformed_json", record("error", status=200))]) == \
        {"bad_refused"}
    assert failing(records=GOOD + [("bad:x", record("error", status=503))]) == \
        {"bad_refused", "no_errors"}
    assert failing(records=GOOD[:3]) == {"bad_refused"}            # no bad request sent
    assert failing(tracebacks=1) == {"no_errors"}
    assert failing(drained=False) == {"drained"}
    assert failing(after={"held_blocks": 0, "pool_used_blocks": 8}) == {"pool_used_blocks"}
    assert failing(after={"held_blocks": 3, "pool_used_blocks": 3}) == \
        {"held_blocks", "pool_used_blocks"}
    assert failing(after={}) == {"held_blocks", "pool_used_blocks"}  # no such metric: unknown
    # RSS: the first window after the warm-up against the last window of the load.
    leak = [(t, 1000.0 + 2 * t) for t in range(0, 101, 5)]         # 1,080 -> 1,200 MiB
    assert failing(rss=leak) == {"rss_growth"}
    assert failing(rss=[(t, v) for t, v in leak if t < 50]) == {"rss_growth"}  # no last samples
    assert failing(tps={"first": 100.0, "last": 89.0}) == {"tokens_per_s"}
    assert failing(tps={"first": 100.0, "last": 111.0}) == {"tokens_per_s"}
    assert failing(tps={"first": None, "last": 100.0}) == {"tokens_per_s"}


def test_outcomes_and_client_tokens():
    counts = soak.outcomes(GOOD)
    assert counts["chat"]["ok"] == 1 and counts["long"]["aborted_planned"] == 1
    assert counts["windowed"]["aborted_deadline"] == 1 and counts["bad"]["refused"] == 1
    rec = record(start=1.0, ttft=0.5, itl=[0.25, 0.25, 9.0])
    assert soak.token_times(rec) == [1.5, 1.75, 2.0, 11.0]
    assert soak.client_tokens_per_s([("long", rec)], 10.0) == [[0.0, 0.3], [10.0, 0.1]]


def test_refusals_are_one_line():
    done = subprocess.run([sys.executable, os.path.join(BENCH, "soak.py"), "--duration", "60"],
                          capture_output=True, text=True, timeout=120, cwd=BENCH)
    assert done.returncode == 2
    assert done.stderr.strip() == \
        "soak: error: --duration must hold --warmup and two windows (--window-s)"


def fake_result(tmp_path, passed=True):
    """A result as soak.py writes it, through the results layout."""
    import result_files

    checks = evaluate(after={"held_blocks": 0, "pool_used_blocks": 0 if passed else 5})
    series = {key: [[0.0, 1.0], [60.0, 2.0]] for key, _t in soak.PANELS}
    payload = {"duration_s": 100, "warmup_s": 10, "window_s": 30, "load_s": 104.2,
               "drain_s": 3.1, "checks": list(checks.values()),
               "passed": all(c["ok"] for c in checks.values()),
               "outcomes": soak.outcomes(GOOD), "cached_share": {"chat": 0.8, "pinned": 0.9},
               "series": series}
    return result_files.write("soak", payload, ARGS, root=str(tmp_path))


@pytest.mark.parametrize("passed", [True, False])
def test_report_renders_a_result(tmp_path, passed):
    from reports import soak as soak_report
    from reports.base import Doc, Result

    path = fake_result(tmp_path, passed)
    results = {"soak": Result.from_file("soak", path)}
    text = soak_report.markdown(results, Doc(base="../", img="img/"))
    assert "| pool_used_blocks |" in text and "![" in text
    assert ("All checks passed" in text) == passed and ("**no**" in text) != passed
    img = tmp_path / "img"
    img.mkdir()
    assert soak_report.images(results, str(img)) == ["soak.png"]
    assert (img / "soak.png").stat().st_size > 10_000


def test_report_without_a_result():
    from reports import soak as soak_report
    from reports.base import Doc

    assert soak_report.markdown({}, Doc(base="../", img="img/")) == \
        "*No result recorded for `soak` yet.*"
    assert soak_report.images({}, "unused") == []


# ------------------------------------------------------------------ the clients, stub server

class Stub:
    """An OpenAI server's streaming in miniature (aiohttp, loopback, this process): tokens
    "t0 t1 ..." as server-sent events, usage at the end; refusals as vLLM gives them."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.hangups = 0

    async def handle(self, request):
        from aiohttp import web

        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": "bad JSON"}, status=400)
        self.bodies.append(body)
        options = body.get("streamsink") or {}
        if body.get("model") != "stub" or (body.get("max_tokens") or 0) < 1 or \
                set(options) - {"pin", "pin_tokens", "window_tokens"} or \
                options.get("window_tokens", 0) > ARGS.window or \
                options.get("pin_tokens", 0) > ARGS.max_pinned_tokens:
            return web.json_response({"error": "refused"}, status=400)
        chat = request.path.endswith("/chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(data):
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())

        try:
            if chat:
                await send({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
            for i in range(body["max_tokens"]):
                piece = f"t{i} "
                await send({"choices": [{"delta": {"content": piece}} if chat
                                        else {"text": piece}]})
                await asyncio.sleep(0.001)
            await send({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens":
                                                 body["max_tokens"],
                                                 "prompt_tokens_details": {"cached_tokens": 4}}})
            await resp.write(b"data: [DONE]\n\n")
        except (Exception, asyncio.CancelledError):  # the client hung up
            self.hangups += 1
        return resp


def test_clients_against_a_stub_server():
    """Every kind of client runs, chats go on from what was streamed (a dropped answer as far
    as it got), drops hang up, and every bad request is refused."""
    from aiohttp import web

    stub = Stub()
    args = soak.parse_args(["--duration", "3", "--warmup", "0", "--window-s", "1",
                            "--bad-every", "0.2", "--answer-tokens", "12",
                            "--long-tokens", "40", "--windowed-tokens", "20",
                            "--drain-timeout", "10"])

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", stub.handle)
        app.router.add_post("/v1/chat/completions", stub.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        texts = {"user": [("hello", 1), ("there", 1)], "prompt": [("a prompt", 2)],
                 "system": [("be brief", 2)]}
        load = soak.Load(args, f"http://127.0.0.1:{port}/v1", "stub", texts)

        async def quiet(_load):
            await asyncio.sleep(3600)

        try:
            await load.run(quiet)
        finally:
            await runner.cleanup()
        return load

    load = asyncio.run(main())
    counts = soak.outcomes(load.records)
    assert set(counts) == {"chat", "pinned", "long", "windowed", "bad"}
    for kind in ("chat", "pinned", "long", "windowed"):
        assert counts[kind]["error"] == 0, [r.error for k, r in load.records if k == kind]
    assert counts["bad"]["refused"] == counts["bad"]["requests"] >= len(soak.BAD_KINDS)
    assert {k for k, _r in load.records if k.startswith("bad:")} == \
        {f"bad:{k}" for k in soak.BAD_KINDS}
    dropped = [r for _k, r in load.records if r.abort_reason == "planned"]
    assert dropped and all(r.tokens == r.abort_after for r in dropped)
    ok = [r for k, r in load.records if r.outcome == "ok"]
    assert all(r.tokens == r.usage["completion_tokens"] for r in ok)
    # A chat's next turn carries the answers as streamed; pinned sessions pin their system
    # prompt; windowed requests ask for their window.
    chats = [b for b in stub.bodies if "messages" in b]
    follow = [b for b in chats if len(b["messages"]) > 2]
    assert follow
    for b in follow:
        answers = [m["content"] for m in b["messages"] if m["role"] == "assistant"]
        assert all(a and "t0 t1 ".startswith(a[:6]) for a in answers), answers
    pinned = [b for b in chats if b["messages"][0]["role"] == "system"]
    assert pinned and all(b["streamsink"] == {"pin": "system"} for b in pinned)
    windowed = [b for b in stub.bodies if b.get("streamsink", {}).get("window_tokens") ==
                ARGS.request_window and b["max_tokens"] == 20]
    assert windowed
    assert soak.cached_share(load.records, "chat") == pytest.approx(0.4)


# ------------------------------------------------------------------ the soak, shortened

# The short soak's load, its RSS sampling period and its progress-line period, s.
SHORT_S, RSS_EVERY_S, PROGRESS_S = 120, 2, 30


@pytest.fixture(scope="module")
def short_soak(tmp_path_factory):
    from streamsink.serving.loadtest.prometheus import find_prometheus
    from tiny_models import make_tiny_llama_with_tokenizer

    if find_prometheus() is None:
        pytest.skip("prometheus not installed (scripts/setup.sh installs it)")
    model = make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"),
                                           sharp=False)
    out = tmp_path_factory.mktemp("soak")
    results = tmp_path_factory.mktemp("results")
    # C = 64 tokens; every kind of stream outgrows its cache (a long stream by 192 tokens).
    cmd = [sys.executable, os.path.join(BENCH, "soak.py"), "--model", model,
           "--duration", str(SHORT_S), "--warmup", "20", "--window-s", "40",
           "--sink", "4", "--window", "60", "--max-pinned-tokens", "96",
           "--system-tokens", "40", "--request-window", "15",
           "--chat-turns", "6", "--user-tokens", "24", "--answer-tokens", "16",
           "--prompt-tokens", "64", "--long-tokens", "256",
           "--bad-every", "5", "--drain-timeout", "120",
           "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--max-model-len", "1024",
           "--kv-cache-bytes", str(160 << 20), "--eager",
           "--rss-every", str(RSS_EVERY_S), "--progress-every", str(PROGRESS_S),
           # The suite runs two workers on two cores: the other worker's engines change this
           # one's speed from minute to minute (by 1.75x once), so the speed check is recorded
           # here, never asserted (tests assert behaviour; speed is the two-hour run's).
           "--out", str(out)]
    env = dict(os.environ, STREAMSINK_BENCH_RESULTS=str(results))
    env.pop("STREAMSINK_METRICS_DIR", None)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=BENCH)
    import result_files

    paths = result_files.result_files("soak", str(results))
    assert len(paths) == 1, f"rc {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, result_files.load(paths[0]), paths[0], out, time.monotonic() - start


def test_short_soak_passes_every_check(short_soak):
    """Every check but the speed one passes (that one is computed and recorded: tokens flowed
    in both windows); the exit status and the verdict follow the checks."""
    done, result, _path, _out, _wall = short_soak
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {"answered", "bad_refused", "no_errors", "drained", "held_blocks",
                           "pool_used_blocks", "rss_growth", "tokens_per_s"}
    speed = checks.pop("tokens_per_s")
    assert speed["value"]["first"] > 0 and speed["value"]["last"] > 0, speed
    failed = {name: c["value"] for name, c in checks.items() if not c["ok"]}
    assert not failed, failed
    assert result["passed"] is speed["ok"]
    assert done.returncode == (0 if result["passed"] else 1), \
        done.stdout[-3000:] + done.stderr[-3000:]
    assert result["after_drain"]["held_blocks"] == 0
    assert result["after_drain"]["pool_used_blocks"] == 0


def test_short_soak_ran_the_whole_mix(short_soak):
    _done, result, _path, _out, _wall = short_soak
    counts = result["outcomes"]
    for kind in ("chat", "pinned", "long", "windowed", "bad"):
        assert counts[kind]["requests"] > 0, kind
    assert sum(row.get("aborted_planned", 0) for row in counts.values()) > 0
    # Chats and pinned chats were served from the prefix cache as their history grew.
    assert result["cached_share"]["chat"] > 0 and result["cached_share"]["pinned"] > 0
    series = result["series"]
    assert max(v for _t, v in series["held_blocks"]) > 0
    assert max(v for _t, v in series["pinned_blocks"]) > 0
    assert len(series["rss_mib"]) > 0.75 * SHORT_S / RSS_EVERY_S   # sampled all along


def test_short_soak_outputs(short_soak, tmp_path):
    from reports import soak as soak_report
    from reports.base import Doc, Result

    done, result, path, out, _wall = short_soak
    assert (out / "dashboard.png").stat().st_size > 20_000
    assert done.stdout.strip().splitlines()[-1] == (
        "soak: passed" if result["passed"] else "soak: failed: tokens_per_s")
    # Progress along the way (the last tick may fall at the very end of the load).
    assert sum(line.startswith("soak: ") and " min  requests " in line
               for line in done.stdout.splitlines()) >= SHORT_S // PROGRESS_S - 1
    text = soak_report.markdown({"soak": Result.from_file("soak", path)},
                                Doc(base="../", img="img/"))
    assert ("All checks passed" if result["passed"] else "Some checks failed") in text
    assert soak_report.images({"soak": Result.from_file("soak", path)}, str(tmp_path))
