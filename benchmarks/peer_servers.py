"""The two servers of the llama.cpp comparison, each a subprocess on loopback that we start, watch
and stop: `llama-server` (context shift) and `streamsink serve`; plus a sampler of a process
tree's resident memory.

Both get the same thread budget and greedy decoding by default (the load test's requests name
no temperature, so each server's default applies: `--temp 0` for llama-server, an overridden
generation config for vLLM).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from common import kv_bytes_per_token
from streamsink.serving.network import free_port
from streamsink.stream_rule import StreamShape, max_blocks_held, row_tokens

BLOCK = 128  # vLLM's CPU KV block size


class ServerFailed(RuntimeError):
    """A server that exited or never became ready (names its log)."""


def llama_server_argv(binary: str, gguf: str, *, slots: int, slot_ctx: int, keep: int,
                      threads: int, port: int, kv_type: str | None, batch: int,
                      cache_reuse: int = 0) -> list[str]:
    """llama-server with one slot per stream, each slot `slot_ctx` tokens, context shift on."""
    argv = [binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "--ctx-size", str(slot_ctx * slots),
            # one KV stream per slot (not a shared pool): slot_ctx tokens each
            "--no-kv-unified",
            "--keep", str(keep), "--context-shift", "--cont-batching", "--metrics",
            "--threads", str(threads), "--threads-batch", str(threads),
            "--batch-size", str(batch),
            "--temp", "0",
            # No idle-slot prompt cache in RAM: it would hold finished streams' state and blur the
            # memory comparison; every request of the load has a distinct prompt anyway.
            "--cache-ram", "0",
            "--no-warmup"]
    if kv_type:
        argv += ["--cache-type-k", kv_type, "--cache-type-v", kv_type]
    if cache_reuse:
        argv += ["--cache-reuse", str(cache_reuse)]
    return argv


def blocks_per_stream(sink: int, window: int) -> int:
    """KV blocks one decoding stream of S+W holds at most (benchmarks/load.py's sizing)."""
    return max_blocks_held(StreamShape(sink, window), BLOCK, 1)


def streamsink_engine(model: str, *, streams: int, sink: int, window: int, chunk: int,
                      dtype: str = "float32") -> dict:
    """KV budget and row width for `streams` concurrent streams of S+W: every stream's
    blocks_per_stream at once."""
    per_stream = blocks_per_stream(sink, window)
    row = row_tokens(StreamShape(sink, window), BLOCK, chunk)
    # + 1: vLLM keeps one block of the pool to itself (the null block), and it refuses to start
    # unless one request of max_model_len fits in the rest.
    blocks = max(streams * per_stream, math.ceil(row / BLOCK)) + 1
    return {"kv_cache_bytes": blocks * BLOCK * kv_bytes_per_token(model, dtype),
            "kv_blocks": blocks, "max_model_len": row, "max_num_batched_tokens": chunk,
            "max_num_seqs": streams, "dtype": dtype}


def streamsink_argv(model: str, *, sink: int, window: int, port: int, engine: dict,
                    eager: bool) -> list[str]:
    argv = [sys.executable, "-m", "streamsink.serving.cli", "serve", "--model", model,
            "--sink", str(sink), "--window", str(window),
            "--host", "127.0.0.1", "--port", str(port),
            "--kv-cache-memory-bytes", str(engine["kv_cache_bytes"]),
            "--max-model-len", str(engine["max_model_len"]),
            "--max-num-batched-tokens", str(engine["max_num_batched_tokens"]),
            "--max-num-seqs", str(engine["max_num_seqs"]),
            "--dtype", engine.get("dtype", "float32"),
            "--override-generation-config", json.dumps({"temperature": 0.0}),
            "--disable-uvicorn-access-log"]
    return argv + (["--enforce-eager"] if eager else [])


class Server:
    """A server subprocess in its own session (vLLM's engine process is in that group too, so
    stop() reaches it)."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, log_path: str,
                 env: dict | None = None) -> None:
        self.name, self.argv, self.port = name, argv, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.ready_path, self.log_path, self.env = ready_path, log_path, env
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout_s: float) -> float:
        """Start and wait until ready; returns the seconds it took."""
        t0 = time.monotonic()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=self.env)
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited at start (code {self.proc.returncode}); "
                                   f"log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + self.ready_path, timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise ServerFailed(f"{self.name} not ready after {timeout_s:.0f} s; "
                                   f"log: {self.log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_llama_server(binary: str, gguf: str, log_path: str, timeout_s: float = 300,
                       **kw) -> Server:
    port = free_port()
    server = Server("llama-server", llama_server_argv(binary, gguf, port=port, **kw), port,
                    "/health", log_path)
    server.start(timeout_s)
    return server


def llama_slot_ctx(base_url: str) -> int:
    """The context of each slot, as the running llama-server reports it (/props)."""
    with urllib.request.urlopen(base_url + "/props", timeout=30) as r:
        return int(json.loads(r.read())["default_generation_settings"]["n_ctx"])


def start_streamsink(model: str, log_path: str, timeout_s: float, **kw) -> Server:
    port = free_port()
    # The server as a user starts it: not the in-process engine the benchmark scripts ask for.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    server = Server("streamsink", streamsink_argv(model, port=port, **kw), port, "/v1/models",
                    log_path, env=env)
    server.start(timeout_s)
    return server


# -- memory -------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_mib(root: int) -> dict:
    """Resident memory of a process and its descendants: RSS summed (counts shared pages once per
    process) and PSS summed (shares them out; the better total)."""
    pids = process_tree(root)
    rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return {"processes": len(pids), "rss_mib": rss / 1024, "pss_mib": pss / 1024}


class MemorySampler:
    """Samples tree_memory_mib(root) every `interval_s` in a thread, between start() and stop()."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        self.root, self.interval_s = root, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append({"t": round(time.monotonic() - t0, 2),
                                 **tree_memory_mib(self.root)})
            self._stop.wait(self.interval_s)

    def start(self) -> "MemorySampler":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        peak = lambda k: max((s[k] for s in self.samples), default=None)  # noqa: E731
        return {"peak_rss_mib": peak("rss_mib"), "peak_pss_mib": peak("pss_mib"),
                "first": self.samples[0] if self.samples else None,
                "interval_s": self.interval_s, "samples": self.samples}
