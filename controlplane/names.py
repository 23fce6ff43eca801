"""Kubernetes names and labels of spec objects, shared by the Pulumi program (infra/) and the Ansible
inventory (nodes register with their labels at join): the spec allows '_' and '.', a Service name
(RFC 1035) does not."""

from __future__ import annotations

import re

_LABEL_MAX = 63

# The node label naming a node's pool: shards select on it.
POOL_LABEL = "controlplane.io/pool"


def dns_label(name: str) -> str:
    """`name` as an RFC 1035 label: lower case, '-' for '_' and '.', starting with a letter."""
    label = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"x-{label}"
    if len(label) > _LABEL_MAX:
        raise ValueError(f"'{name}' is longer than a Kubernetes name may be ({_LABEL_MAX} characters)")
    return label


def unique_labels(names: list[str], what: str) -> dict[str, str]:
    """spec name -> dns_label, refusing two spec names that map to one label (e.g. 'a_b' and 'a.b')."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        label = dns_label(name)
        if label in seen and seen[label] != name:
            raise ValueError(f"{what} '{seen[label]}' and '{name}' both become Kubernetes name '{label}'; rename one")
        seen[label] = name
        out[name] = label
    return out
