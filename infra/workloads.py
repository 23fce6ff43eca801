"""The Kubernetes objects of the serving layer, as plain manifests built from the spec and the MIG plan.

Pure functions (no Pulumi): `ServingCluster` turns each manifest into a pulumi-kubernetes resource, and the
tests validate the same manifests against the Kubernetes schemas. Resource names in pods come from the
planner's renderers (`replica_resources`), never from a second computation.

A shard becomes one Deployment per distinct MIG resource its replicas were planned on (usually one:
`<shard>`); the planner may put one replica on a smaller slice (`<shard>-mig-1g-10gb`) when that saves a GPU.
Standby replicas are Deployments at zero replicas (`<shard>-standby`): their slices are reserved by the
plan, and the degradation ladder scales them up. One Service and one PodDisruptionBudget cover them all.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.gpu.plan import Plan
from controlplane.gpu.render import replica_resources
from controlplane.provision.inventory import kubernetes_node_labels
from controlplane.spec import ClusterSpec, Shard
from infra.names import dns_label, unique_labels
from infra.pools import POOL_LABEL
from infra.settings import KubernetesSettings

TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
MODELS_DIR = "/models"  # the repository Triton serves: links named as the spec names the models
IMAGE_MODELS_DIR = "/opt/models"  # where the shard image bakes the repository (images/Dockerfile.shard)
GATEWAY_CONFIG_DIR = "/etc/controlplane"
# The gateway's root filesystem is read-only; these emptyDir volumes are all it may write to: the run
# directory (`cpctl gateway` keeps its state there, CPCTL_RUN_DIR) and the temp dir (TMPDIR, HOME).
GATEWAY_RUN_DIR = "/run/controlplane"
GATEWAY_WRITABLE_VOLUMES = {"run": GATEWAY_RUN_DIR, "tmp": "/tmp"}
RDMA_RESOURCE = "rdma/rdma_shared_device_a"
COMPONENT_LABEL = "controlplane.io/component"
SHARD_LABEL = "controlplane.io/shard"
STANDBY_LABEL = "controlplane.io/standby"
# The Triton image's own non-root user.
TRITON_UID = 1000
# The control-plane image's user (images/Dockerfile.controlplane).
CONTROLPLANE_UID = 10001


@dataclass(frozen=True)
class ShardGroup:
    """Replicas of one shard that share a pod template: one Deployment."""

    shard: Shard
    deployment: str
    resource: str | None  # the extended resource each pod requests; None on CPU-only pools
    replicas: int
    standby: bool
    need_mib: int
    pool: str


def _resource_slug(resource: str | None) -> str:
    return dns_label((resource or "cpu").split("/")[-1])


def shard_groups(spec: ClusterSpec, plan: Plan) -> list[ShardGroup]:
    """Every Deployment of the shards, from the planner's replica placements."""
    labels = unique_labels([s.name for s in spec.shards], "shards")
    placed: dict[tuple[str, bool, str | None], list[int]] = defaultdict(list)
    need: dict[str, int] = {}
    for rr in replica_resources(plan):
        placed[(rr.replica.shard, rr.replica.standby, rr.resource)].append(rr.replica.index)
        need[rr.replica.shard] = rr.replica.need_mib
    for pool in plan.pools:
        for _, replica in pool.cpu_replicas:
            placed[(replica.shard, replica.standby, None)].append(replica.index)
            need[replica.shard] = replica.need_mib

    groups: list[ShardGroup] = []
    for shard in spec.shards:
        for standby in (False, True):
            keys = sorted((k for k in placed if k[0] == shard.name and k[1] == standby), key=lambda k: k[2] or "")
            for _, _, resource in keys:
                name = labels[shard.name] + ("-standby" if standby else "")
                if len(keys) > 1:
                    name += f"-{_resource_slug(resource)}"
                count = len(placed[(shard.name, standby, resource)])
                groups.append(ShardGroup(shard, name, resource, 0 if standby else count, standby,
                                         need[shard.name], spec.pool_of(shard).name))
    return groups


def time_slicing(plan: Plan) -> dict[str, int]:
    """Resource -> replicas per device, for instances the planner shares between replicas (Kubernetes gives
    a device to one pod unless the device plugin time-slices it)."""
    out: dict[str, int] = {}
    for rr in replica_resources(plan):
        if rr.shared_with:
            out[rr.resource] = max(out.get(rr.resource, 1), len(rr.shared_with) + 1)
    return dict(sorted(out.items()))


def _labels(spec: ClusterSpec, component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/part-of": dns_label(spec.cluster),
        "app.kubernetes.io/managed-by": "pulumi",
        COMPONENT_LABEL: component,
        **extra,
    }


def _meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def namespace(name: str, spec: ClusterSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(name, None, _labels(spec, "namespace"))}


def _probe(path: str, port: int | str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 2}


def link_models_command(spec: ClusterSpec, shard: Shard) -> list[str]:
    """The init step that builds the shard's repository: one link per model, named as the spec names it."""
    links = [f"ln -sfn {shlex.quote(f'{IMAGE_MODELS_DIR}/{spec.model(m).path}')} {shlex.quote(f'{MODELS_DIR}/{m}')}"
             for m in shard.models]
    return ["sh", "-c", " && ".join(["set -e", *links])]


def triton_args(shard: Shard) -> list[str]:
    return [
        "tritonserver",
        f"--model-repository={MODELS_DIR}",
        "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in shard.models],
        f"--http-port={TRITON_HTTP_PORT}",
        f"--grpc-port={TRITON_GRPC_PORT}",
        f"--metrics-port={TRITON_METRICS_PORT}",
        "--exit-on-error=true",
        "--disable-auto-complete-config",
    ]


