"""Requests/s and tokens/s of `streamsink serve --ray` with 1 and with 2 replicas, same load.

Each app is started by the real command (one after the other, in this one run), waited for by
its ready line, loaded by vLLM's own serving benchmark (`vllm.benchmarks.serve`: random prompts,
fixed output length, a fixed number of concurrent clients) and stopped with SIGTERM.
On a 2-core machine the two replicas share the same two cores: this measures what a second
replica buys *here*, not on a machine with a core budget per replica.

    python benchmarks/ray_serve.py [--replicas 1 2] [--prompts 32] [--concurrency 8]
Writes benchmarks/results/ray_serve/<date>-<commit>.json, with vLLM's serving benchmark output
(every request's latencies) for each run.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from common import load as load_result
from common import save, scratch_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests")]
from openai_server import NotReady, ReadyLineServer  # noqa: E402  (the tests' launcher)

from streamsink.serving.network import free_port  # noqa: E402
from streamsink.serving.ray_serve import READY_LINE  # noqa: E402


def start_app(replicas: int, engine_args: list[str], log_path: str):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    log = open(log_path, "w")
    t0 = time.time()
    app = ReadyLineServer(
        [sys.executable, "-m", "streamsink.serving.cli", "serve", "--ray", "--replicas",
         str(replicas), "--port", str(free_port()), "--metrics-port", str(free_port()),
         *engine_args], READY_LINE, log, env)
    try:
        api, metrics, _ = app.wait(1200)
    except NotReady as exc:
        if app.proc.poll() is None:
            app.proc.send_signal(signal.SIGTERM)
        raise SystemExit(f"serve --ray {exc}; see {log_path}") from None
    return app.proc, api, metrics, time.time() - t0


def stop_app(proc) -> tuple[int, int]:
    """SIGTERM; (exit code, processes of the app still alive 30 s later)."""
    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    _, alive = psutil.wait_procs(family, timeout=30)
    return rc, len(alive)


def load(api: str, model: str, prompts: int, concurrency: int, input_len: int,
         output_len: int, out_dir: str, label: str) -> dict:
    """vLLM's serving benchmark against the app's OpenAI completions endpoint."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    base = api.rsplit("/v1", 1)[0]
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", model, "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result",
        "--result-dir", out_dir, "--result-filename", f"vllm_bench_{label}.json",
        "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99"])
    return main(args)


