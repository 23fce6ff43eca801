"""Kubernetes-safe names for spec names: the spec allows '_' and '.', a Service name (RFC 1035) does not.

The functions live with the shard objects (`controlplane.shards.manifests`), which the gateway's `kubernetes`
backend reads too; infra/ modules import them from here.
"""

from controlplane.shards.manifests import dns_label, unique_labels

__all__ = ["dns_label", "unique_labels"]
