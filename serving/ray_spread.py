"""`serve --ray --spread`: each replica on a node of its own at start, and room to restart a lost
node's replica on the nodes that are left.

Why a custom resource and not Ray Serve's `max_replicas_per_node=1` (the documented knob for
plain deployments): Ray Serve LLM gives every replica a placement group (its engine's bundle),
and Serve refuses max_replicas_per_node together with placement_group_bundles (ray 2.60,
serve/_private/config.py ReplicaConfig._validate). A placement group's own strategy (SPREAD,
STRICT_SPREAD in LLMConfig.placement_group_config) spreads the bundles *of one replica*, not the
replicas. So each replica's bundle asks for one unit of REPLICA_SLOT, a custom resource every
node that may hold a replica advertises (`ray start --resources '{"streamsink_replica": 2}'`):
a node holds at most as many replicas as it has slots.

One per node, and yet room after a loss: before the deployment, `one_per_node` reserves every
slot but one on each node (a placement group pinned to the node by its `ray.io/node-id` label);
the replicas then find one free slot per node. Once they run the reservations are released, so
a node with 2 slots can take the replica of a node that is lost (with 1 slot it cannot: the
replacement waits for a node with a free slot while the others keep answering).

Ray never fails a replica it cannot place: Serve keeps it pending and says so in the
deployment's status message ("... taken more than 30s to be scheduled ..."); `unplaced` picks
that message out so the launcher can stop with one line instead of waiting for ever.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from streamsink.errors import UsageError

REPLICA_SLOT = "streamsink_replica"
NODE_ID_LABEL = "ray.io/node-id"
# How long the reservations may take to be placed (they only need slots that are free).
RESERVE_TIMEOUT_S = 60.0
# Serve's words for a replica no node has room for (deployment_state.py, PENDING_ALLOCATION).
UNPLACED_WORDS = "to be scheduled"
# A replica still waiting for a node this long after the deployment is refused (Serve first
# reports it after 30 s): a spread that cannot be satisfied ends in one line, not a hang.
PLACEMENT_TIMEOUT_S = 120.0
REPLICA_PG_PREFIX = "SERVE_REPLICA::"  # Serve names a replica's placement group after it


class SpreadRefused(UsageError):
    """--spread cannot put each replica on a node of its own (one line, for the user)."""


@dataclass
class SlotNode:
    node_id: str
    slots: int


def slot_nodes() -> list[SlotNode]:
    """The alive nodes that advertise REPLICA_SLOT, with how many each has."""
    import ray

    found = []
    for node in ray.nodes():
        slots = int((node.get("Resources") or {}).get(REPLICA_SLOT, 0))
        if node.get("Alive") and slots >= 1:
            found.append(SlotNode(node["NodeID"], slots))
    return found


def check(replicas: int) -> list[SlotNode]:
    """The nodes the replicas go to; SpreadRefused when there are fewer than replicas."""
    nodes = slot_nodes()
    if len(nodes) < replicas:
        raise SpreadRefused(
            f"--spread puts each of the {replicas} replicas on a node of its own, but "
            f"{len(nodes)} node(s) of this cluster offer the resource {REPLICA_SLOT} (start "
            f"each serving node with: ray start ... --resources '{{\"{REPLICA_SLOT}\": 2}}')")
    return nodes


@contextlib.contextmanager
def one_per_node(nodes: list[SlotNode], stop=None, timeout_s: float = RESERVE_TIMEOUT_S):
    """Within the block every node has exactly one free slot (the rest reserved). stop: an
    Event that ends the wait for the reservations early (the block is then skipped by the
    caller's own check of it)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    held = []
    try:
        for node in nodes:
            if node.slots > 1:
                held.append(placement_group(
                    [{REPLICA_SLOT: node.slots - 1}], strategy="STRICT_PACK",
                    bundle_label_selector=[{NODE_ID_LABEL: node.node_id}]))
        waiting, deadline = list(held), time.monotonic() + timeout_s
        # Short waits: a stop request is noticed within a second.
        while waiting and not (stop is not None and stop.is_set()):
            waiting = [pg for pg in waiting if not pg.wait(1)]
            if waiting and time.monotonic() > deadline:
                raise SpreadRefused(
                    f"--spread: the {REPLICA_SLOT} slots of {len(waiting)} node(s) are in use "
                    f"(another app holds them); free them or add nodes")
        yield
    finally:
        for pg in held:
            with contextlib.suppress(Exception):  # gone with its node, or never placed
                remove_placement_group(pg)


def unplaced(app_name: str) -> str:
    """Serve's message about replicas of the app that no node has room for ('' if none)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    for deployment in (app.deployments.values() if app else ()):
        if UNPLACED_WORDS in (deployment.message or ""):
            return " ".join(deployment.message.split())
    return ""


class PlacementWatch:
    """Turns a replica that stays unplaced into an error after PLACEMENT_TIMEOUT_S."""

    def __init__(self, app_name: str, timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        self.app_name = app_name
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def error(self) -> str:
        """'' while waiting is still reasonable; else the one line to stop with."""
        if time.monotonic() < self.deadline:
            return ""
        # Serve's message can outlive the wait it reports (it is replaced by the next
        # warning, not cleared): a replica placement group still waiting confirms it.
        message = unplaced(self.app_name)
        if not message or not waiting_replicas(self.app_name):
            return ""
        return (f"a replica found no node with room within {self.timeout_s:.0f} s "
                f"(Ray Serve: {message[:400]})")


def _replica_groups(app_name: str) -> list[dict]:
    """The placement groups of the app's engine replicas (Serve gives each LLM replica one,
    named after the replica)."""
    from ray.util.placement_group import placement_group_table

    prefix = f"{REPLICA_PG_PREFIX}{app_name}#"
    return [pg for pg in placement_group_table().values()
            if pg.get("name", "").startswith(prefix)]


def replica_nodes(app_name: str) -> dict[str, str]:
    """{replica placement group name: node id} of the app's placed engine replicas."""
    return {pg["name"]: pg["bundles_to_node_id"].get(0, "")
            for pg in _replica_groups(app_name) if pg.get("state") == "CREATED"}


def waiting_replicas(app_name: str) -> int:
    """How many of the app's replica placement groups wait for a node."""
    return sum(pg.get("state") in ("PENDING", "RESCHEDULING")
               for pg in _replica_groups(app_name))
