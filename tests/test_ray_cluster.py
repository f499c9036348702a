"""A Ray cluster that loses a node: `serve --ray --replicas 2 --spread` and `batch` joined to a
two-node cluster built with Ray's own multi-node harness (ray.cluster_utils.Cluster: a head and
one worker node as separate raylets on this machine, each with a few logical CPUs, two
streamsink_replica slots and a marker resource that tells which node is which).

The replicas go one per node and the endpoint answers; the worker node is removed, its replica
is restarted on the head and requests keep being answered meanwhile; a second spread app is
refused on what is left (one line, exit 2) and leaves the first alone; SIGTERM deletes the app
and leaves the cluster. Then `batch` is killed together with a (new) worker node and resumed:
every record once. One cluster for the module, started and stopped here; the
first tests need no Ray at all (the refusals and the pieces of ray_spread.py).
"""
import importlib
import json
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import tagged
from openai_server import NotReady, ReadyLineServer, free_port

from streamsink.serving import ray_spread
from streamsink.serving.ray_serve import APP_NAME, READY_LINE

SLOT = ray_spread.REPLICA_SLOT
HEAD_CPUS, WORKER_CPUS = 8, 4  # logical: room for both replicas on the head after a loss
START_TIMEOUT = 900
RECOVERY_TIMEOUT = 300
NODE_START_S = 180          # how long a new node may take to register (see _add_node)
APP_ARGS = ["--window", "252", "--max-model-len", "1024", "--max-num-batched-tokens", "256",
            "--max-num-seqs", "4", "--enforce-eager"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "streamsink.serving.cli", *args]


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("streamsink: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------ no Ray: refusals, pieces

def test_spread_without_a_cluster_is_refused_at_once():
    done = subprocess.run(cli("serve", "--ray", "--replicas", "2", "--spread"),
                          capture_output=True, text=True, timeout=120,
                          env=tagged.tagged_env(tagged.new_tag()))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "streamsink: error: --spread puts each replica on a node of its own: join a cluster "
        "with --address or $RAY_ADDRESS"]


def test_cluster_options_need_ray():
    for extra in (["--spread"], ["--address", "127.0.0.1:6379"]):
        done = subprocess.run(cli("serve", *extra), capture_output=True, text=True,
                              timeout=120, env=tagged.tagged_env(tagged.new_tag()))
        assert done.returncode == 2
        assert done.stderr.strip() == f"streamsink: error: {extra[0]} needs --ray"


def test_spread_check_counts_nodes_with_slots(monkeypatch):
    import ray

    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0, SLOT: 2.0}},
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": "c", "Alive": False, "Resources": {SLOT: 1.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert [(n.node_id, n.slots) for n in ray_spread.check(1)] == [("a", 2)]
    with pytest.raises(ray_spread.SpreadRefused) as refused:
        ray_spread.check(2)
    assert "each of the 2 replicas" in str(refused.value)
    assert "1 node(s)" in str(refused.value) and "\n" not in str(refused.value)


class FakeGroup:
    def __init__(self, bundles, strategy, bundle_label_selector, placed=True):
        self.args = (bundles, strategy, bundle_label_selector)
        self.placed, self.removed = placed, False

    def wait(self, timeout_seconds):
        return self.placed


def test_one_per_node_holds_all_slots_but_one_until_the_block_ends(monkeypatch):
    """The reservations (placement groups pinned to a node by its node-id label) leave each
    node one free slot, and go when the block ends, by an error too; reservations that cannot
    be placed are a one-line refusal."""
    # The module itself: `import ray.util.placement_group as m` gives the function that
    # ray.util re-exports under the module's name.
    pgs = importlib.import_module("ray.util.placement_group")
    made = []

    def fake_group(bundles, strategy, bundle_label_selector):
        made.append(FakeGroup(bundles, strategy, bundle_label_selector, placed))
        return made[-1]

    monkeypatch.setattr(pgs, "placement_group", fake_group)
    monkeypatch.setattr(pgs, "remove_placement_group", lambda pg: setattr(pg, "removed", True))
    nodes = [ray_spread.SlotNode("a", 3), ray_spread.SlotNode("b", 1),
             ray_spread.SlotNode("c", 2)]
    placed = True
    with pytest.raises(RuntimeError):
        with ray_spread.one_per_node(nodes):
            assert [pg.args for pg in made] == [
                ([{SLOT: 2}], "STRICT_PACK", [{"ray.io/node-id": "a"}]),
                ([{SLOT: 1}], "STRICT_PACK", [{"ray.io/node-id": "c"}])]
            assert not any(pg.removed for pg in made)
            raise RuntimeError("the deployment failed")
    assert all(pg.removed for pg in made)
    made.clear()
    placed = False
    with pytest.raises(ray_spread.SpreadRefused) as refused:
        with ray_spread.one_per_node(nodes, timeout_s=0):
            pass
    assert "slots of 2 node(s) are in use" in str(refused.value)
    assert all(pg.removed for pg in made)


