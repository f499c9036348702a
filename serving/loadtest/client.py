"""The load of `streamsink loadtest`: streamed OpenAI completions against one server
(stream_request, one streamed completion or chat completion, serves benchmarks/soak.py too).

vLLM's serving benchmark (`vllm.benchmarks.serve`) provides the pieces we use as they are: the
random dataset (prompts of an exact token length), the Poisson arrival schedule (`get_request`),
the server-sent-event parser and the metric definitions (`calculate_metrics`: TTFT, TPOT, ITL,
end-to-end percentiles and goodput under SLOs). What it cannot do is hang up mid-stream, stop on
a wall-clock bound, or keep a fixed number of clients busy for a duration, so the request loop
here is our own lean asyncio/aiohttp client.

Every request streams `max_tokens` tokens with `ignore_eos`. A request is exactly one of
- ok: the stream ended with [DONE];
- aborted: the client disconnected mid-stream, either planned (`abort_fraction` of them, after a
  uniformly drawn number of tokens) or because the drain deadline passed;
- error: anything else (HTTP status != 200, connection error, a stream without tokens).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import signal
import time
from dataclasses import dataclass, field

from streamsink.serving import processes


@dataclass
class LoadSpec:
    api_url: str                      # .../v1
    model: str                        # the server's model id
    prompts: list[tuple[str, int]]    # (text, token count); cycled if fewer than requests
    output_tokens: int
    requests: int                     # at most this many requests are started
    duration_s: float                 # no request starts after this
    concurrency: int | None = None    # closed loop: this many clients, each one request at a time
    rate: float | None = None         # open loop: Poisson arrivals, requests per second
    abort_fraction: float = 0.0
    drain_timeout_s: float = 120.0    # after duration_s: in-flight requests get this long
    seed: int = 0
    progress: bool = True


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    start: float = 0.0                # seconds after the load started
    ttft: float | None = None         # seconds
    itl: list[float] = field(default_factory=list)
    tokens: int = 0                   # streamed chunks with a choice (one token each)
    latency: float = 0.0              # seconds, request sent -> last byte
    outcome: str = "error"            # ok | aborted | error
    abort_after: int | None = None    # planned disconnect after this many tokens
    abort_reason: str = ""            # planned | deadline
    status: int | None = None         # HTTP status
    error: str = ""
    usage: dict | None = None         # the stream's usage chunk (stream_options.include_usage)


@dataclass
class LoadResult:
    records: list[RequestRecord]
    start_unix: float
    end_unix: float
    duration_s: float


def make_prompts(tokenizer_path: str, count: int, prompt_tokens: int, output_tokens: int,
                 seed: int) -> list[tuple[str, int]]:
    """`count` distinct random prompts of `prompt_tokens` tokens (vLLM's random dataset; distinct
    so that a stock server's prefix cache cannot serve one request from another's blocks)."""
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(tokenizer_path)
    with contextlib.redirect_stdout(io.StringIO()):
        samples = RandomDataset(random_seed=seed).sample(
            tokenizer, count, input_len=prompt_tokens, output_len=output_tokens,
            range_ratio=0.0)
    return [(s.prompt, s.prompt_len) for s in samples]


def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load to completion (bounded by spec.requests, spec.duration_s and
    spec.drain_timeout_s) and return one record per started request. SIGINT/SIGTERM cancel it
    and raise processes.Interrupted."""
    return asyncio.run(until_stopped(_run(spec)))


async def until_stopped(work):
    """Await `work` (a coroutine) so that SIGINT/SIGTERM cancel it and raise
    processes.Interrupted: a signal handler that raises (processes.raise_on_signal) would land
    inside the event loop's own callbacks, which swallow it; the loop's handlers cancel the
    load instead."""
    loop = asyncio.get_running_loop()
    load = asyncio.current_task()
    stopped: list[str] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop(sig: signal.Signals) -> None:
        stopped.append(sig.name)
        load.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if stopped:
            raise processes.Interrupted(stopped[0]) from None
        raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)  # the launcher's own handling, for what follows


