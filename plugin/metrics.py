"""The KV policy's numbers on vLLM's /metrics.

The numbers live in the engine core process (the scheduler's KV manager), /metrics is served by
the API process, and vLLM ships only its own fixed SchedulerStats between them. So:
- engine side: each streaming KV manager pushes its numbers to a Publisher, which writes them
  to <dir>/<pid>-<publisher>.json (atomic rename), at most every PUBLISH_INTERVAL seconds while
  blocks are freed and whenever a request's blocks are released (finish, abort, preemption);
- API side: StreamsinkCollector, registered on prometheus_client's default registry (the one
  vLLM's /metrics serves with a single API server), sums the snapshots at every scrape.
<dir> is $STREAMSINK_METRICS_DIR, created by the first process that loads the plugin (the API
process) and inherited by the engine processes it starts.

Metrics: vllm:streamsink_freed_blocks_total and vllm:streamsink_evicted_tokens_total (blocks and
tokens the policy dropped from running streams), vllm:streamsink_held_blocks (KV blocks held by
streaming requests now, a shared block once per holder), vllm:streamsink_streams (streaming
requests holding blocks) and vllm:streamsink_pool_used_blocks (blocks of the pool in use, a shared
block once). Pinned prefixes (request_options.py): vllm:streamsink_pinned_blocks (distinct blocks
holding them), vllm:streamsink_pinned_block_refs (the same summed over their holders) and
vllm:streamsink_pinned_streams (requests that pinned a prefix). Prefix
caching (prefix_cache.py): vllm:streamsink_cache_shadow_copies_total (cached blocks copied before
a decode's sink shadows reached them), vllm:streamsink_cache_hit_copies_total (hit blocks copied
because a running request held them) and vllm:streamsink_cache_dropped_blocks_total (cached
blocks dropped from the cache instead of copied, the pool having no free block). The hits
themselves are vLLM's own vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total.

In a Ray Serve replica (`streamsink serve --ray`) the process that hosts vLLM's engine client is
the replica actor, and Ray exports only what goes through ray.util.metrics; vLLM's own engine
metrics go that way (RayPrometheusStatLogger, tagged ReplicaId). start_ray_export() makes ours
travel the same way: a thread of the replica actor reads the snapshots of its own engine
processes every RAY_EXPORT_INTERVAL seconds and sets Ray metrics with the same ReplicaId tag.
Ray sanitises ':' to '_' and prefixes 'ray_', so they appear as ray_vllm_streamsink_* .
"""
from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import tempfile
import time
import weakref

ENV_DIR = "STREAMSINK_METRICS_DIR"
PUBLISH_INTERVAL = 0.25  # seconds
# Ray drops a gauge that is not set again within two of its export intervals (>= 1 s each),
# so the replica re-sets ours at least every second.
RAY_EXPORT_INTERVAL = 1.0

# Counters: (snapshot key, Prometheus name without _total, help).
COUNTERS = (
    ("freed_blocks", "vllm:streamsink_freed_blocks",
     "KV blocks freed by the streamsink policy (evicted from a stream's window)"),
    ("evicted_tokens", "vllm:streamsink_evicted_tokens",
     "Tokens whose KV the streamsink policy dropped"),
    ("cache_shadow_copies", "vllm:streamsink_cache_shadow_copies",
     "Prefix-cached KV blocks copied before a decode's sink shadows reached them"),
    ("cache_hit_copies", "vllm:streamsink_cache_hit_copies",
     "Prefix-cache hit blocks copied because a running request held them"),
    ("cache_dropped_blocks", "vllm:streamsink_cache_dropped_blocks",
     "Prefix-cached KV blocks dropped from the cache (no free block for their copy)"),
)
GAUGES = (
    ("held_blocks", "vllm:streamsink_held_blocks", "KV blocks held by streaming requests"),
    ("streams", "vllm:streamsink_streams", "Streaming requests holding KV blocks"),
    ("pinned_blocks", "vllm:streamsink_pinned_blocks",
     "Distinct KV blocks holding requests' pinned prefixes (each counted once however many "
     "requests share it)"),
    ("pinned_block_refs", "vllm:streamsink_pinned_block_refs",
     "Pinned blocks summed over the requests holding them (refs / blocks = sharers per block)"),
    ("pinned_streams", "vllm:streamsink_pinned_streams",
     "Streaming requests with a pinned prefix of their own"),
    ("pool_used_blocks", "vllm:streamsink_pool_used_blocks",
     "KV blocks of the pool held by any request (shared blocks once)"),
)
KEYS = tuple(key for key, _, _ in COUNTERS + GAUGES)