def test_spread_bundle_asks_for_one_slot():
    from streamsink.serving.ray_config import RaySpec

    for spread, bundle in ((False, {"CPU": 1}), (True, {"CPU": 1, SLOT: 1})):
        spec = RaySpec("m", "/nonexistent", {"dtype": "float32"}, 2, {}, spread)
        assert spec.llm_config().placement_group_config["bundles"] == [bundle]


def test_unplaced_replica_becomes_an_error_after_the_timeout(monkeypatch):
    message = ("Deployment 'LLMServer:m' in application 'streamsink' has 1 replicas that have "
               "taken more than 30s to be scheduled. ...")
    monkeypatch.setattr(ray_spread, "unplaced", lambda app: message)
    monkeypatch.setattr(ray_spread, "waiting_replicas", lambda app: 1)
    assert ray_spread.PlacementWatch(APP_NAME, timeout_s=60).error() == ""  # still waiting
    error = ray_spread.PlacementWatch(APP_NAME, timeout_s=0).error()
    assert error.startswith("a replica found no node with room within 0 s (Ray Serve: ")
    monkeypatch.setattr(ray_spread, "waiting_replicas", lambda app: 0)  # a stale message
    assert ray_spread.PlacementWatch(APP_NAME, timeout_s=0).error() == ""
    monkeypatch.setattr(ray_spread, "unplaced", lambda app: "")
    assert ray_spread.PlacementWatch(APP_NAME, timeout_s=0).error() == ""  # placed, starting


# ---------------------------------------------------------------------- the two-node cluster

def _patient(get_node, patience_s: float):
    """Ray's get_node, asked again until the node has registered or patience_s has passed."""
    def get_node_patiently(gcs_address, node_id):
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return get_node(gcs_address, node_id)
            except RuntimeError:  # not registered yet, or the GCS did not answer in time
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    return get_node_patiently


