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
How: a subclass named as the deployment's request_router_class (Ray Serve's extension point):
after each update of its replica set it removes the tree's tenants that are not in the set (a
replica another router knows and this one does not yet is added back by this router's next
update), and a KeyError from the prefix choice becomes "no preference", i.e. the power-of-two
pick among live replicas. It reaches two private attributes of the router (_tree_actor,
_replica_id_set) and the tree's tenant table (tenant_to_char_count, read through the actor's
getattr); check_target() checks all three.
Delete when: Ray's PrefixCacheAffinityRouter reconciles its tree with the replica set when it
starts, and restricts get_smallest_tenants() to the candidate replicas
(tests/test_patches.py shows the stock router's KeyError and fails once it is gone).
"""
from __future__ import annotations

import ray
from ray.llm._internal.serve.routing_policies.prefix_aware import prefix_aware_router, prefix_tree
from ray.serve.llm.request_router import PrefixCacheAffinityRouter

from streamsink.errors import PatchTargetMoved
from streamsink.patches import check_ray_version
from streamsink.patches._install import contains, require

# What serving/ray_config.py names as the deployment's request_router_class.
ROUTER_CLASS_PATH = f"{__name__}.LiveReplicaPrefixRouter"


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
    require(prefix_tree.PrefixTree, "remove_tenants", ["self", "tenants"])
    contains(prefix_tree.PrefixTree.__init__, ["self.tenant_to_char_count"],
             "PrefixTree.__init__")
    if not hasattr(prefix_tree.PrefixTreeActor, "getattr"):
        raise PatchTargetMoved("PrefixTreeActor.getattr is gone")


class LiveReplicaPrefixRouter(PrefixCacheAffinityRouter):
    """PrefixCacheAffinityRouter whose tree holds only replicas its router can reach."""

    def update_replicas(self, replicas):
        super().update_replicas(replicas)
        live = {replica_id.to_full_id_str() for replica_id in self._replica_id_set}
        tenants = ray.get(self._tree_actor.getattr.remote("tenant_to_char_count"))
        gone = [tenant for tenant in tenants if tenant not in live]
        if gone:
            ray.get(self._tree_actor.remove_tenants.remote(gone))

    async def _prefix_match_best_replicas(self, pending_request, candidate_replicas):
        try:
            return await super()._prefix_match_best_replicas(pending_request,
                                                             candidate_replicas)
        except KeyError:  # the tree chose a replica this router does not hold
            return [[]]   # no preference: choose_replicas takes its power-of-two pick