def metrics_dir() -> str:
    """This run's snapshot directory; created (and removed at exit) by the first process."""
    path = os.environ.get(ENV_DIR)
    if not path:
        path = tempfile.mkdtemp(prefix="streamsink-metrics-")
        os.environ[ENV_DIR] = path
        atexit.register(shutil.rmtree, path, True)
    return path


class Publisher:
    """Writes one KV manager's numbers where the API process's collector reads them.

    The manager pushes its snapshot (a dict with KEYS); this module never looks into the
    policy. Each manager has a file of its own, so engines sharing a process do not overwrite
    each other's numbers."""

    def __init__(self) -> None:
        self.path = os.path.join(metrics_dir(), f"{os.getpid()}-{id(self):x}.json")
        self._last = 0.0
        # A manager that is gone reports nothing (its gauges would otherwise stay at their
        # last value); its counters start again with the engine that replaces it.
        weakref.finalize(self, _remove, self.path)

    def publish(self, values: dict, force: bool = False) -> None:
        """Write the snapshot (at most every PUBLISH_INTERVAL seconds unless force)."""
        now = time.monotonic()
        if not force and now - self._last < PUBLISH_INTERVAL:
            return
        self._last = now
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(values, f)
        os.replace(tmp, self.path)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def read_totals(path: str | None = None) -> dict:
    """The sum of every process's latest snapshot."""
    totals = {key: 0 for key in KEYS}
    for name in glob.glob(os.path.join(path or metrics_dir(), "*.json")):
        try:
            with open(name) as f:
                values = json.load(f)
        except (OSError, ValueError):
            continue  # a process that just exited
        for key in totals:
            totals[key] += int(values.get(key, 0))
    return totals


class StreamsinkCollector:
    """prometheus_client collector: the streaming KV numbers of every engine of this run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = read_totals(self.path)
        for key, name, help_text in COUNTERS:
            yield CounterMetricFamily(name, help_text, value=totals[key])
        for key, name, help_text in GAUGES:
            yield GaugeMetricFamily(name, help_text, value=totals[key])


_collector: StreamsinkCollector | None = None


def register_collector() -> None:
    """Expose the numbers on the default registry (idempotent per process)."""
    global _collector
    if _collector is not None:
        return
    from prometheus_client import REGISTRY

    _collector = StreamsinkCollector(metrics_dir())
    REGISTRY.register(_collector)


def ray_serve_replica_id() -> str | None:
    """The Ray Serve replica this process is, or None (anywhere else, engine processes too)."""
    import sys

    if "ray" not in sys.modules:  # never import Ray into a process that does not use it
        return None
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # RayServeException outside a replica; anything else means "not one"
        return None


_ray_export_started = False


def start_ray_export() -> bool:
    """In a Ray Serve replica: give its engine processes a snapshot folder of their own (the
    replica may have inherited one through Ray's worker environment, shared with the other
    replicas of the node) and export their totals as Ray metrics. False anywhere else."""
    global _ray_export_started
    replica_id = ray_serve_replica_id()
    if replica_id is None:
        return False
    if not _ray_export_started:
        _ray_export_started = True
        os.environ.pop(ENV_DIR, None)
        import threading

        threading.Thread(target=_ray_export_loop, args=(metrics_dir(), replica_id),
                         name="streamsink-ray-metrics", daemon=True).start()
    return True


def _ray_export_loop(path: str, replica_id: str) -> None:
    from ray.util.metrics import Counter, Gauge

    tags = {"ReplicaId": replica_id}
    keys = ("ReplicaId",)
    # Ray metric names take no ':'; exported with Ray's prefix: ray_vllm_streamsink_*.
    counters = {key: Counter(name.replace(":", "_"), tag_keys=keys, description=help_text)
                for key, name, help_text in COUNTERS}
    gauges = {key: Gauge(name.replace(":", "_"), tag_keys=keys, description=help_text)
              for key, name, help_text in GAUGES}
    exported = {key: 0 for key in counters}
    while True:
        totals = read_totals(path)
        for key, counter in counters.items():
            # Ray counters only go up: export the growth of the engine's running totals.
            delta = totals[key] - exported[key]
            if delta > 0:
                counter.inc(delta, tags=tags)
            exported[key] = max(exported[key], totals[key])
        for key, gauge in gauges.items():
            gauge.set(totals[key], tags=tags)
        time.sleep(RAY_EXPORT_INTERVAL)
