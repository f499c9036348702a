"""Where a generated token's time goes in `streamsink serve`, at 1 and 32 streams.

vLLM's OpenAI server is three processes here: the API process (HTTP, detokenization, the
streamed answer), the engine core (scheduler, the KV manager, the loop) and the worker (the
model step: input preparation, the model's layers, attention, the output head, sampling). On a
machine of few cores they share the cores. For each level this script starts the server as a
user does, sets N streams decoding (a 1,008-token prompt each, well past nothing: the question
here is the per-token path, not prefill), times the tokens over a window with nothing else
running (the latency a user sees), and then, for a fixed window:

- samples every process of the server with py-spy (a sampling profiler that reads the Python
  stacks from outside, without stopping the process) and sorts each sample into what it was
  doing (CATEGORIES, by the innermost frame that names a known stage);
- reads each process's and each thread's CPU time and the cores it may and did run on (/proc);
- times every token's arrival at the client.

The result splits the CPU time the three processes spend per generated token by stage, beside
the client's inter-token latency; docs/token_time.md renders it.

    .venv/bin/python benchmarks/token_time.py [--weights q4] [--streams 1 32] [--seconds 20]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import common
import peer_servers

# Process kind -> ordered (category, frame markers): a sample belongs to the first category one
# of whose markers appears in one of its frames, searched from the innermost frame outwards.
CATEGORIES = {
    "worker": [
        ("waiting for the next step (shared-memory queue poll)",
         ("sched_yield", "acquire_read", "SpinCondition.wait", "MessageQueue.dequeue")),
        ("sink shadows", ("shadow_op", "write_shadows", "ShadowWrites")),
        ("attention", ("cpu_attention_with_kv_cache", "StreamsinkAttentionImpl.forward",
                       "attend_", "DecodeBatch")),
        ("KV cache write", ("do_kv_cache_update", "unified_kv_cache_update",
                            "reshape_and_cache")),
        ("output head (logits)", ("compute_logits",)),
        ("sampling", ("Sampler.forward", "sample_tokens", "_sample")),
        ("step preparation (inputs, attention metadata, step plan)",
         ("_prepare_inputs", "_update_states", "MetadataBuilder.build", "plan_step",
          "_prepare_input_ids", "_build_attention_metadata")),
        ("model layers (linear layers, norms, activations, RoPE)",
         ("_model_forward", "LlamaModel.forward", "Runner.call")),
        ("returning outputs", ("Socket.send", "MessageQueue.enqueue", "_bookkeeping_sync")),
    ],
    "engine core": [
        ("waiting for the worker (shared-memory queue poll)",
         ("sched_yield", "acquire_read", "SpinCondition.wait", "FutureWrapper")),
        ("scheduling (KV manager included)", ("Scheduler.schedule", "allocate_slots",
                                              "get_computed_blocks")),
        ("after the step (scheduler bookkeeping, freeing)", ("update_from_output",
                                                              "free_blocks", "_free_request")),
        ("sending outputs to the API process", ("process_output_sockets", "Socket.send",
                                               "encode")),
        ("receiving requests", ("process_input_sockets", "_handle_client_request",
                                "preprocess_add_request", "decode")),
        ("handing the step to the worker", ("MessageQueue.enqueue", "collective_rpc",
                                            "execute_model")),
    ],
    "API process": [
        ("detokenization", ("detokenize", "Detokenizer", "decode_next", "convert_ids")),
        ("output processing", ("OutputProcessor", "process_outputs", "RequestState")),
        ("streamed answer (SSE, JSON)", ("completion_stream_generator",
                                         "chat_completion_stream_generator", "model_dump_json",
                                         "json.dumps", "StreamingResponse", "send")),
        ("metrics (request stats, Prometheus)", ("IterationStats", "prometheus_client",
                                                 "loggers.py", "record_")),
        ("HTTP server", ("uvicorn", "starlette", "h11", "httptools")),
        ("event loop", ("_run_once", "base_events", "selectors", "select", "Runner.run")),
    ],
}
OTHER = "other"


def categorize(kind: str, frames: list[str]) -> str:
    """The category of one sample (frames outermost first, as py-spy's raw format lists them)."""
    for frame in reversed(frames):
        for category, markers in CATEGORIES[kind]:
            if any(m in frame for m in markers):
                return category
    return OTHER


def read_raw(path: str) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: 'frame;frame;... count' per line."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if stack and count.isdigit():
                    out.append((stack.split(";"), int(count)))
    except OSError:
        pass
    return out


# -- /proc ----------------------------------------------------------------------------------------
def _stat_fields(path: str) -> list[str]:
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(f"/proc/{pid}/stat")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, dict]:
    """Per thread: name, CPU seconds, last core, cores allowed."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            fields = _stat_fields(f"{base}/stat")
            with open(f"{base}/comm") as f:
                name = f.read().strip()
            with open(f"{base}/status") as f:
                allowed = next((ln.split(":", 1)[1].strip() for ln in f
                                if ln.startswith("Cpus_allowed_list")), "?")
        except OSError:
            continue
        out[int(tid)] = {"name": name, "cpu_s": (int(fields[11]) + int(fields[12]))
                         / os.sysconf("SC_CLK_TCK"), "last_core": int(fields[36]),
                         "allowed": allowed}
    return out


def server_processes(root: int) -> dict[str, int]:
    """The API process, engine core and worker of a `streamsink serve` tree, by name."""
    found = {}
    for pid in peer_servers.process_tree(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if "EngineCore" in comm or "EngineCore" in cmd:
            found["engine core"] = pid
        elif "Worker" in comm or "Worker" in cmd:
            found["worker"] = pid
        elif "api_server" in cmd:
            found["API process"] = pid
    return found


# -- the load -------------------------------------------------------------------------------------
class Stream(threading.Thread):
    """One streamed completion; records every chunk's arrival time."""

    def __init__(self, base_url: str, model: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = base_url + "/v1/completions"
        self.body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                "temperature": 0, "stream": True, "ignore_eos": True}).encode()
        self.arrivals: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        request = urllib.request.Request(self.url, self.body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=3600) as r:
                for line in r:
                    if line.startswith(b"data: ") and b"[DONE]" not in line:
                        self.arrivals.append(time.monotonic())
        except OSError as exc:
            self.error = str(exc)