def _add_node(c, role: str, cpus: int, **extra):
    """A node of the cluster with its own agent ports (several raylets share this machine:
    patches/ray_agent_ports.py says why they need them up front).

    Ray gives a new raylet 30 s to register (a constant inside Node.__init__); on two cores
    shared with the other test worker's engines the GCS once took longer to answer and the
    node start failed. Its wait asks ray._private.services.get_node: here that call itself
    waits up to NODE_START_S, so a slow start is waited for and a node that never registers
    still fails."""
    from ray._private import services

    from streamsink.patches.ray_agent_ports import fixed_agent_ports

    args = dict(num_cpus=cpus, resources={SLOT: 2, f"streamsink_test_{role}": 1},
                include_dashboard=False, **extra)
    with fixed_agent_ports(free_port), pytest.MonkeyPatch.context() as patience:
        patience.setattr(services, "get_node", _patient(services.get_node, NODE_START_S))
        if c is None:
            from ray.cluster_utils import Cluster

            return Cluster(initialize_head=True, head_node_args=args)
        return c.add_node(dashboard_agent_listen_port=free_port(), **args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from streamsink.metrics import ENV_DIR
    from streamsink.serving.ray_cluster import LOCAL_ENV, LOCAL_SYSTEM_CONFIG

    tag = tagged.new_tag()
    env = pytest.MonkeyPatch()
    # Every process of the cluster (raylets, replicas, engines) carries the module's tag, and
    # writes its metrics snapshots to a folder of the module's own: a node removed here dies
    # by SIGKILL, which leaves its engines' last snapshots behind, and this test process's
    # folder (inherited otherwise) is what the next module's in-process engines report from.
    env.setenv(tagged.TAG_VAR, tag)
    env.setenv(ENV_DIR, str(tmp_path_factory.mktemp("cluster_metrics")))
    for name, value in LOCAL_ENV.items():  # what a local instance of ours runs with
        env.setenv(name, value)
    env.delenv("RAY_ADDRESS", raising=False)
    c = None
    try:
        c = _add_node(None, "head", HEAD_CPUS, _system_config=dict(LOCAL_SYSTEM_CONFIG))
        worker = _add_node(c, "worker", WORKER_CPUS)
        yield SimpleNamespace(ray=c, address=c.address, worker=worker, tag=tag)
    finally:
        if c is not None:
            c.shutdown()
        env.undo()
        tagged.kill_tagged(tag)


def role_of(cluster) -> dict:
    """{node id: "head" | "worker"} of the alive nodes, by their marker resources."""
    roles = {}
    for node in cluster.ray.global_state.node_table():
        for role in ("head", "worker"):
            if node.get("Alive") and f"streamsink_test_{role}" in node.get("Resources", {}):
                roles[node["NodeID"]] = role
    return roles


def replicas_by_role(cluster) -> dict:
    """{replica placement group name: role of its node} of the app's placed replicas."""
    roles = role_of(cluster)
    prefix = f"{ray_spread.REPLICA_PG_PREFIX}{APP_NAME}#"
    return {pg["name"]: roles.get(pg["bundles_to_node_id"].get(0), "?")
            for pg in cluster.ray.global_state.placement_group_table().values()
            if pg["name"].startswith(prefix) and pg["state"] == "CREATED"}


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    from tiny_models import make_tiny_llama_with_tokenizer

    return make_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_tok_llama"), sharp=False)


@pytest.fixture(scope="module")
def app(cluster, tok_model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("ray_cluster") / "serve.log"
    log = open(log_path, "w")
    tag = tagged.new_tag()
    server = ReadyLineServer(
        cli("serve", "--ray", "--replicas", "2", "--spread", "--address", cluster.address,
            "--model", tok_model, "--port", str(port), *APP_ARGS),
        READY_LINE, log, tagged.tagged_env(tag))
    try:
        try:
            api, _, replicas = server.wait(START_TIMEOUT)
        except NotReady as exc:
            pytest.fail(f"serve --ray --spread {exc}:\n" + log_path.read_text()[-4000:])
        assert replicas == "2"
        yield SimpleNamespace(proc=server.proc, api=api, log=log_path, tag=tag)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        tagged.kill_tagged(tag)
        log.close()


def ingress_role(cluster) -> str:
    """Where the app's OpenAI ingress replica runs: "head", "worker" or "?" (for messages: a
    lost node that held it takes the router with it, patches/ray_prefix_router.py)."""
    roles = role_of(cluster)
    for actor in cluster.ray.global_state.actor_table(None).values():
        if actor.get("State") == "ALIVE" and \
                actor.get("ActorClassName", "").endswith(f"{APP_NAME}:OpenAiIngress"):
            return roles.get(actor.get("Address", {}).get("NodeID"), "?")
    return "?"


def answered(app, n: int = 2) -> int:
    """How many of n fresh completions the endpoint answered (distinct prompts: the
    prefix-aware router spreads unmatched prompts over the replicas)."""
    from openai import OpenAI

    client = OpenAI(base_url=app.api, api_key="none", timeout=120, max_retries=0)
    ok = 0
    for _ in range(n):
        try:
            model = client.models.list().data[0].id
            reply = client.completions.create(model=model, prompt=f"{uuid.uuid4().hex} Once",
                                              max_tokens=4, extra_body={"ignore_eos": True})
            ok += reply.usage.completion_tokens == 4
        except Exception:  # a replica or a proxy going away mid-request
            pass
    return ok


def test_replicas_one_per_node(cluster, app):
    placed = replicas_by_role(cluster)
    assert sorted(placed.values()) == ["head", "worker"], placed
    assert "replicas on 2 node(s)" in app.log.read_text()
    assert answered(app, 4) == 4


def test_node_loss_restarts_its_replica_on_the_head(cluster, app):
    """The worker node goes (its raylet, replica and engine with it): the head's replica keeps
    answering, and Serve restarts the lost replica on the head, in the slot the spread left
    free there."""
    before = replicas_by_role(cluster)
    assert sorted(before.values()) == ["head", "worker"], before
    ingress = f"the ingress was on the {ingress_role(cluster)}"
    cluster.ray.remove_node(cluster.worker)
    # A request the router sent to the lost replica fails (the client here never retries);
    # the head's replica answers the others. At least five tries, however fast the recovery.
    tries: list[int] = []
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while True:
        tries.append(answered(app, 1))
        now = replicas_by_role(cluster)
        if len(now) == 2 and set(now.values()) == {"head"} and set(now) != set(before) \
                and len(tries) >= 5:
            break
        assert time.monotonic() < deadline, f"no replacement on the head: {now}; {ingress}"
        time.sleep(1)
    assert sum(tries) >= 1, (tries, ingress)
    assert answered(app, 4) == 4, ingress
    assert app.proc.poll() is None  # the launcher rode it out


def test_too_few_nodes_for_spread_is_refused(cluster, app, tok_model):
    """After the loss the cluster has one node: a second app of 2 spread replicas is refused
    with one line, exit 2, before any replica starts."""
    tag = tagged.new_tag()
    done = subprocess.run(
        cli("serve", "--ray", "--replicas", "2", "--spread", "--address", cluster.address,
            "--model", tok_model, "--port", str(free_port()), *APP_ARGS),
        capture_output=True, text=True, timeout=600, env=tagged.tagged_env(tag))
    try:
        assert done.returncode == 2, done.stderr[-3000:]
        error = one_error_line(done.stderr)
        assert "each of the 2 replicas on a node of its own" in error
        assert "1 node(s)" in error
        assert not any(READY_LINE.match(line) for line in done.stdout.splitlines())  # none up
    finally:
        tagged.kill_tagged(tag)
    assert answered(app, 2) == 2  # the refused run left the running app alone


def test_sigterm_deletes_the_app_and_leaves_the_cluster(cluster, app):
    """A launcher that joined a cluster stops its own app only: exit 0 within 30 s, none of
    its processes left, no replica of the app left on the cluster, the cluster still up."""
    took = tagged.stop_and_time(app.proc, signal.SIGTERM, timeout_s=120)
    assert app.proc.returncode == 0 and took < 30, app.log.read_text()[-3000:]
    assert tagged.leftovers(app.tag) == []
    deadline = time.monotonic() + 120
    while replicas_by_role(cluster):
        assert time.monotonic() < deadline, replicas_by_role(cluster)
        time.sleep(2)
    assert set(role_of(cluster).values()) == {"head"}


def test_batch_killed_with_a_node_resumes_every_record_once(cluster, tok_model, tmp_path):
    """(After the serve app is gone.) A new worker node joins; the batch driver is killed
    (SIGKILL) at the moment that node is removed; the same command again finishes the rest:
    every id once, the records done before the kill kept as they were."""
    worker = _add_node(cluster.ray, "worker", WORKER_CPUS)
    # 24 records of 64 tokens on two engines of two streams each: they finish in waves of
    # four, so a kill right after the first three lands mid-way.
    records = [{"id": f"r{i}", "prompt": f"Line {i}: the lamp by the river was bright.",
                "max_tokens": 64, "ignore_eos": True} for i in range(24)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = cli("batch", "--input", str(inp), "--output", str(out), "--replicas", "2",
               "--address", cluster.address, "--model", tok_model, "--window", "252",
               "--max-model-len", "1024", "--max-num-batched-tokens", "256",
               "--kv-cache-memory-bytes", str(1 << 28), "--max-num-seqs", "2",
               "--enforce-eager")
    tag = tagged.new_tag()
    proc = subprocess.Popen(args, stdout=open(tmp_path / "first.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=tagged.tagged_env(tag))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        proc.kill()
        cluster.ray.remove_node(worker)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        tagged.kill_tagged(tag)
    data = out.read_bytes()
    before = [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line]
    assert 3 <= len(before) < len(records), "the kill did not land mid-way"
    tag = tagged.new_tag()
    try:
        resume = subprocess.run(args, capture_output=True, text=True, timeout=START_TIMEOUT,
                                env=tagged.tagged_env(tag))
    finally:
        tagged.kill_tagged(tag)
    assert resume.returncode == 0, resume.stderr[-3000:]
    final = [json.loads(line) for line in out.read_bytes().splitlines()]
    ids = [row["id"] for row in final]
    assert sorted(ids) == sorted(r["id"] for r in records) and len(set(ids)) == len(ids)
    assert final[:len(before)] == before
    assert all("error" not in row for row in final), final
    summary = resume.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"records={len(records)} ok={len(records) - len(before)} "
                              f"errors=0 skipped={len(before)} "), summary