def shard_deployment(spec: ClusterSpec, group: ShardGroup, settings: KubernetesSettings, rdma: bool,
                     pull_secret: str | None) -> dict[str, Any]:
    """The Deployment of one shard group: Triton on its MIG slice, probes on /v2/health/*."""
    shard_label = dns_label(group.shard.name)
    selector = {SHARD_LABEL: shard_label, "controlplane.io/deployment": group.deployment}
    pod_labels = _labels(spec, "shard", **selector, **{STANDBY_LABEL: str(group.standby).lower()})
    limits: dict[str, str] = {}
    if group.resource is not None:
        limits[group.resource] = "1"
    if rdma:
        limits[RDMA_RESOURCE] = "1"
    # Host memory: a server stages its models' weights in RAM while loading them onto the device.
    requests = {"cpu": "1", "memory": f"{group.need_mib}Mi", **limits}
    volumes: list[dict[str, Any]] = [
        {"name": "models", "emptyDir": {}},
        # The Python backend exchanges tensors through /dev/shm; the container default (64 MiB) is too small.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    source_mounts: list[dict[str, Any]] = []
    if settings.model_repository_claim:
        volumes.append({"name": "model-source",
                        "persistentVolumeClaim": {"claimName": settings.model_repository_claim, "readOnly": True}})
        source_mounts = [{"name": "model-source", "mountPath": IMAGE_MODELS_DIR, "readOnly": True}]
    capabilities: dict[str, Any] = {"drop": ["ALL"]}
    if rdma:
        # RDMA memory registration pins pages: the process needs IPC_LOCK.
        capabilities["add"] = ["IPC_LOCK"]
    pod_spec: dict[str, Any] = {
        "nodeSelector": {POOL_LABEL: dns_label(group.pool)},
        # Mirror the planner, which spreads a shard's replicas over nodes to survive the loss of one.
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {SHARD_LABEL: shard_label}}}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRITON_UID, "fsGroup": TRITON_UID},
        "terminationGracePeriodSeconds": 30,
        "initContainers": [{
            "name": "model-repository",
            "image": settings.shard_image,
            "command": link_models_command(spec, group.shard),
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, *source_mounts],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
        "containers": [{
            "name": "triton",
            "image": settings.shard_image,
            "args": triton_args(group.shard),
            "ports": [
                {"name": "http", "containerPort": TRITON_HTTP_PORT, "protocol": "TCP"},
                {"name": "grpc", "containerPort": TRITON_GRPC_PORT, "protocol": "TCP"},
                {"name": "metrics", "containerPort": TRITON_METRICS_PORT, "protocol": "TCP"},
            ],
            "resources": {"requests": requests, "limits": limits} if limits else {"requests": requests},
            # Loading large weights takes minutes: the startup probe holds liveness off until Triton is up.
            "startupProbe": _probe("/v2/health/live", "http", 10, 60),
            "readinessProbe": _probe("/v2/health/ready", "http", 5, 3),
            "livenessProbe": _probe("/v2/health/live", "http", 10, 6),
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
                             {"name": "shm", "mountPath": "/dev/shm"}, *source_mounts],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": capabilities},
        }],
        "volumes": volumes,
    }
    if pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": pull_secret}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(group.deployment, settings.namespace, pod_labels),
        "spec": {
            "replicas": group.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def shard_service(spec: ClusterSpec, shard: Shard, ns: str) -> dict[str, Any]:
    label = dns_label(shard.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(label, ns, _labels(spec, "shard", **{SHARD_LABEL: label})),
        "spec": {
            "type": "ClusterIP",
            # Ready and standby pods alike: a woken standby takes traffic as soon as it is ready.
            "selector": {SHARD_LABEL: label},
            "ports": [
                {"name": "http", "port": TRITON_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": TRITON_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": TRITON_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


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


def gateway_spec_yaml(spec: ClusterSpec, cpu: str) -> str:
    """The spec as the gateway pod reads it: listening on every interface, the repository at /models, and
    unless the spec says otherwise one gateway worker per core the pod requests (inside the pod the CPU
    affinity shows every core of the node, and nothing else limits it)."""
    workers = spec.gateway.workers or cpu_cores(cpu)
    gateway = spec.gateway.model_copy(update={"listen": "0.0.0.0", "workers": workers})
    adjusted = spec.model_copy(update={"gateway": gateway, "model_repository": MODELS_DIR})
    return yaml.safe_dump(adjusted.model_dump(mode="json", exclude_none=True), sort_keys=False)


def shard_endpoints(spec: ClusterSpec, ns: str) -> list[dict[str, Any]]:
    """The shard Services the gateway sends to (its Kubernetes shard backend reads this file)."""
    return [
        {"name": dns_label(s.name), "host": f"{dns_label(s.name)}.{ns}.svc", "port": TRITON_HTTP_PORT,
         "models": list(s.models)}
        for s in spec.shards
    ]


def gateway_config(spec: ClusterSpec, ns: str, cpu: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("gateway-config", ns, _labels(spec, "gateway")),
        "data": {"cluster.yaml": gateway_spec_yaml(spec, cpu),
                 "endpoints.json": json.dumps(shard_endpoints(spec, ns), indent=1)},
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
        "securityContext": {"runAsNonRoot": True, "runAsUser": CONTROLPLANE_UID},
        "containers": [{
            "name": "gateway",
            "image": settings.controlplane_image,
            "args": ["gateway", "--file", f"{GATEWAY_CONFIG_DIR}/cluster.yaml",
                     "--endpoints", f"{GATEWAY_CONFIG_DIR}/endpoints.json"],
            "env": [{"name": "CPCTL_RUN_DIR", "value": GATEWAY_RUN_DIR}, {"name": "TMPDIR", "value": "/tmp"},
                    {"name": "HOME", "value": "/tmp"}],
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
