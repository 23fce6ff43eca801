"""The wiring helpers `__main__.py` calls: which pool component per provider, the inventory, the serving args."""

from __future__ import annotations

import pulumi

from controlplane.gpu.plan import Plan
from controlplane.gpu.render import config_names
from controlplane.spec import ClusterSpec, NodePool
from infra.aws import AwsGpuNodePool
from infra.azure import AzureGpuNodePool
from infra.existing import ExistingNodePool
from infra.inventory import InventoryGroup, InventoryNode, ansible_inventory
from infra.names import unique_labels
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
    """The Ansible inventory of every pool, once the addresses are known."""
    configs = config_names(plan)

    def render(addresses: list[list[str]]) -> str:
        groups = []
        for pool, pool_addresses in zip(spec.node_pools, addresses, strict=True):
            nodes = plan.pool(pool.name).nodes
            group_vars: dict[str, object] = {"gpu_model": pool.gpu.model, "gpus_per_node": pool.gpu.per_node,
                                             "fabric": pool.fabric}
            node_configs = {configs[n] for n in nodes if n in configs}
            host_vars: dict[str, dict[str, object]] = {n: {} for n in nodes}
            if len(node_configs) == 1:
                group_vars["mig_config"] = node_configs.pop()
            else:  # nodes of an auto-planned pool may differ: then each host carries its own
                for n in nodes:
                    if n in configs:
                        host_vars[n]["mig_config"] = configs[n]
            groups.append(InventoryGroup(pool.name, [
                InventoryNode(n, address, host_vars[n]) for n, address in zip(nodes, pool_addresses, strict=True)
            ], group_vars))
        return ansible_inventory(groups)

    return pulumi.Output.all(*[p.addresses for p in pools]).apply(render)


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
