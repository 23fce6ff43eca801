"""`ExistingNodePool`: hosts that already exist (on premises, or provisioned elsewhere): no cloud resources.

The hosts come from an Ansible inventory when the stack names one (`controlplane:inventory`, in the schema
of controlplane.provision.inventory: group `pool_<pool>`), else from the spec's `hosts`. Their names must be
the planner's node names: the MIG plan, the node labels and the inventory all speak of the same nodes.
"""

from __future__ import annotations

import pulumi

from controlplane.provision.inventory import NodeHost, read_pool_hosts
from infra.pools import GpuNodePool, NodePoolArgs


def existing_hosts(args: NodePoolArgs) -> list[NodeHost]:
    """The pool's hosts, in the planner's node order; ValueError when the inventory disagrees with the plan."""
    if args.settings.inventory_path is None:
        if len(args.pool.hosts) != len(args.plan_nodes):
            raise ValueError(f"pool '{args.pool.name}' (existing) needs one host per node: list {args.pool.count} "
                             "under `hosts` in the spec, or name an inventory in controlplane:inventory")
        return [NodeHost(node, address) for node, address in zip(args.plan_nodes, args.pool.hosts, strict=True)]
    listed = {node.name: node for node in read_pool_hosts(args.settings.inventory_path, args.pool.name)}
    missing = [node for node in args.plan_nodes if node not in listed]
    if missing:
        raise ValueError(f"pool '{args.pool.name}': inventory {args.settings.inventory_path} lacks host(s) "
                         f"{', '.join(missing)} (the plan's nodes are {', '.join(args.plan_nodes)})")
    return [listed[node] for node in args.plan_nodes]


class ExistingNodePool(GpuNodePool):
    """Names the hosts of an `existing` pool; creates nothing."""

    def __init__(self, name: str, args: NodePoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("controlplane:infra:ExistingNodePool", name, None, opts)
        hosts = existing_hosts(args)
        self._finish(args, [h.name for h in hosts], [h.address for h in hosts])
