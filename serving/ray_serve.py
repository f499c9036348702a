"""`streamsink serve --ray`: N streaming vLLM replicas on Ray Serve LLM behind one OpenAI endpoint.

Our code is glue: ray.serve.llm's LLMConfig + build_openai_app + serve.run do the serving,
routing, health checks and replica replacement; Ray's Prometheus export serves the metrics
(vLLM's engine metrics through log_engine_metrics, streamsink's through the plugin, see
plugin/metrics.py). This module checks the configuration first (ray_config.py), starts or joins
Ray, prints one ready line, and on SIGINT/SIGTERM takes everything down again.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import threading
import time

from streamsink.serving.ray_config import EngineArgsError, RaySpec, build_spec

APP_NAME = "streamsink"
READY_PREFIX = "streamsink serve --ray: ready"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# On 2 cores the ingress and N replicas would not all schedule with one logical CPU per core.
MIN_LOGICAL_CPUS = 8
OBJECT_STORE_BYTES = 512 << 20
# Ray's metrics export interval (ms): gauges refresh within ~2 s of a change.
METRICS_REPORT_INTERVAL_MS = 2000
RAY_START_ATTEMPTS = 3


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Stop:
    """SIGINT/SIGTERM set an event instead of raising in the middle of Ray's calls."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None
        self.error: str | None = None  # why deploy() failed

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        self.event.set()


