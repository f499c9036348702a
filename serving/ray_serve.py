"""`streamsink serve --ray`: N streaming vLLM replicas on Ray Serve LLM behind one OpenAI endpoint.

Our code is glue: ray.serve.llm's LLMConfig + build_openai_app + serve.run do the serving,
routing, health checks and replica replacement; Ray's Prometheus export serves the metrics
(vLLM's engine metrics through log_engine_metrics, streamsink's through the plugin, see
plugin/metrics.py). This module checks the configuration first (ray_config.py), starts or joins
Ray (ray_cluster.py), with --spread puts each replica on a node of its own (ray_spread.py),
prints one ready line, and on SIGINT/SIGTERM — at any moment, start-up included — takes
everything down again (processes.py) and exits 0. A replica no node has room for ends the
start-up with one line after ray_spread.PLACEMENT_TIMEOUT_S instead of a wait without end.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

from streamsink.errors import UsageError, one_line
from streamsink.patches.ray_serve_api_key import build_openai_app_with_key
from streamsink.serving import processes, ray_cluster, ray_spread
from streamsink.serving.network import LOOPBACK, api_key, url_host
from streamsink.serving.ray_config import RaySpec, build_spec

APP_NAME = "streamsink"
READY_PREFIX = "streamsink serve --ray: ready"
# The ready line whole, for whoever waits on the app (tests, benchmarks): its API URL, its
# metrics URL and the number of replicas. (The prefix holds no regex metacharacter.)
READY_LINE = re.compile(rf"^{READY_PREFIX} api=(\S+) metrics=(\S+) replicas=(\d+)$")
DEFAULT_PORT = 8000


def deploy(spec: RaySpec, host: str, port: int, key: str | None) -> None:
    """Start Serve's HTTP proxy on host:port and submit the OpenAI app (returns at once; the
    replicas start in the background: app_state() says when they are up)."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    serve.start(http_options={"host": host, "port": port})
    if key:
        app = build_openai_app_with_key(spec.llm_config(), key)
    else:
        app = build_openai_app({"llm_configs": [spec.llm_config()]})
    serve.run_many([serve.RunTarget(target=app, name=APP_NAME, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)


def app_state() -> tuple[str, str]:
    """(status, message) of the app: RUNNING once every replica is healthy."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return (str(app.status.value), app.message or "") if app else ("NOT_STARTED", "")


def shutdown(handle: ray_cluster.RayHandle, deployed: bool) -> None:
    """A Ray we started: stop every process of it (Serve's controller, proxy and replicas are
    Ray's processes). Someone else's cluster: delete our app if this run deployed it (a run
    refused before deploying leaves the app already there alone) and disconnect."""
    from ray import serve

    if handle.started:
        processes.stop_descendants()
        ray_cluster.stop(handle)  # reaps what is left of the session
        return
    if deployed:
        try:
            serve.delete(APP_NAME, _blocking=False)  # leave the cluster's other apps alone
            # That delete is a message to Serve's controller that nothing waits for, and one
            # still unsent when we disconnect is lost (the app then runs on). A query after it
            # (one caller's calls to an actor arrive in order) makes sure it went out.
            serve.status()
        except Exception as exc:  # already gone; disconnecting anyway
            print(f"streamsink serve --ray: serve delete: {exc}", file=sys.stderr)
    ray_cluster.stop(handle)


def run(args) -> int:
    host = args.host or LOOPBACK
    port = args.port or DEFAULT_PORT
    replicas = args.replicas or 1
    key = api_key(args.api_key)  # serve.run checked the exposure rule already
    address = ray_cluster.cluster_address(args.address)
    if args.spread and replicas > 1 and not address:
        # A Ray started here has one node: refused before anything loads.
        raise UsageError("--spread puts each replica on a node of its own: join a cluster "
                         "with --address or $RAY_ADDRESS")
    spec = build_spec(args.model, args.sink, args.window, replicas, args.vllm_args,
                      args.max_pinned_tokens, args.weights, args.spread)
    processes.become_subreaper()
    stop = processes.StopRequest().install()
    started: list[ray_cluster.RayHandle] = []
    deployed: list[bool] = []  # whether this run submitted the app (what shutdown deletes)
    code = 1
    try:
        code = _serve(spec, host, port, key, args.metrics_port, address, stop, started,
                      deployed)
    except Exception as exc:
        print(f"streamsink: error: {one_line(exc)}", file=sys.stderr)
    finally:
        print("streamsink serve --ray: shutting down", file=sys.stderr, flush=True)
        if started:
            shutdown(started[0], bool(deployed))
        else:
            processes.stop_descendants()
        if not started or started[0].started:
            # Ray's and Serve's threads in this process (long polls, the core worker) would
            # touch the cluster just taken down while the interpreter exits, and Ray ends a
            # process that does so with exit status 1: leave without that teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _serve(spec: RaySpec, host: str, port: int, key: str | None, metrics_port: int | None,
           address: str | None, stop: processes.StopRequest,
           started: list[ray_cluster.RayHandle], deployed: list[bool]) -> int:
    """Start or join Ray, deploy, print the ready line and wait for a stop; the exit code."""
    try:
        handle = ray_cluster.start_or_join(metrics_port, address=address)
    except processes.Interrupted:
        return 0
    except Exception as exc:  # no cluster at the address, a port taken, ...
        if stop.requested:
            return 0
        print(f"streamsink: error: Ray did not start: {one_line(exc)}", file=sys.stderr)
        return 1
    started.append(handle)
    # After ray.init: Ray's core worker installs its own SIGTERM handler (sys.exit(15));
    # ours must be the one that runs.
    stop.install()
    if stop.requested:
        return 0
    print(f"streamsink serve --ray: starting {spec.replicas} replica(s) of {spec.model_id} "
          f"(engine args {spec.engine_kwargs})", flush=True)
    try:
        with processes.ray_sigterm_is_a_stop():
            code = _start_replicas(spec, host, port, key, stop, deployed)
            if code is not None:
                return code
            if spec.spread:
                nodes = ray_spread.replica_nodes(APP_NAME)
                print(f"streamsink serve --ray: replicas on {len(set(nodes.values()))} "
                      f"node(s): {' '.join(sorted(nodes.values()))}", flush=True)
            h = url_host(host)
            print(f"{READY_PREFIX} api=http://{h}:{port}/v1 metrics=http://{h}:"
                  f"{handle.metrics_port}/metrics replicas={spec.replicas}", flush=True)
            while not stop.event.wait(1.0):  # a timed wait: signal handlers run in between
                pass
    except processes.Interrupted:  # Ray's own SIGTERM handler fired
        return 0
    except ray_spread.SpreadRefused as exc:
        print(f"streamsink: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _start_replicas(spec: RaySpec, host: str, port: int, key: str | None,
                    stop: processes.StopRequest, deployed: list[bool]) -> int | None:
    """Deploy and wait until every replica is healthy (None), or the exit code to stop with:
    0 on a stop request, 1 when the app failed or a replica found no node."""
    # --spread: each node shows one free slot while the replicas are placed, and keeps the
    # rest for replacements once they run (ray_spread.one_per_node).
    spreading = (ray_spread.one_per_node(ray_spread.check(spec.replicas), stop.event)
                 if spec.spread else contextlib.nullcontext())
    with spreading:
        if stop.requested:
            return 0
        deployed.append(True)  # before the call: a stop during it still deletes the app
        deploy(spec, host, port, key)
        watch = ray_spread.PlacementWatch(APP_NAME)
        # Polled here, not waited for inside Ray: a signal during the minutes of start-up
        # still stops at once.
        status, message = app_state()
        while status != "RUNNING" and not stop.event.wait(1.0):
            if status == "DEPLOY_FAILED":
                print(f"streamsink: error: the app did not start: "
                      f"{' '.join(message.split())[:500]}", file=sys.stderr)
                return 1
            unplaced = watch.error()
            if unplaced:
                print(f"streamsink: error: {unplaced}", file=sys.stderr)
                return 1
            status, message = app_state()
        return 0 if stop.requested else None
