"""The wiring helpers `__main__.py` calls: which pool component per provider, the inventory, the serving args."""

from __future__ import annotations

import pulumi

from controlplane.gpu.plan import Plan
from controlplane.names import unique_labels
from controlplane.provision.inventory import NodeHost, inventory_from_spec
from controlplane.spec import ClusterSpec, NodePool
from infra.aws import AwsGpuNodePool
from infra.azure import AzureGpuNodePool
from infra.existing import ExistingNodePool
from infra.pools import GpuNodePool, NodePoolArgs
from infra.serving import ServingClusterArgs
from infra.settings import StackSettings

COMPONENTS: dict[str, type[GpuNodePool]] = {
    "aws": AwsGpuNodePool,
    "azure": AzureGpuNodePool,
    "existing": ExistingNodePool,
}


def node_pool(spec: ClusterSpec, plan: Plan, pool: NodePool, settings: StackSettings) -> GpuNodePool:
    """The component for one spec pool, named after it."""
    labels = unique_labels([p.name for p in spec.node_pools], "node pools")
    args = NodePoolArgs(pool=pool, plan_nodes=plan.pool(pool.name).nodes, settings=settings, cluster=spec.cluster)
    return COMPONENTS[pool.provider](f"pool-{labels[pool.name]}", args)


def inventory_of(spec: ClusterSpec, plan: Plan, pools: list[GpuNodePool]) -> pulumi.Output[str]:
    """The Ansible inventory of every pool (controlplane.provision.inventory's schema), once the addresses are
    known: hosts under their Kubernetes node names (which the join uses and the node labels target), every
    pool in k8s_nodes (the serving layer needs the nodes joined)."""
    def render(values: list) -> str:
        addresses, connections = values[:len(pools)], values[len(pools):]
        hosts: dict[str, NodeHost] = {}
        pool_vars: dict[str, dict[str, str]] = {}
        for pool, component, pool_addresses, connection in zip(spec.node_pools, pools, addresses, connections,
                                                                 strict=True):
            nodes = plan.pool(pool.name).nodes
            for node, name, address in zip(nodes, component.node_names, pool_addresses, strict=True):
                hosts[node] = NodeHost(name, address)
            pool_vars[pool.name] = connection
        inventory = inventory_from_spec(spec, plan, hosts, pool_vars, join_kubernetes=True)
        return inventory.to_yaml("the Pulumi program (`pulumi stack output ansibleInventory`)")

    return pulumi.Output.all(*[p.addresses for p in pools], *[p.connection_vars for p in pools]).apply(render)


def serving_args(spec: ClusterSpec, plan: Plan, pools: list[GpuNodePool], settings: StackSettings
                 ) -> ServingClusterArgs:
    """The serving layer's args: planner node i of a pool is the pool component's Kubernetes node i."""
    node_names = {
        node: k8s_name
        for pool, component in zip(spec.node_pools, pools, strict=True)
        for node, k8s_name in zip(plan.pool(pool.name).nodes, component.node_names, strict=True)
    }
    return ServingClusterArgs(spec=spec, plan=plan, node_names=node_names, settings=settings.kubernetes,
                              registry=settings.registry, kubeconfig=settings.kubeconfig)
