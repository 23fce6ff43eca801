"""The Kubernetes objects of a shard (Deployment, Service), rendered once for every reader.

The Pulumi serving layer (`infra/workloads.py`, `infra/serving.py`) creates these objects; the `kubernetes`
shard backend (`controlplane/shards/kubernetes.py`) finds what it watches and scales through the same
functions (the Service names and the standby Deployments), so the two can never disagree on a name or a
label. Pure functions of the spec and the MIG plan: no Pulumi, no API server.

A shard becomes one Deployment per distinct MIG resource its replicas were planned on (usually one:
`<shard>`); the planner may put one replica on a smaller slice (`<shard>-mig-1g-10gb`) when that saves a GPU.
Standby replicas are Deployments at zero replicas (`<shard>-standby`): their slices are reserved by the
plan, and the degradation ladder scales them up. One Service covers them all; it selects only pods labelled
`controlplane.io/serving: "true"`, so a drained pod (label set to "false") leaves every gateway's rotation
while it keeps running.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.gpu.plan import Plan
from controlplane.gpu.render import replica_resources
from controlplane.names import POOL_LABEL, dns_label, unique_labels
from controlplane.spec import ClusterSpec, Shard

TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
MODELS_DIR = "/models"  # the repository Triton serves: links named as the spec names the models
IMAGE_MODELS_DIR = "/opt/models"  # where the shard image bakes the repository (images/Dockerfile.shard)
RDMA_RESOURCE = "rdma/rdma_shared_device_a"
COMPONENT_LABEL = "controlplane.io/component"
SHARD_LABEL = "controlplane.io/shard"
DEPLOYMENT_LABEL = "controlplane.io/deployment"
STANDBY_LABEL = "controlplane.io/standby"
# In the shard Service's selector: "false" takes a pod out of rotation (an admin drain) without stopping it.
SERVING_LABEL = "controlplane.io/serving"
# The Triton image's own non-root user.
TRITON_UID = 1000



class ShardPodSettings(Protocol):
    """What a shard pod needs besides the spec (infra's `KubernetesSettings` has these fields)."""

    namespace: str
    shard_image: str
    model_repository_claim: str | None


@dataclass(frozen=True)
class ShardGroup:
    """Replicas of one shard that share a pod template: one Deployment."""

    shard: Shard
    deployment: str
    resource: str | None  # the extended resource each pod requests; None on CPU-only pools
    replicas: int  # what the Deployment is created with: 0 for standby groups until the ladder wakes them
    standby: bool
    need_mib: int
    pool: str
    planned: int  # replicas the plan reserved slices for (a woken standby group runs this many)


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
                                         need[shard.name], spec.pool_of(shard).name, count))
    return groups


def object_labels(spec: ClusterSpec, component: str, **extra: str) -> dict[str, str]:
    """The labels of every object the serving layer creates."""
    return {
        "app.kubernetes.io/part-of": dns_label(spec.cluster),
        "app.kubernetes.io/managed-by": "pulumi",
        COMPONENT_LABEL: component,
        **extra,
    }


def object_meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def http_probe(path: str, port: int | str, period: int, failures: int) -> dict[str, Any]:
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
        # Its GPU (a MIG slice or a whole one) is device 0 in the container; pools sized by the spec.
        f"--pinned-memory-pool-byte-size={shard.pinned_memory_mb << 20}",
        f"--cuda-memory-pool-byte-size=0:{shard.cuda_memory_pool_mb << 20}",
    ]


def shard_deployment(spec: ClusterSpec, group: ShardGroup, settings: ShardPodSettings, rdma: bool,
                     pull_secret: str | None) -> dict[str, Any]:
    """The Deployment of one shard group: Triton on its MIG slice, probes on /v2/health/*."""
    shard_label = dns_label(group.shard.name)
    selector = {SHARD_LABEL: shard_label, DEPLOYMENT_LABEL: group.deployment}
    pod_labels = object_labels(spec, "shard", **selector, **{STANDBY_LABEL: str(group.standby).lower(),
                                                              SERVING_LABEL: "true"})
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
            "startupProbe": http_probe("/v2/health/live", "http", 10, 60),
            "readinessProbe": http_probe("/v2/health/ready", "http", 5, 3),
            "livenessProbe": http_probe("/v2/health/live", "http", 10, 6),
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
        "metadata": object_meta(group.deployment, settings.namespace, pod_labels),
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
        "metadata": object_meta(label, ns, object_labels(spec, "shard", **{SHARD_LABEL: label})),
        "spec": {
            "type": "ClusterIP",
            # Ready and standby pods alike (a woken standby takes traffic as soon as it is ready), less drained ones.
            "selector": {SHARD_LABEL: label, SERVING_LABEL: "true"},
            "ports": [
                {"name": "http", "port": TRITON_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": TRITON_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": TRITON_METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


GATEWAY_ACCOUNT = "gateway"


def gateway_access(spec: ClusterSpec, groups: list[ShardGroup], ns: str) -> list[dict[str, Any]]:
    """The gateway's ServiceAccount and a Role bound to it allowing exactly what its `kubernetes` shard backend
    does: list and watch the EndpointSlices, scale the standby Deployments (by name), label shard pods (drain)."""
    labels = object_labels(spec, "gateway")
    rules: list[dict[str, Any]] = [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        # Pod names are not known in advance: the backend itself patches only pods it saw in the shards' slices.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
    ]
    standby = sorted(g.deployment for g in groups if g.standby)
    if standby:
        rules.append({"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": standby,
                      "verbs": ["patch"]})
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": object_meta(GATEWAY_ACCOUNT, ns, labels)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": object_meta(f"{GATEWAY_ACCOUNT}-shards", ns, labels), "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": object_meta(f"{GATEWAY_ACCOUNT}-shards", ns, labels),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{GATEWAY_ACCOUNT}-shards"},
         "subjects": [{"kind": "ServiceAccount", "name": GATEWAY_ACCOUNT, "namespace": ns}]},
    ]
