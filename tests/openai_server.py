"""Helpers for tests that start a real OpenAI server (`streamsink serve`) and talk HTTP to it."""
import contextlib
import os
import subprocess
import threading
import time
import urllib.request

import pytest

from streamsink.serving.network import free_port  # noqa: F401  (the tests' one too)


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples on a Prometheus text page (fails if it is absent)."""
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    assert values, f"{name} not on /metrics"
    return sum(values)


@contextlib.contextmanager
def running_server(argv: list[str], log_path, start_timeout: float = 600):
    """Start a server (argv without --port; a free one is added), wait until /health answers,
    yield its base URL; terminate it afterwards. A server that exits or does not come up fails
    the test with the end of its log."""
    port = free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(argv + ["--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, VLLM_LOGGING_LEVEL="INFO"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[2:4]} exited:\n" + log_path.read_text()[-3000:])
            try:
                get(base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"{argv[2:4]} did not come up:\n" + log_path.read_text()[-3000:])
                time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class NotReady(Exception):
    """A server that exited, or did not print its ready line in time (the message says which)."""


class ReadyLineServer:
    """A server process that says it is ready with one line on stdout (`serve --ray`, whose
    replicas start long after its HTTP port opens). stdout is drained into `log` (an open file,
    which stderr writes to directly) by a thread of its own, so that the server never blocks on
    a full pipe; wait() returns the ready line's groups. Shared with benchmarks/ray_serve.py."""

    def __init__(self, argv: list[str], ready, log, env: dict) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env)
        self._ready: list = []

        def drain():
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                m = ready.match(line.strip())
                if m:
                    self._ready.append(m.groups())

        threading.Thread(target=drain, daemon=True).start()

    def wait(self, timeout_s: float) -> tuple:
        """The ready line's groups; NotReady when the server exits first or timeout_s passes
        (the process is left as it is: the caller stops it)."""
        deadline = time.time() + timeout_s
        while not self._ready:
            if self.proc.poll() is not None:
                raise NotReady("exited")
            if time.time() > deadline:
                raise NotReady(f"not ready after {timeout_s:.0f} s")
            time.sleep(1)
        return self._ready[0]
