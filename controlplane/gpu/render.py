"""Renderers of one MIG plan: mig-parted config, node labels, Kubernetes resource names.

- `mig_parted_config`: the `version: v1` / `mig-configs` file the GPU Operator's MIG manager (or
  `nvidia-mig-parted apply`) reads; one named config per distinct node layout.
- `node_labels`: `nvidia.com/mig.config` per node, naming that node's config.
- `extended_resources` / `replica_resources`: the resource names the device plugin advertises under the
  `mixed` MIG strategy (`nvidia.com/mig-1g.10gb`), per node and per shard replica.

The nvidia-smi commands that move a node from what it has to its planned layout come from
`controlplane.gpu.reconcile`, shared with the Ansible mig role.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import yaml

from controlplane.gpu.plan import GpuPlan, Plan, Replica

MIG_CONFIG_LABEL = "nvidia.com/mig.config"


def _node_layout(gpus: list[GpuPlan]) -> tuple[tuple[str, ...] | None, ...]:
    return tuple(g.layout for g in gpus)


def config_names(plan: Plan) -> dict[str, str]:
    """Node -> mig-parted config name. Nodes with identical layouts share one config. A pool with a named
    layout keeps its mig-parted name (`all-balanced`); otherwise configs are called POOL-1, POOL-2, ..."""
    names: dict[str, str] = {}
    for pool in plan.pools:
        if pool.gpu_model is None:
            continue
        seen: dict[tuple[tuple[str, ...] | None, ...], str] = {}
        for node in pool.nodes:
            layout = _node_layout(pool.gpus_of(node))
            if layout not in seen:
                if all(g is None for g in layout):
                    seen[layout] = "all-disabled"
                elif pool.layout_name not in (None, "auto", "custom"):
                    seen[layout] = str(pool.layout_name)
                else:
                    seen[layout] = f"{pool.pool}-{len(seen) + 1}"
            names[node] = seen[layout]
    return names


def _device_entries(gpus: list[GpuPlan]) -> list[dict[str, object]]:
    """mig-parted entries for one node: GPUs with the same layout grouped under one `devices` list."""
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for gpu in gpus:
        key = tuple(sorted(gpu.layout)) if gpu.layout is not None else None
        groups.setdefault(key, []).append(gpu.index)
    entries: list[dict[str, object]] = []
    for layout, indexes in groups.items():
        devices: object = "all" if len(groups) == 1 else indexes
        if layout is None:
            entries.append({"devices": devices, "mig-enabled": False})
            continue
        counts = Counter(layout)
        model = gpus[0].model
        # Largest first, for people reading it: mig-parted picks placements itself (it retries creation
        # orders until the layout fits), while the reconcile's nvidia-smi steps pin them.
        ordered = sorted(counts, key=lambda name: (-model.profile(name).size, name))
        entries.append({"devices": devices, "mig-enabled": True, "mig-devices": {p: counts[p] for p in ordered}})
    return entries


def mig_parted_config(plan: Plan) -> str:
    """The mig-parted config YAML for every GPU node of the plan (plus `all-disabled`, to switch back)."""
    configs: dict[str, object] = {"all-disabled": [{"devices": "all", "mig-enabled": False}]}
    names = config_names(plan)
    for pool in plan.pools:
        for node in pool.nodes:
            if node in names and names[node] not in configs:
                configs[names[node]] = _device_entries(pool.gpus_of(node))
    return yaml.safe_dump({"version": "v1", "mig-configs": configs}, sort_keys=False)


def node_labels(plan: Plan) -> dict[str, dict[str, str]]:
    """Node -> labels for the Kubernetes layer: the MIG manager applies the config the label names."""
    return {node: {MIG_CONFIG_LABEL: name} for node, name in config_names(plan).items()}


def resource_name(gpu: GpuPlan, profile: str | None) -> str:
    """The device plugin's resource for an instance under the `mixed` strategy; whole GPUs are nvidia.com/gpu.
    Resource names cannot hold '+': the device plugin advertises `1g.10gb+me` as `mig-1g.10gb.me`."""
    if profile is None or gpu.layout is None:
        return "nvidia.com/gpu"
    return "nvidia.com/mig-" + profile.replace("+", ".")


def extended_resources(plan: Plan) -> dict[str, dict[str, int]]:
    """Node -> extended resource -> count, as the device plugin will advertise them."""
    out: dict[str, dict[str, int]] = {}
    for pool in plan.pools:
        for node in pool.nodes:
            counts: Counter[str] = Counter()
            for gpu in pool.gpus_of(node):
                if gpu.layout is None:
                    counts["nvidia.com/gpu"] += 1
                else:
                    counts.update(resource_name(gpu, p) for p in gpu.layout)
            if counts:
                out[node] = dict(sorted(counts.items()))
    return out


@dataclass(frozen=True)
class ReplicaResource:
    """Where a replica runs and the resource its pod requests. `shared_with` lists the other replicas on the
    same instance: Kubernetes hands a device to one pod, so those need device-plugin time-slicing."""

    replica: Replica
    node: str
    gpu: int
    resource: str
    shared_with: tuple[str, ...]


def replica_resources(plan: Plan) -> list[ReplicaResource]:
    out = []
    for pool in plan.pools:
        for gpu in pool.gpus:
            for inst in gpu.instances:
                names = tuple(r.name for r in inst.replicas)
                for replica in inst.replicas:
                    resource = resource_name(gpu, inst.profile.name if inst.profile else None)
                    others = tuple(n for n in names if n != replica.name)
                    out.append(ReplicaResource(replica, gpu.node, gpu.index, resource, others))
    return out
