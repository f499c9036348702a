"""`streamsink loadtest`: load-test a streaming server with a real Prometheus watching.

For each run (streamsink; then stock with --compare-stock) it
1. starts the server as a subprocess (or uses --target), loopback only;
2. starts Prometheus (prometheus.py) scraping the server's /metrics every second;
3. runs a bounded load of streamed completions (client.py: closed loop with
   --concurrency, or Poisson arrivals with --rate; --abort-fraction of clients hang up
   mid-stream);
4. waits until the server has drained (no running or waiting request, no held streaming block);
5. asks Prometheus' range API for the server-side series;
then writes DIR/report.json and DIR/dashboard.png, prints a table and one summary line. Every
process it started is stopped at the end, on errors and on Ctrl-C/SIGTERM too.

Exit status: 0; 1 when streaming blocks are still held after the load drained, a request got an
HTTP 5xx, or a server/Prometheus failed; 2 for bad input (one line, no stack trace).
"""
from __future__ import annotations

import json
import os
import sys
import time

from streamsink.errors import UsageError
from streamsink.serving import processes
from streamsink.serving.engine_args import choose_model
from streamsink.serving.loadtest import client as load_client
from streamsink.serving.loadtest import dashboard
from streamsink.serving.loadtest.prometheus import (
    HOW_TO_GET,
    PrometheusError,
    PrometheusServer,
    find_prometheus,
)
from streamsink.serving.loadtest.servers import EngineArgs, ServerError, ServerProcess
from streamsink.serving.serve import check_server_argv, server_argv

# How the server-side series are asked for. Metric names come in two schemes: vLLM's own
# ("vllm:num_requests_running", one API server) and Ray's export of the same metrics
# ("ray_vllm_num_requests_running", `serve --ray`); streamsink's gauges likewise. A name regex
# matches either, and sums/quantiles aggregate the replicas of a Ray app.
RATE_WINDOW = "10s"
_NAME = '{{__name__=~"{regex}",job="{job}"}}'


# llama.cpp's llama-server (`--metrics`) names its own series ("llamacpp:requests_processing");
# a vLLM name asked for here that has an equivalent there matches it too. llama-server has no
# latency histograms, and it adds a request's generated tokens to its counter only when the
# request ends (so its tokens/s series comes in steps at request ends).
LLAMACPP_NAMES = {
    "num_requests_running": "requests_processing",
    "num_requests_waiting": "requests_deferred",
    "generation_tokens(_total)?": "tokens_predicted_total",
    "kv_cache_usage_perc": "kv_cache_usage_ratio",  # older llama-server versions only
}


def selector(name: str, job: str) -> str:
    regex = f"(ray_)?vllm[:_]{name}"
    if name in LLAMACPP_NAMES:
        regex += f"|llamacpp:{LLAMACPP_NAMES[name]}"
    return _NAME.format(regex=regex, job=job)


def sink_selector(name: str, job: str) -> str:
    return _NAME.format(regex=f"(ray_)?(vllm[:_])?streamsink_{name}", job=job)


def _quantile(q: float, name: str, job: str) -> str:
    return (f"1000 * histogram_quantile({q}, sum by (le) "
            f"(rate({selector(name + '_bucket', job)}[{RATE_WINDOW}])))")


SERIES = [  # (key, panel title, PromQL for a job)
    ("running", "requests running", lambda j: f"sum({selector('num_requests_running', j)})"),
    ("waiting", "requests waiting", lambda j: f"sum({selector('num_requests_waiting', j)})"),
    ("kv_usage_pct", "KV cache usage (%)",
     lambda j: f"100 * max({selector('kv_cache_usage_perc', j)})"),
    ("held_blocks", "streamsink: KV blocks held by streams",
     lambda j: f"sum({sink_selector('held_blocks', j)})"),
    ("freed_blocks_per_s", "streamsink: blocks freed per second",
     lambda j: f"sum(rate({sink_selector('freed_blocks(_total)?', j)}[{RATE_WINDOW}]))"),
    ("gen_tokens_per_s", "generated tokens per second",
     lambda j: f"sum(rate({selector('generation_tokens(_total)?', j)}[{RATE_WINDOW}]))"),
    ("itl_p50_ms", "inter-token latency p50 (ms)",
     lambda j: _quantile(0.5, "inter_token_latency_seconds", j)),
    ("itl_p99_ms", "inter-token latency p99 (ms)",
     lambda j: _quantile(0.99, "inter_token_latency_seconds", j)),
    ("ttft_p50_ms", "time to first token p50 (ms)",
     lambda j: _quantile(0.5, "time_to_first_token_seconds", j)),
    ("ttft_p99_ms", "time to first token p99 (ms)",
     lambda j: _quantile(0.99, "time_to_first_token_seconds", j)),
]


