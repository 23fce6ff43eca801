"""The Ansible inventory of the node pools: written from Pulumi outputs, read for `existing` pools.

Format (plain YAML inventory, one group per pool, group vars for the GPU roles):

    all:
      children:
        <pool>:
          hosts:
            <node>: {ansible_host: ADDRESS}
          vars: {gpu_model: H100-80GB, gpus_per_node: 8, fabric: efa, mig_config: <mig-parted config name>}

`mig_config` moves to the hosts when the nodes of a pool were planned different layouts.

The writer is one function (`ansible_inventory`) so that it can be unified with the Ansible issue's own
inventory code (inventories/, controlplane/provision/) when that lands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class InventoryNode:
    name: str  # the planner's node name
    address: str
    host_vars: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InventoryGroup:
    pool: str
    nodes: list[InventoryNode]
    group_vars: dict[str, Any]


def ansible_inventory(groups: list[InventoryGroup]) -> str:
    """The inventory YAML for `ansible-playbook -i`."""
    children: dict[str, Any] = {}
    for group in groups:
        children[group.pool] = {
            "hosts": {node.name: {"ansible_host": node.address, **node.host_vars} for node in group.nodes},
            "vars": dict(group.group_vars),
        }
    return yaml.safe_dump({"all": {"children": children}}, sort_keys=False)


def _find_group(children: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any] | None:
    """A group named one of `names`, at any depth of `children` groups."""
    for name, body in children.items():
        if name in names:
            return body or {}
        found = _find_group((body or {}).get("children") or {}, names)
        if found is not None:
            return found
    return None


def inventory_hosts(path: Path, group: str) -> list[InventoryNode]:
    """The hosts of one pool's group of a YAML inventory; ValueError naming what is missing. The group may
    be named after the pool (this module's format) or `pool_<name>` nested at any depth (the format of
    `cpctl inventory`, controlplane/provision/inventory.py)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ValueError(f"cannot read inventory {path}: {exc.strerror}") from None
    children = (data.get("all") or {}).get("children") or {}
    names = (group, "pool_" + re.sub(r"[^A-Za-z0-9_]", "_", group))
    body = _find_group(children, names)
    if body is None:
        raise ValueError(f"inventory {path} has no group '{group}' (or '{names[1]}') under all.children")
    hosts = body.get("hosts") or {}
    return [InventoryNode(name, str((hostvars or {}).get("ansible_host", name))) for name, hostvars in hosts.items()]