def scrape(url: str) -> dict:
    """{(name, ReplicaId): value} of a Prometheus page (other labels summed over)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("ReplicaId", ""))
            out[key] = out.get(key, 0) + s.value
    return out


def long_prompt(model: str, tokens: int) -> str:
    """`tokens` tokens of a public-domain book (the team's shared data) or of numbered lines."""
    from transformers import AutoTokenizer

    from common import SHARED_DATA

    tok = AutoTokenizer.from_pretrained(model)
    book = os.path.join(SHARED_DATA, "katrine-14263.txt")
    if os.path.exists(book):
        with open(book, encoding="utf-8") as f:
            text = f.read()
    else:
        text = " ".join(f"Line {i} of a long list of numbered lines." for i in range(20000))
    return tok.decode(tok(text)["input_ids"][:tokens])


def stream_long(api: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream a completion back through the `openai` client; time to first token and total."""
    from openai import OpenAI

    client = OpenAI(base_url=api, api_key="unused", timeout=1800, max_retries=0)
    t0 = time.time()
    first, pieces, usage = None, 0, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            pieces += 1
            first = first or time.time()
        if chunk.usage is not None:
            usage = chunk.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "streamed_chunks": pieces, "ttft_s": round(first - t0, 1),
            "total_s": round(time.time() - t0, 1)}


def engines(proc) -> list:
    import psutil

    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "EngineCore" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_and_recover(proc, api: str, metrics: str, model: str) -> dict:
    """kill -9 one replica's engine process; count answers meanwhile; time until a new
    replica (a ReplicaId not seen before) has served a request."""
    from openai import OpenAI

    client = OpenAI(base_url=api, api_key="unused", timeout=300, max_retries=0)
    before = {r for (n, r), v in scrape(metrics).items()
              if n == "ray_vllm_request_success_total" and v > 0}
    victim = engines(proc)[0]
    victim.kill()
    t0 = time.time()
    ok = failed = 0
    while time.time() - t0 < 900:
        try:
            client.completions.create(model=model, prompt="Hello", max_tokens=4)
            ok += 1
        except Exception:
            failed += 1
        new = {r for (n, r), v in scrape(metrics).items()
               if n == "ray_vllm_request_success_total" and v > 0 and r not in before}
        if new:
            return {"killed_pid": victim.pid, "replacement_served_after_s":
                    round(time.time() - t0, 1), "answered_meanwhile": ok,
                    "failed_meanwhile": failed, "engines_after": len(engines(proc))}
        time.sleep(1)
    return {"killed_pid": victim.pid, "replacement_served_after_s": None,
            "answered_meanwhile": ok, "failed_meanwhile": failed}


METRIC_NAMES = ("ray_vllm_time_to_first_token_seconds_count",
                "ray_vllm_inter_token_latency_seconds_count",
                "ray_vllm_e2e_request_latency_seconds_count", "ray_vllm_generation_tokens_total",
                "ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting",
                "ray_vllm_kv_cache_usage_perc", "ray_vllm_streamsink_held_blocks",
                "ray_vllm_streamsink_streams", "ray_vllm_streamsink_freed_blocks_total",
                "ray_vllm_streamsink_evicted_tokens_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--window", type=int, default=508)
    parser.add_argument("--long-prompt", type=int, default=12000,
                        help="with 2 replicas: stream a prompt this long, then kill an engine")
    args = parser.parse_args()

    from streamsink.model_store import resolve_model

    model = resolve_model(None)
    # The command: --max-model-len 4096 --window 508 (vLLM picks the chunk size).
    engine_args = ["--model", model, "--window", str(args.window), "--max-model-len", "4096"]
    runs, checks = [], {}
    work = scratch_dir("ray-serve")  # logs and vLLM's per-load files
    for n in args.replicas:
        log_path = os.path.join(work, f"ray_serve_{n}.log")
        proc, api, metrics, startup_s = start_app(n, engine_args, log_path)
        try:
            # One short warm-up request per replica so no run pays a first-request cost.
            load(api, model, n * 2, n * 2, 32, 8, work, f"warmup_{n}")
            r = load(api, model, args.prompts, args.concurrency, args.input_len,
                     args.output_len, work, f"replicas_{n}")
            if n == 2 and args.long_prompt:
                checks["long_prompt"] = stream_long(api, model, long_prompt(model,
                                                    args.long_prompt), 64)
                print(checks, flush=True)
                time.sleep(5)  # two metric export intervals
                samples = scrape(metrics)
                checks["metrics_per_replica"] = {
                    name: {rid[:8]: v for (m, rid), v in samples.items() if m == name}
                    for name in METRIC_NAMES}
                print(checks, flush=True)
                checks["kill"] = kill_and_recover(proc, api, metrics, model)
                print(checks, flush=True)
        finally:
            rc, left = stop_app(proc)
        runs.append({"replicas": n, "startup_s": round(startup_s, 1), "exit_code": rc,
                     "processes_left": left,
                     "completed": r["completed"], "failed": r.get("failed", 0),
                     "duration_s": r["duration"],
                     "requests_per_s": r["request_throughput"],
                     "output_tokens_per_s": r["output_throughput"],
                     "total_tokens_per_s": r["total_token_throughput"],
                     "ttft_ms_p50": r["median_ttft_ms"], "ttft_ms_p99": r["p99_ttft_ms"],
                     "itl_ms_p50": r["median_itl_ms"], "itl_ms_p99": r["p99_itl_ms"],
                     "e2el_ms_p50": r["median_e2el_ms"], "e2el_ms_p99": r["p99_e2el_ms"],
                     # vLLM's own record of the load: every request's latencies
                     "vllm_bench": load_result(os.path.join(work,
                                                            f"vllm_bench_replicas_{n}.json"))})
        print(runs[-1], flush=True)
    payload = {"what": "streamsink serve --ray, N replicas, same load (vllm.benchmarks.serve)",
               "load": {"prompts": args.prompts, "concurrency": args.concurrency,
                        "input_len": args.input_len, "output_len": args.output_len},
               "engine_args": engine_args[2:], "model": "SmolLM2-135M-Instruct fp32",
               "note": "2 cores shared by all replicas (and by other jobs on the machine at "
                       "the time of the run)",
               "runs": runs, "checks_2_replicas": checks}
    print(save("ray_serve", payload, args))


if __name__ == "__main__":
    main()
