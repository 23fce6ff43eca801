"""Ansible inventories from the cluster spec: one group per node pool, MIG layouts from the planner.

The inventory names what `playbooks/site.yml` needs per pool and per host, in the roles' own variables:
- every GPU pool is a child group of `gpu_nodes`, named `pool_NAME` (Ansible group names cannot hold '-');
- pool variables: `gpu_model` (catalog name, which the mig role checks against the host's GPUs),
  `gpu_count` (GPUs per node, checked by preflight and verify) and `rdma_fabric`;
- the MIG layout: `mig_layout` for a pool with a mig-parted named layout (or `all-disabled` for a pool
  without MIG), `mig_profiles` for an explicit list, and per host `mig_gpus` when the planner chose the
  layouts (`mig: {layout: auto}`): exactly the layouts `cpctl gpu plan` shows, already validated by it.
- hosts of `existing` pools are their addresses; cloud pools get their group and variables but no hosts
  until their addresses are known (later, from Pulumi outputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from controlplane.gpu.plan import Plan, plan_cluster
from controlplane.spec import ClusterSpec

GPU_GROUP = "gpu_nodes"


def group_name(pool: str) -> str:
    """The Ansible group of a node pool: `pool_` + the name with characters Ansible rejects replaced."""
    return "pool_" + re.sub(r"[^A-Za-z0-9_]", "_", pool)


@dataclass
class Inventory:
    """An inventory as Ansible's YAML format holds it, plus notes for the file's header."""

    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_yaml(self, source: str) -> str:
        header = [f"# Written by `cpctl inventory -f {source}`: regenerate it rather than edit it.",
                  "# Connection settings (ansible_user, keys, ProxyJump) belong in a group_vars/ or host_vars/",
                  "# file next to this one, which this command never overwrites."]
        header += [f"# {note}" for note in self.notes]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.data, sort_keys=False, default_flow_style=None)


def inventory_from_spec(spec: ClusterSpec, plan: Plan | None = None) -> Inventory:
    """The inventory of every GPU pool of `spec`; PlanError propagates when the plan does not fit."""
    plan = plan or plan_cluster(spec)
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
        hosts: dict[str, Any] = {}
        if pool.provider == "existing":
            for node in pool_plan.nodes:
                host_vars: dict[str, Any] = {}
                if pool.mig is not None and pool.mig.layout == "auto":
                    host_vars["mig_gpus"] = [
                        {"index": gpu.index, "profiles": None if gpu.layout is None else list(gpu.layout)}
                        for gpu in pool_plan.gpus_of(node)
                    ]
                hosts[node] = host_vars or None
        else:
            notes.append(f"pool '{pool.name}' ({pool.provider}): hosts come from the cloud; add them to "
                         f"group {group_name(pool.name)} once provisioned")
        group: dict[str, Any] = {"hosts": hosts} if hosts else {}
        group["vars"] = variables
        children[group_name(pool.name)] = group
    return Inventory({"all": {"children": {GPU_GROUP: {"children": children}}}}, notes)
