"""Kubernetes-safe names: they live in `controlplane.names`, which the Ansible inventory uses too."""

from controlplane.names import POOL_LABEL, dns_label, unique_labels

__all__ = ["POOL_LABEL", "dns_label", "unique_labels"]