def served_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def client_view(load: list[Stream], t0: float, window: float, counts: list[int]) -> dict:
    """Tokens/s and inter-token latency of the streams between t0 and t0 + window."""
    tokens = sum(len(s.arrivals) - c for s, c in zip(load, counts))
    gaps = [b - a for s in load for a, b in zip(s.arrivals, s.arrivals[1:])
            if a >= t0 and b <= t0 + window]
    return {"window_s": window, "tokens": tokens, "tokens_per_s": tokens / window,
            "itl_ms": {"p50": 1000 * statistics.median(gaps),
                       "mean": 1000 * statistics.mean(gaps)} if gaps else None}


def measure_quietly(load: list[Stream], procs: dict[str, int], seconds: float) -> dict:
    """The client's view and each process's CPU per token over a window nobody samples."""
    before = {kind: cpu_seconds(pid) for kind, pid in procs.items()}
    counts = [len(s.arrivals) for s in load]
    t0 = time.monotonic()
    time.sleep(seconds)
    window = time.monotonic() - t0
    view = client_view(load, t0, window, counts)
    view["cpu_ms_per_token"] = {kind: 1000 * (cpu_seconds(pid) - before[kind])
                                / max(view["tokens"], 1) for kind, pid in procs.items()}
    return view


def measure_level(args, checkpoint: str, streams: int, prompt: str, logs: str) -> dict:
    engine = peer_servers.streamsink_engine(checkpoint, streams=streams, sink=args.sink,
                                            window=args.window, chunk=args.chunk,
                                            dtype=args.dtype)
    log = os.path.join(logs, f"server-{streams}.log")
    with peer_servers.start_streamsink(checkpoint, log, args.startup_timeout, sink=args.sink,
                                       window=args.window, engine=engine,
                                       eager=False) as server:
        model = served_model(server.base_url)
        warm = Stream(server.base_url, model, prompt, 8)
        warm.run()
        procs = server_processes(server.pid)
        # Enough tokens that every stream decodes through the whole window.
        budget = int((args.seconds + 60) * 200)
        load = [Stream(server.base_url, model, f"{i} {prompt}", budget) for i in range(streams)]
        for s in load:
            s.start()
        while not all(s.arrivals for s in load):
            if any(s.error for s in load) or not all(s.is_alive() for s in load):
                raise RuntimeError(f"a stream failed: {[s.error for s in load if s.error]}")
            time.sleep(0.2)
        time.sleep(args.settle)
        # First a window without the profiler: py-spy's sampling takes CPU of a 2-core
        # machine's own, so the latency a user sees is timed before it starts.
        quiet = measure_quietly(load, procs, args.seconds / 2)
        before = {kind: (cpu_seconds(pid), threads(pid)) for kind, pid in procs.items()}
        counts = [len(s.arrivals) for s in load]
        t0 = time.monotonic()
        raw = {kind: os.path.join(logs, f"{kind.replace(' ', '_')}-{streams}.raw")
               for kind in procs}
        spies = [subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--duration",
                                   str(round(args.seconds)), "--rate", str(args.rate), "--format",
                                   "raw", "--output", raw[kind], "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for kind, pid in procs.items()]
        for spy in spies:
            if spy.wait(timeout=args.seconds + 120) != 0:
                raise RuntimeError(f"py-spy failed (exit {spy.returncode}); it needs ptrace "
                                   "rights over the server's processes")
        window = time.monotonic() - t0
        after = {kind: (cpu_seconds(pid), threads(pid)) for kind, pid in procs.items()}
        profiled = client_view(load, t0, window, counts)
    tokens = profiled["tokens"]
    result = {"streams": streams, "unprofiled": quiet, **profiled, "engine": engine,
              "processes": {}}
    for kind in procs:
        cpu = after[kind][0] - before[kind][0]
        samples, uncategorized = collections.Counter(), collections.Counter()
        for frames, count in read_raw(raw[kind]):
            category = categorize(kind, frames)
            samples[category] += count
            if category == OTHER:
                uncategorized[frames[-1]] += count
        total = sum(samples.values()) or 1
        thread_rows = []
        for tid, t in sorted(after[kind][1].items()):
            used = t["cpu_s"] - before[kind][1].get(tid, {"cpu_s": 0.0})["cpu_s"]
            if used >= 0.01 * window:
                thread_rows.append({"name": t["name"], "cpu_s": used, "last_core": t["last_core"],
                                    "allowed": t["allowed"]})
        result["processes"][kind] = {
            "cpu_s": cpu, "cores_busy": cpu / window,
            "cpu_ms_per_token": 1000 * cpu / max(tokens, 1),
            "samples": dict(samples), "share": {c: n / total for c, n in samples.items()},
            # What "other" was, by innermost frame: for whoever refines CATEGORIES.
            "other_innermost": [[frame, n / total] for frame, n in uncategorized.most_common(8)],
            "threads": thread_rows}
        print(f"  {kind}: {cpu / window:.2f} cores busy, "
              f"{1000 * cpu / max(tokens, 1):.1f} CPU-ms per token", flush=True)
        for category, n in samples.most_common():
            print(f"    {100 * n / total:5.1f}%  {category}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="q4", help="the default model's format")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=int, default=20, help="sampling window")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of decoding before the window opens")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--prompt-tokens", type=int, default=1008)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--quick", action="store_true", help="1 stream, a 5 s window")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.seconds, args.settle = [1], 5, 2.0
    args.py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                         "py-spy")
    if not os.path.exists(args.py_spy):
        raise SystemExit("py-spy not found (make setup installs it into .venv)")
    from transformers import AutoTokenizer

    from streamsink.serving.engine_args import choose_model, worker_threads_environment

    choice = choose_model(None, args.weights)
    args.dtype = choice.dtype
    tokenizer = AutoTokenizer.from_pretrained(choice.path)
    ids = common.book_ids(tokenizer, "katrine-14263.txt", 2000,
                          "Lighthouse {i} stands on a rocky coast.", args.prompt_tokens)
    prompt = tokenizer.decode(ids[:args.prompt_tokens])
    logs = common.scratch_dir("token-time")
    levels = []
    for streams in args.streams:
        print(f"{streams} stream(s), --weights {args.weights} ({choice.dtype}):", flush=True)
        levels.append(measure_level(args, choice.path, streams, prompt, logs))
    path = common.save("token_time" + ("_quick" if args.quick else ""), {
        "weights": args.weights, "dtype": choice.dtype, "checkpoint": os.path.basename(choice.path),
        "sink_tokens": args.sink, "window_tokens": args.window,
        # The server's environment: this process's, with what streamsink's launcher adds.
        "env": {k: {**os.environ, **worker_threads_environment()}.get(k)
                for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                          "OMP_NUM_THREADS")},
        "categories": {kind: [c for c, _ in cats] + [OTHER] for kind, cats in CATEGORIES.items()},
        "method": "streamsink serve with N streams decoding; py-spy samples of each of its three "
                  "processes over a fixed window, sorted by stage; CPU time per process and "
                  "thread from /proc; inter-token latency at the client",
        "levels": levels}, args)
    print("wrote", path)
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
