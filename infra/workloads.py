"""The Kubernetes objects of the serving layer, as plain manifests built from the spec and the MIG plan.

Pure functions (no Pulumi): `ServingCluster` turns each manifest into a pulumi-kubernetes resource, and the
tests validate the same manifests against the Kubernetes schemas. Resource names in pods come from the
planner's renderers (`replica_resources`), never from a second computation.

The shard objects themselves (Deployments, Services) come from `controlplane.shards.manifests`, which the
`kubernetes` shard backend of the gateway reads too: one rendering for both. One PodDisruptionBudget covers
a shard's Deployments.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from controlplane.gpu.plan import Plan
from controlplane.gpu.render import replica_resources
from controlplane.provision.inventory import kubernetes_node_labels
from controlplane.shards.manifests import (
    COMPONENT_LABEL,
    GATEWAY_ACCOUNT,
    MODELS_DIR,
    RDMA_RESOURCE,
    TRITON_GRPC_PORT,
    TRITON_HTTP_PORT,
)
from controlplane.shards.manifests import http_probe as _probe
from controlplane.shards.manifests import object_labels as _labels
from controlplane.shards.manifests import object_meta as _meta
from controlplane.spec import ClusterSpec, ShardsBackend
from infra.settings import KubernetesSettings

GATEWAY_CONFIG_DIR = "/etc/controlplane"
# The gateway's root filesystem is read-only and the gateway writes nothing; Python and the libraries it
# loads may still want a temp dir, so /tmp is an emptyDir (TMPDIR, HOME) and the only writable path.
GATEWAY_WRITABLE_VOLUMES = {"tmp": "/tmp"}
# The control-plane image's user (images/Dockerfile.controlplane).
CONTROLPLANE_UID = 10001


def time_slicing(plan: Plan) -> dict[str, int]:
    """Resource -> replicas per device, for instances the planner shares between replicas (Kubernetes gives
    a device to one pod unless the device plugin time-slices it)."""
    out: dict[str, int] = {}
    for rr in replica_resources(plan):
        if rr.shared_with:
            out[rr.resource] = max(out.get(rr.resource, 1), len(rr.shared_with) + 1)
    return dict(sorted(out.items()))


def namespace(name: str, spec: ClusterSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, _labels(spec, "namespace"))}


def disruption_budget(spec: ClusterSpec, name: str, ns: str, selector: dict[str, str]) -> dict[str, Any]:
    """At most one pod evicted at a time: drains (MIG reconfiguration, upgrades) never empty a shard at once."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, ns, _labels(spec, selector.get(COMPONENT_LABEL, "shard"))),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def cpu_cores(quantity: str) -> int:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in whole cores, rounded up, at least 1."""
    cores = float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
    return max(1, math.ceil(cores))


def gateway_spec_yaml(spec: ClusterSpec, ns: str, cpu: str) -> str:
    """The spec as the gateway pod reads it: listening on every interface, the repository at /models, the
    shards found through the EndpointSlices of namespace `ns`, and unless the spec says otherwise one gateway
    worker per core the pod requests (inside the pod the CPU affinity shows every core of the node, and
    nothing else limits it)."""
    workers = spec.gateway.workers or cpu_cores(cpu)
    gateway = spec.gateway.model_copy(update={"listen": "0.0.0.0", "workers": workers})
    adjusted = spec.model_copy(update={"gateway": gateway, "model_repository": MODELS_DIR,
                                       "shards_backend": ShardsBackend(kind="kubernetes", namespace=ns)})
    return yaml.safe_dump(adjusted.model_dump(mode="json", exclude_none=True), sort_keys=False)


def gateway_config(spec: ClusterSpec, ns: str, cpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("gateway-config", ns, _labels(spec, "gateway")),
        "data": {"cluster.yaml": gateway_spec_yaml(spec, ns, cpu)},
    }


def gateway_port(spec: ClusterSpec) -> int:
    if spec.gateway.port == 0:
        raise ValueError("gateway.port: 0 (a free port) cannot be a Service port; set a port in the spec")
    return spec.gateway.port


