"""Soak: `streamsink serve` under a mixed load for hours (two by default), a real Prometheus
scraping it all the while; at the end, the checks that nothing leaked, slowed down or failed.

The load, closed loop (each client sends its next request when its last one ends):
- chat:     sessions that continue turn after turn, sending the whole conversation each turn
            (as OpenAI clients do), so the prefix cache serves the history; a session starts
            over after --chat-turns;
- pinned:   the same, on one system prompt that every session shares and pins
            ({"streamsink": {"pin": "system"}}; the server has --max-pinned-tokens);
- long:     one completion at a time that streams well past the window;
- windowed: completions with a window of their own ({"streamsink": {"window_tokens": W_r}});
- --drop-fraction of all these streams hang up mid-way (the client closes the connection);
- bad:      a trickle of requests the server must refuse with a 4xx (one every --bad-every s).
The server's process tree (launcher, API server, engine core) is sampled for RSS all along.

Checks (each recorded with its value and limit; exit 1 when one fails). Times count from the
start of the load; "first window" is [--warmup, --warmup + --window-s], "last window" is the
last --window-s of the load:
- answered:        every request but the bad ones completed or was cleanly aborted (a planned
                   drop, or still running when the drain deadline passed);
- bad_refused:     every bad request was answered with a 4xx (and at least one was sent);
- no_errors:       no HTTP 5xx, no other failed request, no traceback in the server's log;
- drained:         the server went idle after the load (no running or waiting request);
- held_blocks / pool_used_blocks: vllm:streamsink_held_blocks and
                   vllm:streamsink_pool_used_blocks, as Prometheus has them after the drain: 0;
- rss_growth:      the highest process-tree RSS of the last window over the highest of the
                   first: at most --max-rss-growth more;
- tokens_per_s:    generated tokens/s (vllm:generation_tokens, through Prometheus) of the last
                   window within --max-tps-change of the first.

    .venv/bin/python benchmarks/soak.py                         # two hours, the default model
    .venv/bin/python benchmarks/soak.py --duration 1800 --warmup 300 --window-s 300
Writes benchmarks/results/soak/<date>-<commit>.json (`make docs` renders it into docs/soak.md)
and a dashboard PNG beside the run's logs (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import threading
import time

import common

from streamsink.errors import UsageError

JOB = "streamsink"
BAD_KINDS = ("window_too_wide", "pin_too_many", "unknown_option", "unknown_model",
             "negative_max_tokens", "malformed_json")
TRACEBACK = re.compile(r"^Traceback \(most recent call last\)", re.M)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=7200.0,
                   help="seconds during which requests are sent (default 7200)")
    p.add_argument("--warmup", type=float, default=600.0,
                   help="seconds before the first window (default 600)")
    p.add_argument("--window-s", type=float, default=600.0,
                   help="length of the first and last windows compared, s (default 600)")
    p.add_argument("--max-rss-growth", type=float, default=0.05,
                   help="allowed RSS growth, last window over first (default 0.05)")
    p.add_argument("--max-tps-change", type=float, default=0.10,
                   help="allowed change of tokens/s, last window against first (default 0.10)")
    p.add_argument("--model", help="checkpoint directory or hub id (default: the embedded model)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--max-pinned-tokens", type=int, default=256)
    p.add_argument("--system-tokens", type=int, default=160,
                   help="the shared system prompt's length (it must pin within "
                        "--max-pinned-tokens with the chat template's framing)")
    p.add_argument("--request-window", type=int, default=None,
                   help="W_r of the windowed requests (default: a quarter of --window)")
    p.add_argument("--chat-clients", type=int, default=2)
    p.add_argument("--pinned-clients", type=int, default=2)
    p.add_argument("--long-clients", type=int, default=1)
    p.add_argument("--windowed-clients", type=int, default=1)
    p.add_argument("--chat-turns", type=int, default=12)
    p.add_argument("--user-tokens", type=int, default=100, help="tokens of a chat's user turn")
    p.add_argument("--answer-tokens", type=int, default=64, help="tokens a chat turn generates")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="prompt of the long and windowed completions")
    p.add_argument("--long-tokens", type=int, default=None,
                   help="tokens a long stream generates (default: twice S+W)")
    p.add_argument("--windowed-tokens", type=int, default=None,
                   help="tokens a windowed completion generates (default: twice S+W_r)")
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--bad-every", type=float, default=30.0, help="seconds between bad requests")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds in-flight requests may take after --duration (default 900)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None,
                   help="default: the streaming server sizes its own pool")
    p.add_argument("--eager", action="store_true", help="the server with --enforce-eager")
    p.add_argument("--scrape-interval", type=float, default=1.0)
    p.add_argument("--rss-every", type=float, default=5.0, help="RSS sampling period, s")
    p.add_argument("--progress-every", type=float, default=60.0, help="progress line period, s")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="soak", help="result name (default soak)")
    p.add_argument("--out", default=None,
                   help="folder for the logs and dashboard.png (default: a temporary one)")
    args = p.parse_args(argv)
    c = args.sink + args.window
    args.request_window = args.request_window or max(1, args.window // 4)
    args.long_tokens = args.long_tokens or 2 * c
    args.windowed_tokens = args.windowed_tokens or 2 * (args.sink + args.request_window)
    return args


def validate(args) -> None:
    checks = [
        (args.duration > 0, "--duration must be > 0"),
        (args.warmup >= 0 and args.window_s > 0, "--warmup must be >= 0 and --window-s > 0"),
        (args.warmup + 2 * args.window_s <= args.duration,
         "--duration must hold --warmup and two windows (--window-s)"),
        (0 <= args.drop_fraction <= 1, "--drop-fraction must be within [0, 1]"),
        (args.bad_every > 0, "--bad-every must be > 0"),
        (1 <= args.request_window <= args.window, "--request-window must be within [1, --window]"),
        (0 < args.system_tokens < args.max_pinned_tokens,
         "--system-tokens must be > 0 and below --max-pinned-tokens"),
        (min(args.chat_clients, args.pinned_clients, args.long_clients,
             args.windowed_clients) >= 0, "client counts must be >= 0"),
        (args.chat_clients + args.pinned_clients + args.long_clients + args.windowed_clients > 0,
         "no clients"),
        (args.chat_turns >= 1, "--chat-turns must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ------------------------------------------------------------------------------ load

class Load:
    """The soak's clients, sharing one aiohttp session, one clock and one record list."""

    def __init__(self, args, api_url: str, model: str, texts: dict) -> None:
        self.args = args
        self.api_url = api_url.rstrip("/")
        self.model = model
        self.texts = texts            # kind -> [(text, tokens)]
        self.rng = random.Random(args.seed)
        self.records: list[tuple[str, object]] = []   # (kind, RequestRecord)
        self.in_flight: set[int] = set()   # their indexes while sent (outcome not final yet)
        self.t0 = 0.0                 # the load's start (perf_counter)
        self.start_unix = 0.0         # the same moment on the clock Prometheus keeps
        self.deadline = 0.0           # no request starts after it (perf_counter)

    def text(self, kind: str) -> str:
        return self.rng.choice(self.texts[kind])[0]

    def sending(self) -> bool:
        return time.perf_counter() < self.deadline

    async def stream(self, session, kind: str, path: str, payload: dict, max_tokens: int,
                     text: list | None = None):
        from streamsink.serving.loadtest.client import RequestRecord, stream_request

        drop = self.rng.random() < self.args.drop_fraction and max_tokens > 1
        rec = RequestRecord(index=len(self.records), prompt_len=0,
                            abort_after=self.rng.randint(1, max_tokens - 1) if drop else None)
        self.records.append((kind, rec))
        payload = {"model": self.model, "max_tokens": max_tokens, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}, **payload}
        self.in_flight.add(rec.index)
        try:
            await stream_request(session, self.api_url + path, payload, rec, self.t0, text)
        finally:
            self.in_flight.discard(rec.index)
        return rec

    async def chat_client(self, session, pinned: bool) -> None:
        kind = "pinned" if pinned else "chat"
        while self.sending():
            messages = [{"role": "system", "content": self.texts["system"][0][0]}] if pinned \
                else []
            for _turn in range(self.args.chat_turns):
                if not self.sending():
                    return
                messages.append({"role": "user", "content": self.text("user")})
                payload = {"messages": messages}
                if pinned:
                    payload["streamsink"] = {"pin": "system"}
                answer: list[str] = []
                rec = await self.stream(session, kind, "/chat/completions", payload,
                                        self.args.answer_tokens, answer)
                if rec.outcome == "error":
                    break  # a fresh session; the error is recorded and fails the soak
                # A dropped answer stays as far as it got: the user goes on from there.
                messages.append({"role": "assistant", "content": "".join(answer)})

    async def completion_client(self, session, kind: str) -> None:
        windowed = kind == "windowed"
        tokens = self.args.windowed_tokens if windowed else self.args.long_tokens
        while self.sending():
            payload = {"prompt": self.text("prompt")}
            if windowed:
                payload["streamsink"] = {"window_tokens": self.args.request_window}
            await self.stream(session, kind, "/completions", payload, tokens)

    async def bad_client(self, session) -> None:
        from streamsink.serving.loadtest.client import RequestRecord

        n = 0
        while True:
            await asyncio.sleep(self.args.bad_every)
            if not self.sending():
                return
            kind = BAD_KINDS[n % len(BAD_KINDS)]
            n += 1
            rec = RequestRecord(index=len(self.records), prompt_len=0)
            self.records.append((f"bad:{kind}", rec))
            path, body = self.bad_request(kind)
            rec.start = time.perf_counter() - self.t0
            self.in_flight.add(rec.index)
            try:
                async with session.post(self.api_url + path, data=body,
                                        headers={"Content-Type": "application/json"}) as resp:
                    rec.status = resp.status
                    rec.error = (await resp.text())[:200]
            except Exception as exc:  # a refused connection is a failure of the server
                rec.error = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                self.in_flight.discard(rec.index)
            rec.outcome = "refused" if rec.status is not None and 400 <= rec.status < 500 \
                else "error"

    def bad_request(self, kind: str) -> tuple[str, bytes]:
        """One request the server must refuse with a 4xx; streamed ones go through the
        streamed refusal path."""
        a = self.args
        body: dict = {"model": self.model, "prompt": self.text("prompt"), "max_tokens": 8}
        if kind == "window_too_wide":
            body.update(stream=True, streamsink={"window_tokens": a.window + 1})
        elif kind == "pin_too_many":
            body["streamsink"] = {"pin_tokens": a.max_pinned_tokens + 1}
            body["prompt"] = " ".join([body["prompt"]] * 4)  # longer than what it pins
        elif kind == "unknown_option":
            body.update(stream=True, streamsink={"sinks": 8})
        elif kind == "unknown_model":
            body["model"] = "no-such-model"
        elif kind == "negative_max_tokens":
            body["max_tokens"] = -1
        elif kind == "malformed_json":
            return "/completions", b'{"model": "' + self.model.encode() + b'", "prompt": '
        return "/completions", json.dumps(body).encode()

    async def run(self, progress) -> None:
        import aiohttp
        # Imported before the clock starts: importing vLLM takes seconds, with the loop blocked.
        from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler  # noqa

        # A connection per request: a pooled keep-alive connection races uvicorn's keep-alive
        # timeout (5 s) when the API server's loop stalls, and the request sent on a connection
        # the server is closing fails as "Server disconnected" without reaching vLLM (seen once
        # in a short soak on a loaded machine). That is the client's transport, not what the
        # soak watches; with fresh connections every disconnect is the server's.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        self.t0, self.start_unix = time.perf_counter(), time.time()
        self.deadline = self.t0 + self.args.duration
        a = self.args
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            clients = ([self.chat_client(session, False) for _ in range(a.chat_clients)]
                       + [self.chat_client(session, True) for _ in range(a.pinned_clients)]
                       + [self.completion_client(session, "long") for _ in range(a.long_clients)]
                       + [self.completion_client(session, "windowed")
                          for _ in range(a.windowed_clients)]
                       + [self.bad_client(session)])
            tasks = [asyncio.create_task(c) for c in clients]
            reporter = asyncio.create_task(progress(self))
            # Past the drain deadline what still runs is cancelled: its stream hangs up and is
            # recorded as aborted at the deadline (stream_request).
            done, pending = await asyncio.wait(
                tasks, timeout=a.duration + a.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        for task in done:  # a client that broke is a bug of the soak, not a server's failure
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()


# ------------------------------------------------------------------------------ samples

class RssSampler:
    """The server's process-tree RSS (the launcher and every descendant), every period_s, in a
    thread of its own: samples [(unix time, MiB)]."""

    def __init__(self, pid: int, period_s: float) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float]] = []   # (unix time, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-rss", daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def now_mib(self) -> float | None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass  # a process that just exited
        return total / 2**20

    def _loop(self) -> None:
        while not self._stop.is_set():
            mib = self.now_mib()
            if mib is not None:
                self.samples.append((time.time(), round(mib, 1)))
            self._stop.wait(self.period_s)


