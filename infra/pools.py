"""What every node pool component has in common, and the choice of component by `provider`.

A pool component creates (or, for `existing`, only names) the nodes of one spec pool and exposes:
- `node_names`: the Kubernetes node names, known before anything exists (the serving layer labels them);
- `addresses`: an Output of the addresses Ansible reaches them at, in the same order;
- `connection_vars`: an Output of the inventory variables that say how Ansible gets there (a ProxyJump
  through the pool's bastion), empty when the addresses are reachable directly.
Node i of a pool is the planner's node i (`controlplane.gpu.plan.node_names`).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass

import pulumi

from controlplane.names import POOL_LABEL
from controlplane.spec import NodePool
from infra.settings import StackSettings

__all__ = ["POOL_LABEL", "GpuNodePool", "NodePoolArgs", "b64", "checked_ingress", "cloud_init", "proxy_jump_vars",
           "split_range"]


@dataclass(frozen=True)
class NodePoolArgs:
    """Typed args of every pool component."""

    pool: NodePool
    plan_nodes: list[str]  # the planner's node names, in order
    settings: StackSettings
    cluster: str


class GpuNodePool(pulumi.ComponentResource):
    """Base of the pool components: registers the node outputs once, the same way for every provider."""

    node_names: list[str]
    addresses: pulumi.Output[list[str]]
    connection_vars: pulumi.Output[dict[str, str]]
    pool_name: str

    def _finish(self, args: NodePoolArgs, node_names: list[str], addresses: pulumi.Input[list[str]],
                connection_vars: pulumi.Input[dict[str, str]] | None = None) -> None:
        self.pool_name = args.pool.name
        self.node_names = node_names
        self.addresses = pulumi.Output.from_input(addresses)
        self.connection_vars = pulumi.Output.from_input(connection_vars or {})
        self.register_outputs({"nodeNames": node_names, "addresses": self.addresses})


def proxy_jump_vars(user: str, bastion_address: pulumi.Input[str]) -> pulumi.Output[dict[str, str]]:
    """Inventory variables that send Ansible's SSH through a bastion (the nodes have no public address).
    The bastion resolves and reaches the node's private address or name itself (`ssh -W`)."""
    return pulumi.Output.from_input(bastion_address).apply(
        lambda address: {"ansible_ssh_common_args": f"-o ProxyJump={user}@{address}"})


def cloud_init(args: NodePoolArgs, hostname_command: str) -> str:
    """User data shared by the cloud pools: a stable host name (the Kubernetes node name) and the pool
    facts the Ansible playbooks and the kubelet read. Driver, MOFED and MIG are Ansible's job, not boot's."""
    pool = args.pool
    return "\n".join([
        "#!/bin/bash",
        "set -euo pipefail",
        hostname_command,
        "mkdir -p /etc/controlplane",
        "cat > /etc/controlplane/node.env <<'NODE'",
        f"CONTROLPLANE_CLUSTER={args.cluster}",
        f"CONTROLPLANE_POOL={pool.name}",
        f"CONTROLPLANE_GPU_MODEL={pool.gpu.model}",
        f"CONTROLPLANE_FABRIC={pool.fabric}",
        "NODE",
        "",
    ])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def split_range(cidr: str, key: str) -> tuple[str, str]:
    """The two halves of an address range (a VPC's, a vnet's); ValueError naming the stack key when bad."""
    try:
        first, second = ipaddress.ip_network(cidr).subnets(prefixlen_diff=1)
    except ValueError as exc:
        raise ValueError(f"controlplane:{key} '{cidr}': {exc}") from None
    return str(first), str(second)


def checked_ingress(cidr: str | None, key: str) -> str | None:
    """The bastion's SSH source range, checked here rather than refused by the cloud API mid-`pulumi up`."""
    if cidr:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise ValueError(f"controlplane:{key} '{cidr}': {exc} (expected an address range, e.g. "
                             "203.0.113.7/32)") from None
    return cidr or None