def gateway_deployment(spec: ClusterSpec, settings: KubernetesSettings, pull_secret: str | None) -> dict[str, Any]:
    scaling = settings.gateway
    selector = {COMPONENT_LABEL: "gateway"}
    labels = _labels(spec, "gateway")
    port = gateway_port(spec)
    pod_spec: dict[str, Any] = {
        # Its `kubernetes` shard backend watches and scales the shards as this account (`gateway_access`).
        "serviceAccountName": GATEWAY_ACCOUNT,
        "securityContext": {"runAsNonRoot": True, "runAsUser": CONTROLPLANE_UID},
        "containers": [{
            "name": "gateway",
            "image": settings.controlplane_image,
            "args": ["gateway", "--file", f"{GATEWAY_CONFIG_DIR}/cluster.yaml"],
            "env": [{"name": "TMPDIR", "value": "/tmp"}, {"name": "HOME", "value": "/tmp"}],
            "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
            # The HPA scales on CPU utilisation, which is relative to this request.
            "resources": {"requests": {"cpu": scaling.cpu, "memory": scaling.memory},
                          "limits": {"memory": scaling.memory}},
            "readinessProbe": _probe("/v2/health/ready", "http", 5, 3),
            "livenessProbe": _probe("/v2/health/live", "http", 10, 3),
            "volumeMounts": [{"name": "config", "mountPath": GATEWAY_CONFIG_DIR, "readOnly": True},
                             *({"name": name, "mountPath": path} for name, path in GATEWAY_WRITABLE_VOLUMES.items())],
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": [{"name": "config", "configMap": {"name": "gateway-config"}},
                    *({"name": name, "emptyDir": {"sizeLimit": "256Mi"}} for name in GATEWAY_WRITABLE_VOLUMES)],
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": selector}}],
    }
    if pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": pull_secret}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("gateway", settings.namespace, labels),
        "spec": {
            "replicas": scaling.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def gateway_service(spec: ClusterSpec, settings: KubernetesSettings) -> dict[str, Any]:
    port = gateway_port(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta("gateway", settings.namespace, _labels(spec, "gateway")),
        "spec": {"type": settings.gateway.service_type, "selector": {COMPONENT_LABEL: "gateway"},
                 "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]},
    }


def gateway_autoscaler(spec: ClusterSpec, settings: KubernetesSettings) -> dict[str, Any]:
    scaling = settings.gateway
    if not 1 <= scaling.min_replicas <= scaling.max_replicas:
        raise ValueError(f"controlplane:kubernetes.gateway: need 1 <= minReplicas ({scaling.min_replicas}) <= "
                         f"maxReplicas ({scaling.max_replicas})")
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta("gateway", settings.namespace, _labels(spec, "gateway")),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [{"type": "Resource", "resource": {
                "name": "cpu", "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization},
            }}],
        },
    }


def shards_network_policy(spec: ClusterSpec, ns: str) -> dict[str, Any]:
    """Only gateway pods reach the shards: Triton is not safe to expose (one bad request can abort it)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("shards-from-gateway-only", ns, _labels(spec, "shard")),
        "spec": {
            "podSelector": {"matchLabels": {COMPONENT_LABEL: "shard"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {COMPONENT_LABEL: "gateway"}}}],
                "ports": [{"protocol": "TCP", "port": TRITON_HTTP_PORT},
                          {"protocol": "TCP", "port": TRITON_GRPC_PORT}],
            }],
        },
    }


def config_map(spec: ClusterSpec, name: str, ns: str, data: dict[str, str], component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, ns, _labels(spec, component)),
            "data": data}


def device_plugin_config(slicing: dict[str, int]) -> str:
    """The device plugin's time-slicing config for the shared MIG instances (empty `resources` when none)."""
    resources = [{"name": name, "replicas": replicas} for name, replicas in slicing.items()]
    return yaml.safe_dump({"version": "v1", "sharing": {"timeSlicing": {"resources": resources}}}, sort_keys=False)


def node_patches(plan: Plan, node_names: dict[str, str]) -> list[dict[str, Any]]:
    """Labels per node, the same the nodes register with at join (the inventory's `k8s_node_labels`): its
    pool and, on GPU nodes, the mig-parted config. `node_names` maps the planner's node to its Kubernetes name."""
    return [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": node_names.get(node, node), "labels": labels}}
            for node, labels in kubernetes_node_labels(plan).items()]


def nic_cluster_policy(link_types: list[str]) -> dict[str, Any]:
    """The Network Operator's policy: the RDMA shared device plugin over the Mellanox HCAs. MOFED comes with
    the host (HPC image, Ansible RDMA role), so no `ofedDriver` here."""
    config = {"configList": [{
        "resourceName": RDMA_RESOURCE.split("/")[1],
        "rdmaHcaMax": 63,
        "selectors": {"vendors": ["15b3"], "linkTypes": link_types},
    }]}
    return {
        "apiVersion": "mellanox.com/v1alpha1",
        "kind": "NicClusterPolicy",
        "metadata": {"name": "nic-cluster-policy"},
        "spec": {"rdmaSharedDevicePlugin": {
            "image": "k8s-rdma-shared-dev-plugin",
            "repository": "ghcr.io/mellanox",
            "version": "v1.5.3",
            "config": json.dumps(config),
        }},
    }


def gpu_operator_values(settings: KubernetesSettings, mig_config_map: str, device_plugin_map: str | None,
                        rdma: bool) -> dict[str, Any]:
    """Helm values of the GPU Operator: mixed MIG strategy, the MIG manager reading the planner's config."""
    values: dict[str, Any] = {
        "mig": {"strategy": "mixed"},
        "migManager": {
            "enabled": True,
            "config": {"name": mig_config_map, "default": "all-disabled"},
            # Cloud GPUs often need a reboot to change MIG mode; the MIG manager may do it.
            "env": [{"name": "WITH_REBOOT", "value": "true"}],
        },
        "driver": {"enabled": not settings.preinstalled_driver},
        "toolkit": {"enabled": not settings.preinstalled_driver},
    }
    if rdma:
        values["driver"]["rdma"] = {"enabled": True, "useHostMofed": settings.preinstalled_driver}
    if device_plugin_map:
        values["devicePlugin"] = {"config": {"name": device_plugin_map, "default": "default"}}
    return values