def token_times(rec) -> list[float]:
    """When each streamed token of a request arrived, seconds since the load started."""
    if rec.ttft is None:
        return []
    t = rec.start + rec.ttft
    out = [t]
    for gap in rec.itl:
        t += gap
        out.append(t)
    return out


def client_tokens_per_s(records, bucket_s: float) -> list[list[float]]:
    """Tokens the clients received per second, in buckets of bucket_s: [[bucket start, /s]]."""
    counts: dict[int, int] = {}
    for _kind, rec in records:
        for t in token_times(rec):
            counts[int(t // bucket_s)] = counts.get(int(t // bucket_s), 0) + 1
    return [[k * bucket_s, n / bucket_s] for k, n in sorted(counts.items())]


# ------------------------------------------------------------------------------ checks

def window_max(samples, start: float, end: float) -> float | None:
    values = [v for t, v in samples if start <= t <= end]
    return max(values) if values else None


def check(name: str, ok: bool, value, limit: str) -> dict:
    return {"name": name, "ok": bool(ok), "value": value, "limit": limit}


def evaluate(args, records, outcome_counts: dict, drained: bool, after: dict,
             rss: list, tps: dict, log_tracebacks: int) -> list[dict]:
    """The soak's checks from what was recorded (a pure function: tests/test_soak.py)."""
    ours = [rec for kind, rec in records if not kind.startswith("bad:")]
    bad = [rec for kind, rec in records if kind.startswith("bad:")]
    failed = [rec for rec in ours if rec.outcome not in ("ok", "aborted")]
    server_errors = sum(1 for _k, rec in records if rec.status is not None and rec.status >= 500)
    last_start = args.duration - args.window_s
    first = window_max(rss, args.warmup, args.warmup + args.window_s)
    last = window_max(rss, last_start, args.duration)
    growth = None if not first or last is None else last / first - 1
    change = None if not tps.get("first") or tps.get("last") is None \
        else tps["last"] / tps["first"] - 1
    return [
        check("answered", ours and not failed,
              {"requests": len(ours), "not_answered": len(failed), **outcome_counts},
              "every request but the bad ones ok or cleanly aborted"),
        check("bad_refused", bad and all(r.outcome == "refused" for r in bad),
              {"sent": len(bad), "refused_4xx": sum(r.outcome == "refused" for r in bad)},
              "every bad request answered 4xx (at least one sent)"),
        check("no_errors", not failed and not server_errors and not log_tracebacks,
              {"http_5xx": server_errors, "failed": len(failed),
               "log_tracebacks": log_tracebacks}, "none"),
        check("drained", drained, drained, "the server idle after the load"),
        check("held_blocks", after.get("held_blocks") == 0, after.get("held_blocks"),
              "0 after the drain"),
        check("pool_used_blocks", after.get("pool_used_blocks") == 0,
              after.get("pool_used_blocks"), "0 after the drain"),
        check("rss_growth", growth is not None and growth <= args.max_rss_growth,
              {"growth": growth, "first_window_max_mib": first, "last_window_max_mib": last},
              f"<= {args.max_rss_growth:g}"),
        check("tokens_per_s", change is not None and abs(change) <= args.max_tps_change,
              {"change": change, **tps}, f"within ±{args.max_tps_change:g}"),
    ]


def outcomes(records) -> dict:
    """Per kind: requests, ok, aborted (planned / deadline), errors, refused."""
    out: dict = {}
    for kind, rec in records:
        row = out.setdefault(kind.split(":")[0], {"requests": 0, "ok": 0, "aborted_planned": 0,
                                                  "aborted_deadline": 0, "error": 0,
                                                  "refused": 0, "tokens": 0})
        row["requests"] += 1
        row["tokens"] += rec.tokens
        key = f"aborted_{rec.abort_reason}" if rec.outcome == "aborted" else rec.outcome
        row[key] = row.get(key, 0) + 1
    return out


def cached_share(records, kind: str) -> float | None:
    """Of the prompt tokens of a kind's completed requests, the share the prefix cache served
    (usage.prompt_tokens_details.cached_tokens)."""
    prompt = cached = 0
    for k, rec in records:
        if k == kind and rec.usage:
            prompt += rec.usage.get("prompt_tokens") or 0
            cached += (rec.usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return cached / prompt if prompt else None


# ------------------------------------------------------------------------------ run

def main(argv=None) -> int:
    args = parse_args(argv)
    from streamsink.errors import find_config_error, one_line
    from streamsink.serving import processes

    try:
        validate(args)
        setup = prepare(args)
    except Exception as exc:  # one line: exit 2 for a refusal (ours, or ours inside vLLM's)
        usage = isinstance(exc, UsageError)
        print(f"soak: error: {' '.join(str(exc).split()) if usage else one_line(exc)}",
              file=sys.stderr)
        return 2 if usage or find_config_error(exc) is not None else 1
    # A server or Prometheus that failed is one line (exit 1); whatever the soak started is
    # stopped however it ends.
    return processes.run_launcher(lambda: run(args, *setup), "soak", (Exception,))


def prepare(args):
    """Everything a refusal can come from, before anything starts: Prometheus, the model,
    the server's engine config (its KV budget when it sizes its own)."""
    from streamsink.serving import loadtest
    from streamsink.serving.engine_args import choose_model
    from streamsink.serving.loadtest.prometheus import HOW_TO_GET, find_prometheus
    from streamsink.serving.loadtest.servers import EngineArgs

    if find_prometheus() is None:
        raise UsageError(HOW_TO_GET)
    choice = choose_model(args.model)
    engine = EngineArgs(model=choice.path, dtype=choice.dtype, kv_cache_bytes=args.kv_cache_bytes,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        extra=["--enforce-eager"] if args.eager else [])
    kv = loadtest.check_streaming_server(engine, args.sink, args.window, args.max_pinned_tokens)
    return engine, kv


def run(args, engine, kv: int) -> int:
    from streamsink.serving import loadtest
    from streamsink.serving.loadtest import client as load_client
    from streamsink.serving.loadtest.prometheus import PrometheusServer
    from streamsink.serving.loadtest.servers import ServerProcess

    out = os.path.abspath(args.out or common.scratch_dir("soak"))
    os.makedirs(out, exist_ok=True)
    server = ServerProcess("streamsink", engine, os.path.join(out, "server.log"), sink=args.sink,
                           window=args.window, max_pinned=args.max_pinned_tokens)
    prom = None
    try:
        print(f"soak: starting the server (log {server.log_path}) ...", flush=True)
        server.start(timeout_s=args.startup_timeout)
        prom = PrometheusServer({JOB: server.metrics_url}, interval_s=args.scrape_interval,
                                log_path=os.path.join(out, "prometheus.log")).start()
        if not prom.wait_scraped(JOB, timeout_s=60):
            raise RuntimeError(f"Prometheus cannot scrape {server.metrics_url}")
        model_id, tokenizer = loadtest.served_model(server.api_url)
        loadtest.warm_up(server.api_url, model_id)
        print("soak: preparing prompts (vLLM's random dataset) ...", flush=True)
        texts = {
            "user": load_client.make_prompts(tokenizer, 200, args.user_tokens, 1, args.seed),
            "prompt": load_client.make_prompts(tokenizer, 100, args.prompt_tokens, 1,
                                               args.seed + 1),
            "system": load_client.make_prompts(tokenizer, 1, args.system_tokens, 1,
                                               args.seed + 2)}
        load = Load(args, server.api_url, model_id, texts)
        rss = RssSampler(server.pid, args.rss_every).start()
        print(f"soak: load for {args.duration:g} s: {args.chat_clients} chat, "
              f"{args.pinned_clients} pinned, {args.long_clients} long, {args.windowed_clients} "
              f"windowed clients, drop {args.drop_fraction:g}, a bad request every "
              f"{args.bad_every:g} s", flush=True)
        try:
            asyncio.run(load_client.until_stopped(
                load.run(lambda lo: _progress(lo, prom, rss, args.progress_every))))
        finally:
            rss.stop()
        start_unix, load_end = load.start_unix, time.time()
        drained_at, _held, drained = loadtest.wait_drained(prom, JOB, args.scrape_interval,
                                                           timeout_s=300)
        time.sleep(3 * args.scrape_interval)  # what Prometheus has once the server is idle
        after = {key: _int(prom.query(f"sum({loadtest.sink_selector(key, JOB)})"))
                 for key in ("held_blocks", "pool_used_blocks", "streams")}
        tps = _tokens_per_s(prom, args, start_unix)
        series = _series(prom, args, start_unix, time.time())
        # On the load's clock, like every other series (the sampler started a moment earlier).
        rss_samples = [(round(t - start_unix, 1), mib) for t, mib in rss.samples]
        series["rss_mib"] = [list(s) for s in rss_samples]
        series["client_tokens_per_s"] = client_tokens_per_s(load.records, 10.0)
    finally:
        if prom is not None:
            prom.stop()
        server.stop()
    with open(server.log_path, errors="replace") as f:
        tracebacks = len(TRACEBACK.findall(f.read()))
    counts = outcomes(load.records)
    flat = {k: sum(row.get(k, 0) for kind, row in counts.items() if kind != "bad")
            for k in ("ok", "aborted_planned", "aborted_deadline", "error")}
    checks = evaluate(args, load.records, flat, drained, after, rss_samples, tps, tracebacks)
    payload = {
        "duration_s": args.duration, "warmup_s": args.warmup, "window_s": args.window_s,
        "load_s": load_end - start_unix, "drain_s": drained_at - load_end,
        "checks": checks, "passed": all(c["ok"] for c in checks),
        "outcomes": counts, "after_drain": after, "tokens_per_s": tps,
        "cached_share": {k: cached_share(load.records, k) for k in ("chat", "pinned")},
        "server": {"kv_cache_bytes": kv, "argv": server.argv[1:]},
        "requests": [{"kind": kind, "start": round(r.start, 3), "outcome": r.outcome,
                      "abort_reason": r.abort_reason or None, "status": r.status,
                      "tokens": r.tokens, "ttft": r.ttft, "latency": round(r.latency, 3),
                      "cached_tokens": ((r.usage or {}).get("prompt_tokens_details") or {})
                      .get("cached_tokens"), "error": r.error if r.outcome == "error" else None}
                     for kind, r in load.records],
        "series": series,
    }
    png = _dashboard(out, args, series, load_end - start_unix)
    # No machine paths in a result: the checkpoint by its folder name, the run's folder out.
    text = json.dumps(payload).replace(engine.model, os.path.basename(engine.model))
    path = common.save(args.label, json.loads(text.replace(out, "<out>")), args)
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {json.dumps(c['value'])} "
              f"(limit: {c['limit']})")
    print(f"soak: wrote {path}; dashboard {png}; logs {out}")
    failed = [c["name"] for c in checks if not c["ok"]]
    print(f"soak: {'passed' if not failed else 'failed: ' + ', '.join(failed)}", flush=True)
    return 1 if failed else 0


def _int(value):
    return None if value is None else int(round(value))


async def _progress(load: Load, prom, rss: RssSampler, every: float) -> None:
    """One line every `every` seconds: what the clients saw, RSS, what Prometheus has."""
    from streamsink.serving import loadtest

    total = load.args.duration
    while True:
        await asyncio.sleep(every)
        elapsed = time.perf_counter() - load.t0
        counts = outcomes([(k, r) for k, r in load.records if r.index not in load.in_flight])
        done = {k: sum(row.get(k, 0) for row in counts.values())
                for k in ("requests", "ok", "aborted_planned", "error", "refused")}
        try:  # in a thread: the event loop keeps reading the streams meanwhile
            held = await asyncio.to_thread(
                prom.query, f"sum({loadtest.sink_selector('held_blocks', JOB)})")
            tps = await asyncio.to_thread(
                prom.query, f"sum(rate({loadtest.selector('generation_tokens(_total)?', JOB)}"
                            f"[{max(int(every), 10)}s]))")
        except Exception:  # a slow Prometheus does not stop the soak; the end checks tell
            held = tps = None
        rss_now = rss.samples[-1][1] if rss.samples else None
        print(f"soak: {elapsed / 60:.1f}/{total / 60:.0f} min  requests {done['requests']} "
              f"(ok {done['ok']}, dropped {done['aborted_planned']}, refused "
              f"{done['refused']}, errors {done['error']})  tokens/s {_fmt(tps)}  held blocks "
              f"{_fmt(held)}  RSS {_fmt(rss_now)} MiB", flush=True)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _tokens_per_s(prom, args, start_unix: float) -> dict:
    """Generated tokens/s of the first and the last window, from Prometheus (the server's
    vllm:generation_tokens counter: every token generated, dropped streams' too)."""
    from streamsink.serving import loadtest

    expr = (f"sum(increase({loadtest.selector('generation_tokens(_total)?', JOB)}"
            f"[{int(args.window_s)}s])) / {args.window_s:g}")
    return {"first": prom.query(expr, at=start_unix + args.warmup + args.window_s),
            "last": prom.query(expr, at=start_unix + args.duration)}


def _series(prom, args, start_unix: float, end_unix: float) -> dict:
    """The load test's server-side series and the soak's own, ~600 points each at most."""
    from streamsink.serving import loadtest

    extra = [("pool_used_blocks",
              lambda j: f"sum({loadtest.sink_selector('pool_used_blocks', j)})"),
             ("pinned_blocks", lambda j: f"sum({loadtest.sink_selector('pinned_blocks', j)})"),
             ("prefix_hit_rate", lambda j: (
                 f"sum(rate({loadtest.selector('prefix_cache_hits(_total)?', j)}[1m])) / "
                 f"sum(rate({loadtest.selector('prefix_cache_queries(_total)?', j)}[1m]))"))]
    step = max(args.scrape_interval, (end_unix - start_unix) / 600)
    out = {}
    for key, *rest in [*loadtest.SERIES, *extra]:
        expr = rest[-1]
        points = prom.query_range(expr(JOB), start_unix, end_unix, step_s=step)
        out[key] = [[round(t - start_unix, 1), v] for t, v in points]
    return out


PANELS = (("running", "requests running"), ("gen_tokens_per_s", "generated tokens/s (server)"),
          ("held_blocks", "streamsink: KV blocks held by streams"),
          ("pool_used_blocks", "streamsink: KV pool blocks used"),
          ("rss_mib", "server process tree RSS (MiB)"),
          ("itl_p99_ms", "inter-token latency p99 (ms)"),
          ("prefix_hit_rate", "prefix cache hit rate"),
          ("pinned_blocks", "streamsink: pinned blocks"))


def _dashboard(out: str, args, series: dict, load_s: float) -> str:
    from streamsink.serving.loadtest import dashboard

    run = {"name": "streamsink", "load_start": 0.0, "load_end": load_s, "series": series}
    return dashboard.render(os.path.join(out, "dashboard.png"), [run], list(PANELS),
                            title=f"streamsink soak: {args.duration / 3600:g} h, "
                                  f"{args.sink}+{args.window}")


if __name__ == "__main__":
    sys.exit(main())