class InputError(UsageError):
    """Bad command-line input: one line, exit 2."""


def _validate(args) -> None:
    checks = [
        (args.requests >= 1, "--requests must be >= 1"),
        (args.duration > 0, "--duration must be > 0"),
        (args.drain_timeout >= 0, "--drain-timeout must be >= 0"),
        (args.prompt_tokens >= 1, "--prompt-tokens must be >= 1"),
        (args.output_tokens >= 1, "--output-tokens must be >= 1"),
        (0.0 <= args.abort_fraction <= 1.0, "--abort-fraction must be within [0, 1]"),
        (args.concurrency is None or args.concurrency >= 1, "--concurrency must be >= 1"),
        (args.rate is None or args.rate > 0, "--rate must be > 0"),
        (args.replicas >= 1, "--replicas must be >= 1"),
        (args.scrape_interval > 0, "--scrape-interval must be > 0"),
        (not (args.target and args.ray), "--target and --ray exclude each other"),
        (not (args.target and args.compare_stock),
         "--compare-stock starts its own servers; drop --target"),
        (not (args.ray and args.compare_stock),
         "--compare-stock compares single servers; drop --ray"),
        (args.metrics_url is None or args.target, "--metrics-url needs --target"),
        (args.kv_cache_bytes is None or args.kv_cache_bytes > 0, "--kv-cache-bytes must be > 0"),
    ]
    for slo in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms"):
        value = getattr(args, slo)
        checks.append((value is None or value > 0, f"--{slo.replace('_', '-')} must be > 0"))
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if args.target and not args.target.startswith(("http://", "https://")):
        raise InputError(f"--target must be an http(s) URL, got {args.target!r}")


def run(args) -> int:
    _validate(args)
    if find_prometheus() is None:
        raise InputError(HOW_TO_GET)
    # Servers are started in their own sessions; a server's orphans come back to us, and
    # SIGINT/SIGTERM unwind through the finally blocks that stop what we started (exit 0).
    return processes.run_launcher(lambda: _run(args), "streamsink loadtest", (Failure,))


class Failure(Exception):
    """A server or Prometheus failed (one line, exit 1)."""


def _run(args) -> int:
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    concurrency = args.concurrency if (args.concurrency or args.rate) else 8
    slos = {k: v for k, v in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms),
                              ("e2el", args.slo_e2el_ms)) if v is not None}
    choice = choose_model(args.model, args.weights) if (args.model or not args.target) else None
    model = choice.path if choice else None
    engine = EngineArgs(model=model or "", dtype=choice.dtype if choice else "float32",
                        kv_cache_bytes=args.kv_cache_bytes,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        extra=list(args.server_arg))
    if not args.target:
        # Refusals before anything starts; and the stock server of a comparison gets the KV
        # budget the streaming one sizes for itself.
        engine.kv_cache_bytes = check_streaming_server(engine, args.sink, args.window)
    plan = ["streamsink"] + (["stock"] if args.compare_stock else [])
    config = {k: v for k, v in vars(args).items() if k not in ("func", "vllm_args")}
    config.update(concurrency=concurrency if args.rate is None else None, model=model,
                  kv_cache_bytes=engine.kv_cache_bytes, slos_ms=slos)
    report = {"config": config, "runs": [], "processes": []}
    prompts = None
    for name in plan:
        run_report, prompts = _one_run(name, args, engine, concurrency, slos, logs, prompts,
                                       report["processes"])
        report["runs"].append(run_report)
    return _finish(report, out, plan)


