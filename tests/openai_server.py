"""Helpers for tests that start a real OpenAI server (`streamsink serve`) and talk HTTP to it."""
import contextlib
import os
import socket
import subprocess
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