async def _run(spec: LoadSpec) -> LoadResult:
    import aiohttp
    import numpy as np
    from tqdm import tqdm
    # Imported before the clock starts: importing vLLM takes seconds (minutes on a busy box).
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler  # noqa: F401
    from vllm.benchmarks.serve import get_request

    rng = random.Random(spec.seed)
    # Every request's abort plan is drawn up front, so two runs with the same seed (streamsink
    # and stock) get the same load.
    plans = []
    for _ in range(spec.requests):
        abort = rng.random() < spec.abort_fraction and spec.output_tokens > 1
        plans.append(rng.randint(1, spec.output_tokens - 1) if abort else None)

    records: list[RequestRecord] = []
    bar = tqdm(total=spec.requests, desc="requests", unit="req", mininterval=1.0,
               disable=not spec.progress, leave=False)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    t0 = time.perf_counter()
    start_unix = time.time()
    send_deadline = t0 + spec.duration_s
    tasks: set[asyncio.Task] = set()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def launch(i: int) -> asyncio.Task:
            prompt, plen = spec.prompts[i % len(spec.prompts)]
            rec = RequestRecord(index=i, prompt_len=plen, abort_after=plans[i])
            records.append(rec)
            task = asyncio.create_task(_one_request(session, spec, prompt, rec, t0))
            task.add_done_callback(lambda _t: bar.update(1))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        if spec.rate is None:  # closed loop
            counter = iter(range(spec.requests))

            async def client() -> None:
                for i in counter:
                    if time.perf_counter() >= send_deadline:
                        return
                    await launch(i)

            clients = [asyncio.create_task(client()) for _ in range(spec.concurrency or 1)]
            await _wait_with_deadline(clients, tasks, send_deadline + spec.drain_timeout_s)
        else:  # open loop: vLLM's Poisson schedule (burstiness 1)
            np.random.seed(spec.seed)
            indices = list(range(spec.requests))
            async for i, _rate in get_request(indices, spec.rate):
                if time.perf_counter() >= send_deadline:
                    break
                launch(i)
            await _wait_with_deadline([], tasks, send_deadline + spec.drain_timeout_s)
    bar.close()
    end = time.perf_counter()
    return LoadResult(records=sorted(records, key=lambda r: r.index), start_unix=start_unix,
                      end_unix=start_unix + (end - t0), duration_s=end - t0)


async def _wait_with_deadline(clients: list[asyncio.Task], tasks: set[asyncio.Task],
                              deadline: float) -> None:
    """Wait for the clients and every request; past the deadline cancel what still runs (a
    cancelled request hangs up: _one_request records it as aborted at the deadline)."""
    while True:
        pending = [t for t in (*clients, *tasks) if not t.done()]
        if not pending:
            return
        left = deadline - time.perf_counter()
        if left <= 0:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return
        await asyncio.wait(pending, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)