def _one_run(name: str, args, engine, concurrency, slos, logs, prompts, processes):
    """Start the server (unless --target) and Prometheus, load, drain, query; stop both."""
    server = prom = None
    try:
        if prompts is None and engine.model:  # before the server: it fails fast, costs nothing
            prompts = _prompts(args, engine.model)
        if args.target:
            base = args.target.rstrip("/")
            api_url = base if base.endswith("/v1") else base + "/v1"
            metrics_url = args.metrics_url or api_url[: -len("/v1")] + "/metrics"
            server_info = {"kind": "target", "api_url": api_url, "metrics_url": metrics_url}
        else:
            kind = "stock" if name == "stock" else ("ray" if args.ray else "streamsink")
            server = ServerProcess(kind, engine, os.path.join(logs, f"server-{name}.log"),
                                   sink=args.sink, window=args.window, replicas=args.replicas)
            print(f"[{name}] starting {kind} server (log: {server.log_path}) ...", flush=True)
            t = time.monotonic()
            server.start(timeout_s=args.startup_timeout)
            processes.append({"what": f"{name} server", "pid": server.pid, "group": True})
            print(f"[{name}] server ready in {time.monotonic() - t:.0f} s: {server.api_url}",
                  flush=True)
            api_url, metrics_url = server.api_url, server.metrics_url
            server_info = {"kind": kind, "api_url": api_url, "metrics_url": metrics_url,
                           "argv": server.argv[1:], "log": server.log_path}

        prom = PrometheusServer({name: metrics_url}, interval_s=args.scrape_interval,
                                log_path=os.path.join(logs, f"prometheus-{name}.log")).start()
        processes.append({"what": f"{name} prometheus", "pid": prom.proc.pid, "group": False})
        if not prom.wait_scraped(name, timeout_s=30):
            raise Failure(f"Prometheus cannot scrape {metrics_url} (is it the server's metrics "
                          "endpoint?)")
        model_id, tokenizer = served_model(api_url)
        if prompts is None:  # --target without --model: the served model's own tokenizer
            prompts = _prompts(args, tokenizer)
        warm_up(api_url, model_id)
        time.sleep(2 * args.scrape_interval)  # an idle baseline on the dashboard

        spec = load_client.LoadSpec(
            api_url=api_url, model=model_id, prompts=prompts, output_tokens=args.output_tokens,
            requests=args.requests, duration_s=args.duration, concurrency=concurrency,
            rate=args.rate, abort_fraction=args.abort_fraction,
            drain_timeout_s=args.drain_timeout, seed=args.seed,
            progress=not args.no_progress)
        what = f"rate {args.rate}/s" if args.rate else f"concurrency {concurrency}"
        print(f"[{name}] load: {what}, <= {args.requests} requests, {args.duration:g} s, "
              f"{args.prompt_tokens}+{args.output_tokens} tokens, abort {args.abort_fraction:g}",
              flush=True)
        result = load_client.run_load(spec)
        client = load_client.summarize(result, slos)
        drained_at, held_after, drained = wait_drained(prom, name, args.scrape_interval)
        series = {}
        start, end = result.start_unix - 3, drained_at + 2
        for key, _title, expr in SERIES:
            points = prom.query_range(expr(name), start, end, step_s=args.scrape_interval)
            series[key] = [[round(t - result.start_unix, 3), v] for t, v in points]
        return ({"name": name, "server": server_info, "client": client,
                 "held_blocks_after": held_after, "drained": drained,
                 "load_start": result.start_unix, "load_end": result.end_unix,
                 "drained_at": drained_at,
                 "promql": {key: expr(name) for key, _t, expr in SERIES},
                 "series": series}, prompts)
    except (ServerError, PrometheusError) as exc:
        raise Failure(str(exc)) from None
    finally:
        if prom is not None:
            prom.stop()
        if server is not None:
            t = time.monotonic()
            server.stop()
            print(f"[{name}] server stopped ({time.monotonic() - t:.0f} s)", flush=True)