def start_ray(host: str, metrics_port: int | None) -> tuple[bool, int | None]:
    """Join $RAY_ADDRESS, or start a local Ray; (whether we started it, metrics port)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        # A cluster user's Ray: its nodes export metrics on the ports `ray start` gave them.
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING",
                 log_to_driver=False)
        if metrics_port is not None:
            print(f"streamsink serve --ray: --metrics-port is ignored with RAY_ADDRESS "
                  f"(the cluster's nodes export on their own ports)", file=sys.stderr)
        return False, _local_metrics_port()
    metrics_port = metrics_port or _free_port("127.0.0.1")
    for attempt in range(RAY_START_ATTEMPTS):
        try:
            _init_local_ray(metrics_port)
            return True, metrics_port
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register; a machine busy enough misses that.
            ray.shutdown()
            _reap(_our_processes(), 5)
            if "timed out during startup" not in str(exc) or attempt + 1 == RAY_START_ATTEMPTS:
                raise
            print(f"streamsink serve --ray: Ray start timed out, retrying", file=sys.stderr)
    raise AssertionError("unreachable")


def _init_local_ray(metrics_port: int) -> None:
    import ray

    with _agent_ports():
        _ray_init(metrics_port)


class _agent_ports:
    """Give the Ray node's agents ports of their own for the length of ray.init.

    Why: the raylet waits a fixed 15 s for each agent port it has to discover (a port file the
    agent writes once it has bound one), then aborts ("timed out during startup"). With several
    Ray nodes on one machine (the default agent port 52365 is then taken) or a busy machine
    (the agent's imports take longer) that wait is missed. A port given up front is used as it
    is. ray.init has no parameter for these, so its RayParams gets them while it runs."""

    FIELDS = ("metrics_agent_port", "dashboard_agent_listen_port", "runtime_env_agent_port")

    def __enter__(self):
        from ray._private import parameter

        ports = {field: _free_port("127.0.0.1") for field in self.FIELDS}
        self.original = original = parameter.RayParams.__init__

        def init_with_ports(params, *args, **kwargs):
            original(params, *args, **kwargs)
            for field, port in ports.items():
                if not getattr(params, field, None) or field == "dashboard_agent_listen_port":
                    setattr(params, field, port)

        parameter.RayParams.__init__ = init_with_ports
        return self

    def __exit__(self, *exc) -> None:
        from ray._private import parameter

        parameter.RayParams.__init__ = self.original


def _ray_init(metrics_port: int) -> None:
    import ray

    ray.init(
        num_cpus=max(MIN_LOGICAL_CPUS, os.cpu_count() or 1),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS,
                        # Idle workers (prestarted per logical CPU, or left over from Serve
                        # LLM's node-initialisation tasks) hold ~0.5-1 GB each with vLLM
                        # imported: start none, keep none.
                        "enable_worker_prestart": False,
                        "num_workers_soft_limit": 0,
                        # The raylet waits this long for its agent (metrics export) to come
                        # up, then aborts: on a busy 2-core machine the agent's imports alone
                        # can take longer than the default.
                        "agent_register_timeout_ms": 300_000},
        logging_level="WARNING",
        log_to_driver=False,
    )


def _local_metrics_port() -> int | None:
    import ray

    me = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == me:
            return node.get("MetricsExportPort")
    return None


def deploy(spec: RaySpec, host: str, port: int, api_key: str | None) -> None:
    """Start Serve's HTTP proxy on host:port and run the OpenAI app (blocks until healthy)."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    serve.start(http_options={"host": host, "port": port})
    if api_key:
        from streamsink.serving.ray_auth import build_openai_app_with_key

        app = build_openai_app_with_key(spec.llm_config(), api_key)
    else:
        app = build_openai_app({"llm_configs": [spec.llm_config()]})
    serve.run(app, name=APP_NAME, route_prefix="/")


def _our_processes() -> list:
    """Every process below this one (Ray's GCS, raylet, workers, their engine processes), and
    the processes of the Ray session we started (Ray names it session_<time>_<our pid>): Ray's
    agents outlive a raylet that dies first, re-parented."""
    import re

    import psutil

    try:
        found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        found = {}
    session = re.compile(rf"session_[0-9_-]+_{os.getpid()}\b")
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and session.search(" ".join(p.info["cmdline"] or [])):
                found.setdefault(p.pid, p)
        except psutil.Error:
            pass
    return list(found.values())


def _reap(procs: list, grace_s: float) -> None:
    """Wait up to grace_s for procs to exit, then kill what is left."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def shutdown(started_ray: bool) -> None:
    """Stop the app (and Ray when we started it); then make sure nothing of ours is left: an
    engine process whose replica was killed would otherwise outlive it."""
    import ray
    from ray import serve

    leftovers = _our_processes() if started_ray else []
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)  # someone else's cluster: leave its other apps alone
    except Exception as exc:  # already gone; shutting down anyway
        print(f"streamsink serve --ray: serve shutdown: {exc}", file=sys.stderr)
    ray.shutdown()
    if started_ray:
        _reap(leftovers + _our_processes(), 15)


def run_ray_serve(args) -> int:
    host = args.host or DEFAULT_HOST
    port = args.port or DEFAULT_PORT
    replicas = args.replicas or 1
    api_key = args.api_key or os.environ.get("STREAMSINK_API_KEY") or None
    if not _is_loopback(host) and not api_key:
        # Ray Serve's HTTP proxy checks no credentials: beyond loopback, ask for a key.
        print(f"streamsink: error: --host {host} opens the API beyond this machine; give "
              f"--api-key KEY (or $STREAMSINK_API_KEY) so clients must authenticate",
              file=sys.stderr)
        return 2
    try:
        spec = build_spec(args.model, args.sink, args.window, replicas, args.vllm_args)
    except EngineArgsError as exc:
        print(f"streamsink: error: {exc}", file=sys.stderr)
        return 2
    stop = _Stop()
    started_ray = ray_up = False
    try:
        try:
            started_ray, metrics_port = start_ray(host, args.metrics_port)
        except Exception as exc:  # no cluster at RAY_ADDRESS, a port taken, ...
            print(f"streamsink: error: Ray did not start: {' '.join(str(exc).split())[:300]}",
                  file=sys.stderr)
            if not os.environ.get("RAY_ADDRESS"):
                _reap(_our_processes(), 5)  # whatever part of a local Ray did start
            return 1
        ray_up = True
        # After ray.init: Ray's core worker installs its own fatal-signal handler for SIGTERM
        # (it logs and aborts); ours must be the one that runs.
        stop.install()
        print(f"streamsink serve --ray: starting {replicas} replica(s) of {spec.model_id} "
              f"(engine args {spec.engine_kwargs})", flush=True)
        deployer = threading.Thread(target=_deploy_into,
                                    args=(spec, host, port, api_key, stop),
                                    daemon=True)
        deployer.start()
        while deployer.is_alive() and not stop.event.is_set():
            deployer.join(0.5)
        if stop.event.is_set():
            return 0
        if stop.error is not None:
            print(f"streamsink: error: the app did not start: {stop.error}", file=sys.stderr)
            return 1
        h = _url_host(host)
        print(f"{READY_PREFIX} api=http://{h}:{port}/v1 metrics=http://{h}:{metrics_port}"
              f"/metrics replicas={replicas}", flush=True)
        while not stop.event.wait(1.0):  # a timed wait: signal handlers run in between
            pass
        return 0
    finally:
        if ray_up:
            print("streamsink serve --ray: shutting down", file=sys.stderr, flush=True)
            shutdown(started_ray)


def _deploy_into(spec: RaySpec, host: str, port: int, api_key: str | None,
                 stop: _Stop) -> None:
    """deploy() off the main thread, so a signal during the minutes of start-up still stops."""
    try:
        deploy(spec, host, port, api_key)
    except Exception as exc:
        stop.error = " ".join(str(exc).split())[:500] or type(exc).__name__