async def _one_request(session, spec: LoadSpec, prompt: str, rec: RequestRecord,
                       t0: float) -> None:
    payload = {"model": spec.model, "prompt": prompt, "max_tokens": spec.output_tokens,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    await stream_request(session, spec.api_url.rstrip("/") + "/completions", payload, rec, t0)


async def stream_request(session, url: str, payload: dict, rec: RequestRecord, t0: float,
                         text: list[str] | None = None) -> None:
    """POST one streamed completion (/completions) or chat completion (/chat/completions) and
    record it in `rec` (outcome, timings, tokens, usage); hang up after rec.abort_after tokens.
    `text`, when given, receives the streamed text piece by piece (a chat's next turn needs
    it). Never raises: a cancellation (the drain deadline) is recorded as an abort."""
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    chat = url.endswith("/chat/completions")
    st = time.perf_counter()
    rec.start = st - t0
    last = st
    try:
        async with session.post(url, json=payload) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                rec.latency = time.perf_counter() - st
                return
            handler = StreamedResponseHandler()
            done = False
            async for chunk in resp.content.iter_any():
                for message in handler.add_chunk(chunk):
                    if message.startswith(":"):
                        continue  # SSE comment (keep-alive)
                    data = message.removeprefix("data: ")
                    if data == "[DONE]":
                        done = True
                        continue
                    body = json.loads(data)
                    if body.get("error"):
                        rec.error = str(body["error"])[:200]
                        continue
                    piece = _token_text(body, chat)
                    if piece is not None:
                        now = time.perf_counter()
                        if rec.ttft is None:
                            rec.ttft = now - st
                        else:
                            rec.itl.append(now - last)
                        last = now
                        rec.tokens += 1
                        if text is not None:
                            text.append(piece)
                        if rec.abort_after is not None and rec.tokens >= rec.abort_after:
                            # Hang up at the planned token: close the connection (not back to
                            # the pool), the way a client that goes away does; the server must
                            # abort and free the request. Checked per token, not per read: a
                            # lagging client may get the rest of the stream in one read.
                            resp.close()
                            rec.outcome, rec.abort_reason = "aborted", "planned"
                            rec.latency = time.perf_counter() - st
                            return
                    if body.get("usage"):
                        rec.usage = body["usage"]
                        rec.tokens = max(rec.tokens, body["usage"].get("completion_tokens") or 0)
            rec.latency = last - st
            if done and rec.ttft is not None and not rec.error:
                rec.outcome = "ok"
            elif not rec.error:
                rec.error = "stream ended without [DONE]" if rec.ttft else "no token received"
    except asyncio.CancelledError:
        rec.outcome, rec.abort_reason = "aborted", "deadline"
        rec.latency = time.perf_counter() - st
    except Exception as exc:  # connection refused/reset, bad JSON: an error, not a crash
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
        rec.latency = time.perf_counter() - st


def _token_text(body: dict, chat: bool) -> str | None:
    """The text of a streamed chunk that carries a token (one chunk a token), else None. A
    chat stream opens with a chunk that only names the role, which carries none."""
    choices = body.get("choices")
    if not choices:
        return None
    if not chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    if "role" in delta or delta.get("content") is None:
        return None
    return delta["content"]


def summarize(result: LoadResult, slos_ms: dict[str, float],
              percentiles=(50.0, 90.0, 99.0)) -> dict:
    """Client-side numbers. Latency percentiles and goodput are vLLM's own (`calculate_metrics`,
    the definitions of `vllm bench serve`) over the requests that completed; `tokens_per_s` counts
    every token clients received (aborted streams too) over the load's wall time."""
    import numpy as np
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    recs = result.records
    ok = [r for r in recs if r.outcome == "ok"]
    outputs = [RequestFuncOutput(success=True, latency=r.latency, output_tokens=r.tokens,
                                 ttft=r.ttft or 0.0, itl=list(r.itl), prompt_len=r.prompt_len,
                                 start_time=r.start) for r in ok]
    dur = max(result.duration_s, 1e-9)
    vllm_metrics = None
    if outputs:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints hints we do not need
            vllm_metrics, _ = calculate_metrics(input_requests=[], outputs=outputs, dur_s=dur,
                                                tokenizer=None,
                                                selected_percentiles=list(percentiles),
                                                goodput_config_dict=dict(slos_ms))

    def dist(values_s: list[float]) -> dict:
        if not values_s:
            return {"count": 0}
        arr = np.asarray(values_s) * 1000.0
        return {"count": int(arr.size), "mean": float(arr.mean()), "max": float(arr.max()),
                **{f"p{p:g}": float(np.percentile(arr, p)) for p in percentiles}}

    tokens = sum(r.tokens for r in recs)
    out = {
        "requests": len(recs), "ok": len(ok),
        "errors": sum(r.outcome == "error" for r in recs),
        "aborted": sum(r.outcome == "aborted" for r in recs),
        "aborted_planned": sum(r.abort_reason == "planned" for r in recs),
        "aborted_deadline": sum(r.abort_reason == "deadline" for r in recs),
        "http_5xx": sum(1 for r in recs if r.status is not None and r.status >= 500),
        "error_samples": sorted({r.error for r in recs if r.outcome == "error"})[:5],
        "duration_s": result.duration_s,
        "tokens_received": tokens,
        "tokens_per_s": tokens / dur,
        # vLLM's definitions, over completed requests:
        "ttft_ms": dist([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": dist([x for r in ok for x in r.itl]),
        "e2el_ms": dist([r.latency for r in ok]),
        # every stream, aborted ones included (what all clients saw):
        "ttft_ms_all_streams": dist([r.ttft for r in recs if r.ttft is not None]),
        "itl_ms_all_streams": dist([x for r in recs for x in r.itl]),
        "slos_ms": dict(slos_ms),
    }
    if vllm_metrics is not None:
        m = vllm_metrics
        out["vllm_bench"] = {
            "completed": m.completed, "request_throughput": m.request_throughput,
            "request_goodput": m.request_goodput if slos_ms else None,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
            "mean_ttft_ms": m.mean_ttft_ms, "mean_tpot_ms": m.mean_tpot_ms,
            "mean_itl_ms": m.mean_itl_ms, "mean_e2el_ms": m.mean_e2el_ms,
            "percentiles_ttft_ms": dict(m.percentiles_ttft_ms),
            "percentiles_tpot_ms": dict(m.percentiles_tpot_ms),
            "percentiles_itl_ms": dict(m.percentiles_itl_ms),
            "percentiles_e2el_ms": dict(m.percentiles_e2el_ms),
            "max_output_tokens_per_s": m.max_output_tokens_per_s,
            "max_concurrent_requests": m.max_concurrent_requests,
        }
        # goodput: completed requests within every SLO, per second of load (vLLM's definition)
        out["goodput_rps"] = m.request_goodput if slos_ms else None
    else:
        out["vllm_bench"] = None
        out["goodput_rps"] = 0.0 if slos_ms else None
    return out
