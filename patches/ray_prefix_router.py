"""Patch (Ray): Ray Serve LLM's prefix-aware router, told to forget replicas that no longer exist.

Why: with --replicas > 1 the ingress routes through PrefixCacheAffinityRouter
(serving/ray_config.py). Its prefix tree lives in a detached actor shared by every router of the
deployment (LlmPrefixTreeActor), one tenant per LLM replica; a router removes a tenant when it
sees that replica die or leave its replica set. When a node is lost with both an LLM replica and
the ingress replica whose router knew it, no router is left to remove that tenant: the ingress
Serve starts in its place never knew the dead replica, yet the tree still names it, and as the
tenant with the fewest characters it is what get_smallest_tenants() gives for every prompt that
matches nothing cached. The router looks it up in its own replica set, the KeyError ends its
routing task (_fulfill_pending_requests logs it) and the request waits forever. Seen on a
two-node cluster: after the worker node went, the endpoint listed models but answered no new
completion for the 17 minutes until the app was deleted. A second router (more than one ingress
replica) can meet the same KeyError for a replica another router has just added.
The other way round, the tree's actor can go with a node while the ingress survives: the tree
is placed wherever its first router's node had room, and nothing restarts it. Every later call
on it raises, in the routing task (the request waits forever) or after a request was sent.
How: a subclass named as the deployment's request_router_class (Ray Serve's extension point).
After each update of its replica set it makes the tree's tenants the set's replicas: it removes
the others (a replica another router knows and this one does not yet is added back by that
router's next update) and adds the missing ones. A KeyError from the prefix choice becomes "no
preference", i.e. the power-of-two pick among live replicas. When a call on the tree finds its
actor gone (RayActorError), the router runs Ray's own initialize_state again with the settings it
was given: it creates the deployment's named tree anew, or joins the one another router already
made (get_if_exists), restarts its eviction loop through Ray's update_replicas and gives it this
router's replicas; the call that failed becomes "no preference" or, for a prompt's insertion
after routing, is dropped. It reaches private attributes of the router (_tree_actor,
_replica_id_set, _replicas) and the tree's tenant table (tenant_to_char_count, read through the
actor's getattr); check_target() checks them.
Delete when: Ray's PrefixCacheAffinityRouter reconciles its tree with the replica set when it
starts, restricts get_smallest_tenants() to the candidate replicas and replaces a tree actor that
died (tests/test_patches.py shows the stock router's KeyError and its failure on a lost tree,
and fails once they are gone).
"""
from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import RayActorError
from ray.llm._internal.serve.routing_policies.prefix_aware import prefix_aware_router, prefix_tree
from ray.serve.llm.request_router import PrefixCacheAffinityRouter

from streamsink.errors import PatchTargetMoved
from streamsink.patches import check_ray_version
from streamsink.patches._install import contains, require

# What serving/ray_config.py names as the deployment's request_router_class.
ROUTER_CLASS_PATH = f"{__name__}.LiveReplicaPrefixRouter"

logger = logging.getLogger(__name__)


def check_target() -> None:
    """The stock router and tree are the ones this subclass was written against."""
    check_ray_version()
    stock = prefix_aware_router.PrefixCacheAffinityRouter  # where the public class's code is
    if not issubclass(PrefixCacheAffinityRouter, stock):
        raise PatchTargetMoved("ray.serve.llm's PrefixCacheAffinityRouter no longer extends "
                               f"{stock.__module__}.PrefixCacheAffinityRouter")
    require(stock, "update_replicas", ["self", "replicas"],
            needles=["self._replica_id_set", "self._tree_actor.remove_tenants"])
    require(stock, "_prefix_match_best_replicas",
            ["self", "pending_request", "candidate_replicas"],
            needles=["get_smallest_tenants", "self._replicas[ReplicaID.from_full_id_str("])
    require(stock, "choose_replicas", needles=["if chosen_replicas[0]:"])
    require(stock, "initialize_state", needles=["tree_actor: Optional[ActorHandle] = None",
                                                "get_if_exists=True", "self._tree_actor ="])
    require(stock, "on_request_routed", ["self", "pending_request", "replica_id", "result"],
            needles=["self._tree_actor.insert"])
    require(stock, "on_replica_actor_died", ["self", "replica_id"],
            needles=["self._tree_actor.remove_tenants"])
    require(prefix_tree.PrefixTree, "add_tenants", ["self", "tenants", "time_s"])
    require(prefix_tree.PrefixTree, "remove_tenants", ["self", "tenants"])
    contains(prefix_tree.PrefixTree.__init__, ["self.tenant_to_char_count"],
             "PrefixTree.__init__")
    if not hasattr(prefix_tree.PrefixTreeActor, "getattr"):
        raise PatchTargetMoved("PrefixTreeActor.getattr is gone")


class LiveReplicaPrefixRouter(PrefixCacheAffinityRouter):
    """PrefixCacheAffinityRouter whose tree holds the replicas its router can reach, and which
    makes the tree anew when its actor is gone."""

    def initialize_state(self, **settings):
        super().initialize_state(**settings)
        self._tree_settings = settings  # what _replace_lost_tree() starts the new tree with

    def update_replicas(self, replicas):
        try:
            super().update_replicas(replicas)
            self._match_tree_to_replicas()
        except RayActorError:
            self._replace_lost_tree()

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        try:
            return await super()._prefix_match_best_replicas(pending_request,
                                                             candidate_replicas)
        except KeyError:  # the tree chose a replica this router does not hold
            return [[]]   # no preference: choose_replicas takes its power-of-two pick
        except RayActorError:
            self._replace_lost_tree()
            return [[]]

    def on_request_routed(self, pending_request, replica_id, result):
        try:
            super().on_request_routed(pending_request, replica_id, result)
        except RayActorError:  # the request went out; only its prompt is not in the tree
            self._replace_lost_tree()

    def on_replica_actor_died(self, replica_id):
        try:
            super().on_replica_actor_died(replica_id)
        except RayActorError:  # the replica is already out of the router's set
            self._replace_lost_tree()

    def _match_tree_to_replicas(self) -> None:
        live = {replica_id.to_full_id_str() for replica_id in self._replica_id_set}
        tenants = ray.get(self._tree_actor.getattr.remote("tenant_to_char_count"))
        gone = [tenant for tenant in tenants if tenant not in live]
        if gone:
            ray.get(self._tree_actor.remove_tenants.remote(gone))
        missing = sorted(live.difference(tenants))
        if missing:
            ray.get(self._tree_actor.add_tenants.remote(missing, time.time()))

    def _replace_lost_tree(self) -> None:
        settings = {name: value for name, value in self._tree_settings.items()
                    if name != "tree_actor"}  # a test's own tree is not made anew
        try:
            super().initialize_state(**settings)  # the named tree, new or another router's
            # Ray's update with the replicas it already has: no tenant changes, and its
            # eviction loop started on the new tree.
            super().update_replicas(list(self._replicas.values()))
            self._match_tree_to_replicas()
        except RayActorError:  # the lost actor's name not released yet: the next call retries
            logger.warning("the prefix tree's actor is gone and its replacement is not ready "
                           "yet; routing without prefix preference")
