"""`ServingCluster`: the Kubernetes serving layer of one spec, on a cluster whose GPU nodes have joined.

Children, in dependency order: node labels (pool, `nvidia.com/mig.config`); the GPU Operator (mixed MIG
strategy, MIG manager reading the planner's mig-parted config); the Network Operator and its NicClusterPolicy
(RDMA shared device plugin) when a pool has InfiniBand or RoCE; the serving namespace with the shard
Deployments, Services and PodDisruptionBudgets, the gateway Deployment, Service, HPA and budget, its
ServiceAccount and Role (its `kubernetes` shard backend watches the EndpointSlices and scales the standby
Deployments), and the NetworkPolicy that lets only the gateway reach the shards. The manifests come from
`infra.workloads`, and the shard objects and the gateway's access from `controlplane.shards.manifests`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from controlplane.gpu.plan import Plan
from controlplane.gpu.render import mig_parted_config
from controlplane.names import dns_label
from controlplane.shards import manifests
from controlplane.spec import ClusterSpec
from infra import workloads
from infra.settings import KubernetesSettings, RegistryCredentials

GPU_OPERATOR_NAMESPACE = "gpu-operator"
NETWORK_OPERATOR_NAMESPACE = "nvidia-network-operator"
NVIDIA_HELM_REPO = "https://helm.ngc.nvidia.com/nvidia"
MIG_CONFIG_MAP = "mig-parted-config"
DEVICE_PLUGIN_CONFIG_MAP = "device-plugin-config"
PULL_SECRET = "image-pull"


@dataclass(frozen=True)
class ServingClusterArgs:
    """Typed args: the spec, its MIG plan, the Kubernetes node name of every planned node, stack settings."""

    spec: ClusterSpec
    plan: Plan
    node_names: dict[str, str]
    settings: KubernetesSettings
    registry: RegistryCredentials | None = None
    kubeconfig: pulumi.Input[str] | None = None


def rdma_link_types(spec: ClusterSpec) -> list[str]:
    """Link types of the pools whose fabric the RDMA shared device plugin serves (EFA has its own plugin)."""
    kinds = {"infiniband": "infiniband", "roce": "ether"}
    return sorted({kinds[p.fabric] for p in spec.node_pools if p.fabric in kinds})


class ServingCluster(pulumi.ComponentResource):
    def __init__(self, name: str, args: ServingClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("controlplane:infra:ServingCluster", name, None, opts)
        spec, plan, settings = args.spec, args.plan, args.settings
        ns = settings.namespace
        child = pulumi.ResourceOptions(parent=self)
        if args.kubeconfig is not None:
            provider = k8s.Provider(f"{name}-k8s", kubeconfig=args.kubeconfig, opts=child)
            child = pulumi.ResourceOptions(parent=self, provider=provider)

        self.resources: list[pulumi.CustomResource] = []

        # Node labels first: the MIG manager acts on `nvidia.com/mig.config`, shards select on the pool label.
        labels = [self._apply(f"{name}-node-{dns_label(m['metadata']['name'])}", m, child)
                  for m in workloads.node_patches(plan, args.node_names)]

        # GPU Operator with the planner's MIG layouts.
        operator_ns = self._apply(f"{name}-gpu-operator-ns", workloads.namespace(GPU_OPERATOR_NAMESPACE, spec), child)
        in_operator_ns = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[operator_ns]))
        mig_map = self._apply(f"{name}-mig-config", workloads.config_map(
            spec, MIG_CONFIG_MAP, GPU_OPERATOR_NAMESPACE, {"config.yaml": mig_parted_config(plan)}, "gpu-operator"),
            in_operator_ns)
        slicing = workloads.time_slicing(plan)
        operator_deps: list[pulumi.Resource] = [mig_map, *labels]
        if slicing:
            operator_deps.append(self._apply(f"{name}-device-plugin-config", workloads.config_map(
                spec, DEVICE_PLUGIN_CONFIG_MAP, GPU_OPERATOR_NAMESPACE,
                {"default": workloads.device_plugin_config(slicing)}, "gpu-operator"), in_operator_ns))
        link_types = rdma_link_types(spec)
        gpu_operator = k8s.helm.v3.Release(
            f"{name}-gpu-operator",
            name="gpu-operator",
            chart="gpu-operator",
            version=settings.gpu_operator_version,
            namespace=GPU_OPERATOR_NAMESPACE,
            repository_opts={"repo": NVIDIA_HELM_REPO},
            values=workloads.gpu_operator_values(settings, MIG_CONFIG_MAP,
                                                 DEVICE_PLUGIN_CONFIG_MAP if slicing else None, bool(link_types)),
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=operator_deps)),
        )
        self.resources.append(gpu_operator)

        # Network Operator and the RDMA shared device plugin, for InfiniBand / RoCE pools.
        rdma_ready: list[pulumi.Resource] = []
        if link_types:
            net_ns = self._apply(f"{name}-network-operator-ns",
                                 workloads.namespace(NETWORK_OPERATOR_NAMESPACE, spec), child)
            network_operator = k8s.helm.v3.Release(
                f"{name}-network-operator",
                name="network-operator",
                chart="network-operator",
                version=settings.network_operator_version,
                namespace=NETWORK_OPERATOR_NAMESPACE,
                repository_opts={"repo": NVIDIA_HELM_REPO},
                # The chart's own NicClusterPolicy is off: ours below is the one source of it.
                values={"deployCR": False, "nfd": {"enabled": False}},
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[net_ns])),
            )
            self.resources.append(network_operator)
            policy = workloads.nic_cluster_policy(link_types)
            rdma_ready.append(self._custom(f"{name}-nic-cluster-policy", policy, pulumi.ResourceOptions.merge(
                child, pulumi.ResourceOptions(depends_on=[network_operator]))))

        # The serving namespace.
        serving_ns = self._apply(f"{name}-ns", workloads.namespace(ns, spec), child)
        in_ns = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[serving_ns]))
        pull_secret = None
        if args.registry is not None:
            pull_secret = PULL_SECRET
            self._pull_secret(f"{name}-pull-secret", ns, args.registry, in_ns)

        # Shards: the pods need the operators' resources (MIG slices, RDMA) before they can be scheduled.
        shard_opts = pulumi.ResourceOptions.merge(in_ns, pulumi.ResourceOptions(
            depends_on=[serving_ns, gpu_operator, *rdma_ready]))
        pools = {p.name: p for p in spec.node_pools}
        groups = manifests.shard_groups(spec, plan)
        for group in groups:
            rdma = pools[group.pool].fabric in ("infiniband", "roce")
            self._apply(f"{name}-deploy-{group.deployment}",
                        manifests.shard_deployment(spec, group, settings, rdma, pull_secret), shard_opts)
        for shard in spec.shards:
            label = dns_label(shard.name)
            self._apply(f"{name}-svc-{label}", manifests.shard_service(spec, shard, ns), in_ns)
            self._apply(f"{name}-pdb-{label}", workloads.disruption_budget(
                spec, label, ns, {manifests.SHARD_LABEL: label}), in_ns)
        self._apply(f"{name}-shards-policy", workloads.shards_network_policy(spec, ns), in_ns)

        # The gateway, and the account its shard backend watches and scales the shards as.
        config = self._apply(f"{name}-gateway-config", workloads.gateway_config(spec, ns, settings.gateway.cpu), in_ns)
        access = [self._apply(f"{name}-gateway-{m['kind'].lower()}", m, in_ns)
                  for m in manifests.gateway_access(spec, groups, ns)]
        self._apply(f"{name}-gateway", workloads.gateway_deployment(spec, settings, pull_secret),
                    pulumi.ResourceOptions.merge(in_ns, pulumi.ResourceOptions(
                        depends_on=[serving_ns, config, *access])))
        service = self._apply(f"{name}-gateway-svc", workloads.gateway_service(spec, settings), in_ns)
        self._apply(f"{name}-gateway-hpa", workloads.gateway_autoscaler(spec, settings), in_ns)
        self._apply(f"{name}-gateway-pdb", workloads.disruption_budget(
            spec, "gateway", ns, {workloads.COMPONENT_LABEL: "gateway"}), in_ns)

        self.gateway_service = service
        self.register_outputs({"namespace": ns, "gatewayService": f"gateway.{ns}.svc"})

    def _apply(self, name: str, manifest: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
        """One typed pulumi-kubernetes resource for one manifest of `infra.workloads`."""
        kind = manifest["kind"]
        # Top-level fields become keyword arguments, which the Python SDK spells in snake case (roleRef: role_ref).
        body = {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): v for k, v in manifest.items()
                if k not in ("apiVersion", "kind")}
        factories = {
            ("v1", "Namespace"): k8s.core.v1.Namespace,
            ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
            ("v1", "Service"): k8s.core.v1.Service,
            ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
            ("rbac.authorization.k8s.io/v1", "Role"): k8s.rbac.v1.Role,
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.rbac.v1.RoleBinding,
            ("v1", "Node"): k8s.core.v1.NodePatch,
            ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
            ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
            ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.autoscaling.v2.HorizontalPodAutoscaler,
            ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
        }
        factory = factories[(manifest["apiVersion"], kind)]
        resource = factory(name, **body, opts=opts)
        self.resources.append(resource)
        return resource

    def _custom(self, name: str, manifest: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
        resource = k8s.apiextensions.CustomResource(
            name, api_version=manifest["apiVersion"], kind=manifest["kind"], metadata=manifest["metadata"],
            spec=manifest["spec"], opts=opts)
        self.resources.append(resource)
        return resource

    def _pull_secret(self, name: str, ns: str, registry: RegistryCredentials, opts: pulumi.ResourceOptions) -> None:
        auth = registry.password.apply(lambda password: json.dumps(
            {"auths": {registry.server: {"username": registry.username, "password": password}}}))
        self.resources.append(k8s.core.v1.Secret(
            name,
            metadata={"name": PULL_SECRET, "namespace": ns},
            type="kubernetes.io/dockerconfigjson",
            string_data={".dockerconfigjson": pulumi.Output.secret(auth)},
            opts=opts,
        ))