def _prompts(args, tokenizer: str) -> list:
    # Distinct prompts for every request that can start (a stock server's prefix cache must
    # not serve one request from another's blocks); past 2,000 they repeat.
    n = min(args.requests, 2000)
    print(f"preparing {n} prompts of {args.prompt_tokens} tokens (vLLM's random dataset) ...",
          flush=True)
    return load_client.make_prompts(tokenizer, n, args.prompt_tokens, args.output_tokens,
                                    args.seed)


def served_model(api_url: str) -> tuple[str, str]:
    """(the name requests use, where its tokenizer is: vLLM's "root", the checkpoint it
    loaded, when that is a directory here; else the name, a hub id)."""
    import urllib.request

    try:
        with urllib.request.urlopen(api_url + "/models", timeout=30) as r:
            card = json.loads(r.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise Failure(f"cannot list models at {api_url}/models: {exc}") from None
    root = card.get("root") or card["id"]
    return card["id"], root if os.path.isdir(root) else card["id"]


def warm_up(api_url: str, model_id: str) -> None:
    """One tiny request before the load (not counted), as `vllm bench serve` does."""
    import urllib.request

    body = json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 4}).encode()
    req = urllib.request.Request(api_url + "/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
    except OSError as exc:
        raise Failure(f"warm-up request to {api_url} failed: {exc}") from None


def wait_drained(prom, job: str, interval: float, timeout_s: float = 90.0):
    """Wait until Prometheus sees no running/waiting request and no held streaming block on two
    scrapes in a row. Returns (time, held blocks then or None when the server has no such
    metric, drained?)."""
    time.sleep(2 * interval)  # the samples of the last moments of the load
    deadline = time.monotonic() + timeout_s
    quiet = 0
    held = None
    while True:
        busy = (prom.query(f"sum({selector('num_requests_running', job)})") or 0) + \
               (prom.query(f"sum({selector('num_requests_waiting', job)})") or 0)
        held = prom.query(f"sum({sink_selector('held_blocks', job)})")
        quiet = quiet + 1 if busy == 0 and not held else 0
        if quiet >= 2:
            return time.time(), (None if held is None else int(held)), True
        if time.monotonic() > deadline:
            return time.time(), (None if held is None else int(held)), False
        time.sleep(max(interval, 0.5))


def _finish(report: dict, out: str, plan: list[str]) -> int:
    runs = report["runs"]
    by = {r["name"]: r for r in runs}
    main = by["streamsink"]
    if "stock" in by:
        report["comparison"] = _ratios(by["streamsink"], by["stock"])
    c = main["client"]
    held = main["held_blocks_after"]
    line = (f"requests={c['requests']} ok={c['ok']} errors={c['errors']} "
            f"aborted={c['aborted']} tokens_per_s={c['tokens_per_s']:.2f} "
            f"ttft_p99_ms={c['ttft_ms'].get('p99', 0.0):.2f} "
            f"itl_p99_ms={c['itl_ms'].get('p99', 0.0):.2f} "
            f"held_blocks_after={held if held is not None else -1}")
    problems = []
    for r in runs:
        if r["client"]["http_5xx"]:
            problems.append(f"{r['name']}: {r['client']['http_5xx']} requests got HTTP 5xx")
        if r["name"] == "streamsink" and r["held_blocks_after"]:
            problems.append(f"{r['name']}: {r['held_blocks_after']} KV blocks still held after "
                            "the load drained")
        if not r["drained"]:
            problems.append(f"{r['name']}: the server did not drain within the wait")
    report["summary_line"] = line
    report["problems"] = problems
    report["exit_code"] = 1 if any("5xx" in p or "still held" in p for p in problems) else 0
    png = dashboard.render(
        os.path.join(out, "dashboard.png"), runs, [(k, t) for k, t, _e in SERIES],
        title=_title(report["config"], plan))
    report["dashboard"] = png
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _print_table(runs, report.get("comparison"))
    print(f"report: {os.path.join(out, 'report.json')}  dashboard: {png}")
    if held is None:
        print("warning: the server exports no streamsink held-blocks metric; "
              "held_blocks_after=-1 means unknown", file=sys.stderr)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(line, flush=True)
    return report["exit_code"]


def check_streaming_server(engine: EngineArgs, sink: int, window: int,
                           max_pinned: int = 0) -> int:
    """Build the streaming server's engine config here (a refusal is one line, exit 2) and
    return its KV budget in bytes."""
    config, _ = check_server_argv(server_argv(engine.model, sink, window, engine.argv(),
                                              max_pinned))
    return config.cache_config.kv_cache_memory_bytes


def _title(cfg: dict, plan: list[str]) -> str:
    load = f"rate {cfg['rate']}/s" if cfg.get("rate") else f"{cfg['concurrency']} concurrent"
    return (f"streamsink loadtest: {load}, {cfg['prompt_tokens']}+{cfg['output_tokens']} tokens, "
            f"abort {cfg['abort_fraction']:g}; "
            + (f"server {cfg['target']}" if cfg.get("target")
               else f"streamsink {cfg['sink']}+{cfg['window']}")
            + (" vs stock" if "stock" in plan else "")
            + (f"; KV {cfg['kv_cache_bytes'] / 2**20:.0f} MiB" if cfg.get("kv_cache_bytes")
               else ""))


def _peak(run: dict, key: str) -> float | None:
    values = [v for _t, v in run["series"].get(key) or []]
    return max(values) if values else None


def _rows(run: dict) -> dict:
    c = run["client"]
    return {
        "requests": c["requests"], "ok": c["ok"], "errors": c["errors"],
        "aborted": c["aborted"], "tokens/s (client)": c["tokens_per_s"],
        "goodput req/s": c["goodput_rps"],
        "TTFT p50 ms": c["ttft_ms"].get("p50"), "TTFT p99 ms": c["ttft_ms"].get("p99"),
        "ITL p50 ms": c["itl_ms"].get("p50"), "ITL p99 ms": c["itl_ms"].get("p99"),
        "E2E p50 ms": c["e2el_ms"].get("p50"), "E2E p99 ms": c["e2el_ms"].get("p99"),
        "peak running": _peak(run, "running"), "peak waiting": _peak(run, "waiting"),
        "peak KV usage %": _peak(run, "kv_usage_pct"),
        "peak held blocks": _peak(run, "held_blocks"),
        "peak gen tokens/s (server)": _peak(run, "gen_tokens_per_s"),
        "held blocks after": run["held_blocks_after"],
    }


def _ratios(ss: dict, stock: dict) -> dict:
    """streamsink / stock for the headline numbers (> 1 is better for throughput and goodput,
    < 1 is better for latencies)."""
    def ratio(a, b):
        return (a / b) if (a is not None and b) else None

    a, b = ss["client"], stock["client"]
    return {
        "tokens_per_s": ratio(a["tokens_per_s"], b["tokens_per_s"]),
        "goodput_rps": ratio(a["goodput_rps"], b["goodput_rps"]),
        "ok_requests": ratio(a["ok"], b["ok"]),
        "itl_p99_ms": ratio(a["itl_ms"].get("p99"), b["itl_ms"].get("p99")),
        "itl_p50_ms": ratio(a["itl_ms"].get("p50"), b["itl_ms"].get("p50")),
        "ttft_p99_ms": ratio(a["ttft_ms"].get("p99"), b["ttft_ms"].get("p99")),
        "e2el_p50_ms": ratio(a["e2el_ms"].get("p50"), b["e2el_ms"].get("p50")),
    }


def _print_table(runs: list[dict], comparison: dict | None) -> None:
    rows = [_rows(r) for r in runs]
    names = [r["name"] for r in runs]
    width = max(len(k) for k in rows[0])
    header = f"{'':{width}}" + "".join(f"{n:>14}" for n in names)
    if len(runs) == 2:
        header += f"{'ratio':>10}"
    print(header)
    for key in rows[0]:
        cells = [row[key] for row in rows]
        line = f"{key:{width}}" + "".join(f"{_fmt(v):>14}" for v in cells)
        if len(runs) == 2:
            a, b = cells
            line += f"{_fmt(a / b) if isinstance(a, (int, float)) and b else '':>10}"
        print(line)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)
