"""Ray's lifecycle for streamsink's launchers (serve --ray, batch): join the cluster named by
--address or $RAY_ADDRESS or start a private local instance, and stop it again leaving nothing
behind.

A local instance is started with address="local" (never someone else's `ray start` cluster),
more logical CPUs than physical cores (on a 2-core machine the ingress or Ray Data's small tasks
and the engine replicas would otherwise wait for each other), a small object store, no
dashboard, no idle workers kept (each holds ~0.5-1 GB with vLLM imported), and a metrics export
port of our choosing (Prometheus text; vLLM's and streamsink's engine metrics travel there).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

import psutil

from streamsink.patches.ray_agent_ports import fixed_agent_ports
from streamsink.serving.network import free_port
from streamsink.serving.processes import ray_sigterm_is_a_stop, reap

MIN_LOGICAL_CPUS = 8
OBJECT_STORE_BYTES = 512 << 20
# Ray's metrics export interval (ms): gauges refresh within ~2 s of a change.
METRICS_REPORT_INTERVAL_MS = 2000
START_ATTEMPTS = 3
# Ray's system settings for a local instance (shared with tests that start Ray nodes of their
# own, e.g. the two-node cluster of test_ray_cluster.py).
LOCAL_SYSTEM_CONFIG = {
    "metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS,
    "enable_worker_prestart": False,
    "num_workers_soft_limit": 0,
    # On a busy 2-core machine the agent's imports alone can take longer than the raylet's
    # default wait for it.
    "agent_register_timeout_ms": 300_000,
}

# Environment of a local instance's processes (set in the launcher before Ray starts, which its
# processes inherit; setdefault: the user's own value wins). Serve's controller gives a new HTTP
# proxy three readiness checks of 5 s before it kills it, and serve.start then fails with an
# ActorDiedError; on a busy 2-core machine the proxy's start alone can take longer.
LOCAL_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


@dataclass
class RayHandle:
    started: bool                 # a local instance we started (and must stop)
    metrics_port: int | None      # Ray's Prometheus export on this node


def cluster_address(given: str | None = None) -> str | None:
    """The cluster to join: --address, else $RAY_ADDRESS, else None (start a local Ray)."""
    return given or os.environ.get("RAY_ADDRESS") or None


def start_or_join(metrics_port: int | None = None, verbose: bool = False,
                  address: str | None = None) -> RayHandle:
    """Join the cluster at `address` (or $RAY_ADDRESS), or start a local Ray (retrying a start
    the raylet gave up on). Raises processes.Interrupted when SIGTERM arrives meanwhile."""
    with ray_sigterm_is_a_stop():  # ray.init installs its own SIGTERM handler first thing
        return _start_or_join(metrics_port, verbose, cluster_address(address))


def _start_or_join(metrics_port: int | None, verbose: bool, address: str | None) -> RayHandle:
    import ray

    quiet = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        # A cluster user's Ray: its nodes export metrics on the ports `ray start` gave them.
        ray.init(address=address, **quiet)
        if metrics_port is not None:
            print("streamsink: --metrics-port is ignored on a cluster (its nodes export on "
                  "their own ports)", file=sys.stderr)
        return RayHandle(False, _node_metrics_port())
    metrics_port = metrics_port or free_port()
    for name, value in LOCAL_ENV.items():
        os.environ.setdefault(name, value)
    for attempt in range(START_ATTEMPTS):
        try:
            with fixed_agent_ports(free_port):
                ray.init(address="local", num_cpus=max(MIN_LOGICAL_CPUS, os.cpu_count() or 1),
                         object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                         _metrics_export_port=metrics_port,
                         _system_config=LOCAL_SYSTEM_CONFIG, **quiet)
            return RayHandle(True, metrics_port)
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register; a machine busy enough misses that.
            ray.shutdown()
            reap(session_processes(), 5)
            if "timed out during startup" not in str(exc) or attempt + 1 == START_ATTEMPTS:
                raise
            print("streamsink: Ray start timed out, retrying", file=sys.stderr)
    raise AssertionError("unreachable")


def _node_metrics_port() -> int | None:
    import ray

    me = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node.get("Alive") and node.get("NodeManagerAddress") == me:
            return node.get("MetricsExportPort")
    return None


def session_processes() -> list[psutil.Process]:
    """The processes of the local Ray session this process started (Ray names it
    session_<time>_<driver pid>): its agents outlive a raylet that dies first."""
    session = re.compile(rf"session_[0-9_-]+_{os.getpid()}\b")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and session.search(" ".join(p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def stop(handle: RayHandle | None) -> None:
    """Disconnect (a joined cluster), or shut down the instance we started and reap what is
    left of its session."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if handle is not None and handle.started:
        reap(session_processes(), 10)
