"""The one Ansible inventory contract: written from the spec by `cpctl inventory` and, with the nodes'
addresses, by the Pulumi program (stack output `ansibleInventory`); read back for `existing` pools.

Schema (what `playbooks/site.yml` and its roles read; each variable is declared in the argument spec of
the roles that read it, and tests/test_provision_inventory.py holds the two to each other):

    all:
      children:
        gpu_nodes:                     # site.yml's first play: driver, CUDA, runtime, RDMA, MIG, verify
          children:
            pool_<pool>:               # one group per GPU pool ('-' and '.' become '_')
              hosts:
                <node>:                # the Kubernetes node name: `kubeadm join --node-name` uses it
                  ansible_host: ADDR   # when known (cloud pools: from Pulumi; existing pools: a spec host)
                  mig_gpus: [...]      # per-GPU layouts, when the planner chose them (`mig: {layout: auto}`)
                  k8s_node_labels: {controlplane.io/pool: POOL, nvidia.com/mig.config: CONFIG}
              vars:
                gpu_model: H100-80GB   # catalog name (mig checks the host's GPUs against it)
                gpu_count: 8           # GPUs per node (preflight, verify)
                rdma_fabric: efa       # infiniband | roce | efa | none (rdma, preflight, verify)
                mig_layout: NAME       # a mig-parted named layout, or `mig_profiles: [...]`
                ansible_ssh_common_args: -o ProxyJump=USER@BASTION   # cloud pools reached through a bastion
        k8s_nodes:                     # site.yml's second play (join Kubernetes): the pools that join
          children: {pool_<pool>: {}}

Cloud pools without known addresses get their group and variables but no hosts (a note says so).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.gpu.plan import Plan, plan_cluster
from controlplane.gpu.render import MIG_CONFIG_LABEL, config_names
from controlplane.names import POOL_LABEL, dns_label
from controlplane.spec import ClusterSpec

GPU_GROUP = "gpu_nodes"
K8S_GROUP = "k8s_nodes"
# The variables of the schema above that the roles read (each declared in their argument specs).
POOL_VARIABLES = ("gpu_model", "gpu_count", "rdma_fabric", "mig_layout", "mig_profiles")
HOST_VARIABLES = ("mig_gpus", "k8s_node_labels")


def group_name(pool: str) -> str:
    """The Ansible group of a node pool: `pool_` + the name with characters Ansible rejects replaced."""
    return "pool_" + re.sub(r"[^A-Za-z0-9_]", "_", pool)


@dataclass(frozen=True)
class NodeHost:
    """Where Ansible reaches one planned node: its inventory (= Kubernetes node) name and address."""

    name: str
    address: str | None = None


@dataclass
class Inventory:
    """An inventory as Ansible's YAML format holds it, plus notes for the file's header."""

    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_yaml(self, source: str) -> str:
        header = [f"# Written by {source}: regenerate it rather than edit it.",
                  "# Connection settings (ansible_user, keys) belong in a group_vars/ or host_vars/ file next",
                  "# to this one, which is never overwritten."]
        header += [f"# {note}" for note in self.notes]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.data, sort_keys=False, default_flow_style=None)

    def pool_groups(self) -> dict[str, Any]:
        return self.data["all"]["children"][GPU_GROUP]["children"]


def kubernetes_node_labels(plan: Plan) -> dict[str, dict[str, str]]:
    """Planned node -> the labels its Kubernetes node carries: its pool (shards select on it) and, on GPU
    nodes, the mig-parted config the MIG manager applies. Set at join (inventory) and by the serving layer."""
    configs = config_names(plan)
    labels: dict[str, dict[str, str]] = {}
    for pool in plan.pools:
        for node in pool.nodes:
            labels[node] = {POOL_LABEL: dns_label(pool.pool)}
            if node in configs:
                labels[node][MIG_CONFIG_LABEL] = configs[node]
    return labels


def inventory_from_spec(spec: ClusterSpec, plan: Plan | None = None, hosts: Mapping[str, NodeHost] | None = None,
                        pool_vars: Mapping[str, Mapping[str, Any]] | None = None,
                        join_kubernetes: bool = False) -> Inventory:
    """The inventory of every GPU pool of `spec`. `hosts` (planned node -> NodeHost) names where the nodes
    are; without an entry, a node of an `existing` pool is reached by its spec name and a cloud pool's
    nodes are left out. `pool_vars` adds connection variables per pool; `join_kubernetes` puts every pool
    in k8s_nodes. PlanError propagates when the plan does not fit."""
    plan = plan or plan_cluster(spec)
    hosts = hosts or {}
    labels = kubernetes_node_labels(plan)
    children: dict[str, Any] = {}
    notes: list[str] = []
    for pool in spec.node_pools:
        if pool.gpu.model == "none" or pool.gpu.per_node == 0:
            notes.append(f"pool '{pool.name}' has no GPUs: not provisioned by site.yml")
            continue
        pool_plan = plan.pool(pool.name)
        variables: dict[str, Any] = {"gpu_model": pool.gpu.model, "gpu_count": pool.gpu.per_node,
                                     "rdma_fabric": pool.fabric}
        if pool.mig is None:
            variables["mig_layout"] = "all-disabled"
        elif pool.mig.layout not in (None, "auto"):
            variables["mig_layout"] = pool.mig.layout
        elif pool.mig.profiles is not None:
            variables["mig_profiles"] = list(pool.mig.profiles)
        variables.update((pool_vars or {}).get(pool.name, {}))
        group_hosts: dict[str, Any] = {}
        for node in pool_plan.nodes:
            host = hosts.get(node) or (NodeHost(node) if pool.provider == "existing" else None)
            if host is None:
                continue
            host_vars: dict[str, Any] = {}
            if host.address is not None:
                host_vars["ansible_host"] = host.address
            if pool.mig is not None and pool.mig.layout == "auto":
                host_vars["mig_gpus"] = [
                    {"index": gpu.index, "profiles": None if gpu.layout is None else list(gpu.layout)}
                    for gpu in pool_plan.gpus_of(node)
                ]
            host_vars["k8s_node_labels"] = labels[node]
            group_hosts[host.name] = host_vars
        if not group_hosts:
            notes.append(f"pool '{pool.name}' ({pool.provider}): hosts come from the cloud; `pulumi stack output "
                         f"ansibleInventory` lists them in group {group_name(pool.name)} once provisioned")
        group: dict[str, Any] = {"hosts": group_hosts} if group_hosts else {}
        group["vars"] = variables
        children[group_name(pool.name)] = group
    groups: dict[str, Any] = {GPU_GROUP: {"children": children}}
    if join_kubernetes:
        groups[K8S_GROUP] = {"children": {name: {} for name in children}}
    return Inventory({"all": {"children": groups}}, notes)


def _mapping(value: Any) -> dict[str, Any]:
    """`value` when it is a mapping; an empty one for anything else (a hand-edited file may hold anything)."""
    return value if isinstance(value, dict) else {}


def _find_group(children: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The group called `name`, at any depth of `children` groups."""
    for group, body in children.items():
        if group == name:
            return _mapping(body)
        found = _find_group(_mapping(_mapping(body).get("children")), name)
        if found is not None:
            return found
    return None


def read_pool_hosts(path: Path, pool: str) -> list[NodeHost]:
    """The hosts of one pool's group (`pool_<name>`, at any depth) of a YAML inventory in this schema;
    ValueError naming what is missing or unreadable."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ValueError(f"cannot read inventory {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"inventory {path} is not YAML: {exc}") from None
    name = group_name(pool)
    body = _find_group(_mapping(_mapping(_mapping(data).get("all")).get("children")), name)
    if body is None:
        raise ValueError(f"inventory {path} has no group '{name}' (the group of pool '{pool}') under all.children")
    found = _mapping(body.get("hosts"))
    return [NodeHost(host, str(_mapping(host_vars).get("ansible_host", host))) for host, host_vars in found.items()]
