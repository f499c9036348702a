"""A real Prometheus server on loopback for one load test: generated config, temporary TSDB,
range queries through its HTTP API, stopped (and its store removed) at the end.

Debian ships it as the `prometheus` package (`/usr/bin/prometheus`); scripts/setup.sh installs it
when run as root. Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from streamsink.serving.network import free_port

HOW_TO_GET = ("prometheus not found: install Debian's package (`apt-get install -y prometheus`, "
              "as root; `make setup` does it) or put a `prometheus` binary on PATH "
              "(or set STREAMSINK_PROMETHEUS)")


class PrometheusError(RuntimeError):
    """Prometheus missing, not starting, or a query it refused (one-line message)."""


def find_prometheus() -> str | None:
    """The prometheus binary: $STREAMSINK_PROMETHEUS, PATH, or Debian's /usr/bin path."""
    explicit = os.environ.get("STREAMSINK_PROMETHEUS")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def scrape_config(jobs: dict[str, str], interval_s: float = 1.0) -> str:
    """Prometheus YAML scraping each job's metrics URL (job name -> http://host:port/path).
    JSON is valid YAML, so no YAML library is needed."""
    configs = []
    for job, url in jobs.items():
        parts = urllib.parse.urlsplit(url)
        configs.append({"job_name": job, "scheme": parts.scheme or "http",
                        "metrics_path": parts.path or "/metrics",
                        "scrape_interval": f"{interval_s:g}s",
                        "scrape_timeout": f"{interval_s:g}s",
                        "static_configs": [{"targets": [parts.netloc]}]})
    return json.dumps({"global": {"scrape_interval": f"{interval_s:g}s",
                                  "evaluation_interval": f"{interval_s:g}s"},
                       "scrape_configs": configs}, indent=1)


class PrometheusServer:
    """`with PrometheusServer({"job": "http://127.0.0.1:8000/metrics"}) as prom: ...`

    Targets that are not up yet are fine: Prometheus records `up == 0` and keeps trying, so the
    jobs of servers started later (one after another) can all be listed up front."""

    def __init__(self, jobs: dict[str, str], interval_s: float = 1.0, port: int | None = None,
                 log_path: str | None = None) -> None:
        self.jobs = dict(jobs)
        self.interval_s = interval_s
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = 60) -> "PrometheusServer":
        binary = find_prometheus()
        if binary is None:
            raise PrometheusError(HOW_TO_GET)
        self.workdir = tempfile.mkdtemp(prefix="streamsink-prometheus-")
        config = os.path.join(self.workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(scrape_config(self.jobs, self.interval_s))
        log_path = self.log_path or os.path.join(self.workdir, "prometheus.log")
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(self.workdir, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1d", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # a terminal's Ctrl-C reaches us; we stop it in stop()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                tail = _tail(log_path)
                self.stop()
                raise PrometheusError(f"prometheus exited at start: {tail}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout_s:.0f} s")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server and remove its store (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP API ----------------------------------------------------------------------------
    def _api(self, path: str, params: dict) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression
            body = json.loads(exc.read() or b"{}")
        except OSError as exc:
            raise PrometheusError(f"prometheus query failed: {exc}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"prometheus refused {params.get('query')!r}: "
                                  f"{body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> float | None:
        """An instant query summed over its series; None when it has no series."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        result = self._api("query", params)["result"]
        values = [float(r["value"][1]) for r in result]
        values = [v for v in values if v == v]  # drop NaN (e.g. a quantile of no samples)
        return sum(values) if values else None

    def query_range(self, expr: str, start: float, end: float,
                    step_s: float = 1.0) -> list[tuple[float, float]]:
        """A range query as [(unix time, value)], the series summed point-wise (the expressions
        the load test asks are already aggregated; NaN points are dropped)."""
        result = self._api("query_range", {"query": expr, "start": f"{start:.3f}",
                                           "end": f"{end:.3f}", "step": f"{step_s:g}"})["result"]
        points: dict[float, float] = {}
        for series in result:
            for t, v in series["values"]:
                v = float(v)
                if v == v:
                    points[float(t)] = points.get(float(t), 0.0) + v
        return sorted(points.items())

    def target_up(self, job: str) -> bool:
        return (self.query(f'up{{job="{job}"}}') or 0) >= 1

    def wait_scraped(self, job: str, timeout_s: float = 30) -> bool:
        """Wait until Prometheus has scraped the job's target successfully."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.target_up(job):
                return True
            time.sleep(0.5)
        return False


def _tail(path: str, n: int = 300) -> str:
    try:
        with open(path, errors="replace") as f:
            return " ".join(f.read()[-n:].split())
    except OSError:
        return "(no log)"
