"""The Kubernetes serving layer under Pulumi mocks: MIG names from the planner, probes, policies, scaling;
and every object strictly schema-validated."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from controlplane.gpu.plan import plan_cluster
from controlplane.gpu.render import extended_resources, mig_parted_config, node_labels, replica_resources
from controlplane.infra.offline import ProgramRun, is_secret, unwrap_secrets
from controlplane.infra.validate import kubernetes_objects, validate_run
from controlplane.spec import load_spec, parse_spec
from tests.test_infra_support import SPECS, STACKS, k8s, only, required, run_stack, run_with


def shard_deployments(stack: str) -> list[dict]:
    out = [r.inputs for r in run_stack(stack).resources
           if r.inputs.get("kind") == "Deployment"
           and required(r.inputs, "metadata", "labels").get("controlplane.io/component") == "shard"]
    assert out, "no shard Deployment recorded"
    return out


def container(deployment: dict) -> dict:
    return required(deployment, "spec", "template", "spec", "containers", 0)


def mig_resource(deployment: dict) -> str:
    limits = required(container(deployment), "resources", "limits")
    names = [name for name in limits if name.startswith("nvidia.com/")]
    assert len(names) == 1, f"expected one GPU resource, got {limits}"
    return names[0]


@pytest.mark.parametrize("stack", STACKS)
def test_pods_request_exactly_the_mig_resources_the_planner_placed(stack: str) -> None:
    plan = plan_cluster(load_spec(SPECS[stack]))
    planned = Counter((rr.replica.shard, rr.resource, rr.replica.standby) for rr in replica_resources(plan))
    requested: Counter = Counter()
    for deployment in shard_deployments(stack):
        labels = required(deployment, "spec", "template", "metadata", "labels")
        standby = labels["controlplane.io/standby"] == "true"
        shard = labels["controlplane.io/shard"]
        # Standby Deployments run 0 pods until woken; count them by their planned replicas instead.
        count = sum(1 for rr in replica_resources(plan) if rr.replica.shard == shard and rr.replica.standby
                    and rr.resource == mig_resource(deployment)) if standby else required(
            deployment, "spec", "replicas")
        requested[(shard, mig_resource(deployment), standby)] += count
    assert requested == planned
    advertised = {name for resources in extended_resources(plan).values() for name in resources}
    assert {key[1] for key in requested} <= advertised


@pytest.mark.parametrize("stack", STACKS)
def test_mig_manager_config_and_node_labels_are_the_planners(stack: str) -> None:
    run = run_stack(stack)
    plan = plan_cluster(load_spec(SPECS[stack]))
    config_map = k8s(run, "ConfigMap", "mig-parted-config")
    assert required(config_map, "data", "config.yaml") == mig_parted_config(plan)
    patches = [r.inputs for r in run.resources if r.inputs.get("kind") == "Node"]
    applied = sorted(required(p, "metadata", "labels", "nvidia.com/mig.config") for p in patches)
    assert applied == sorted(labels["nvidia.com/mig.config"] for labels in node_labels(plan).values())


@pytest.mark.parametrize("stack", STACKS)
def test_gpu_operator_uses_mixed_strategy_and_the_mig_manager(stack: str) -> None:
    release = next(r.inputs for r in run_stack(stack).of_type("kubernetes:helm.sh/v3:Release")
                   if r.inputs.get("chart") == "gpu-operator")
    values = required(release, "values")
    assert required(values, "mig", "strategy") == "mixed"
    assert required(values, "migManager", "enabled") is True
    assert required(values, "migManager", "config", "name") == "mig-parted-config"
    assert required(release, "repositoryOpts", "repo") == "https://helm.ngc.nvidia.com/nvidia"


def test_shared_mig_instances_are_time_sliced_as_the_planner_shares_them() -> None:
    run = run_stack("aws")
    plan = plan_cluster(load_spec(SPECS["aws"]))
    shared = {rr.resource for rr in replica_resources(plan) if rr.shared_with}
    config = yaml.safe_load(required(k8s(run, "ConfigMap", "device-plugin-config"), "data", "default"))
    assert {r["name"] for r in config["sharing"]["timeSlicing"]["resources"]} == shared


@pytest.mark.parametrize("stack", STACKS)
def test_shards_probe_triton_health_endpoints(stack: str) -> None:
    for deployment in shard_deployments(stack):
        triton = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in required(triton, "ports")}
        assert ports["http"] == 8000
        assert required(triton, "readinessProbe", "httpGet") == {"path": "/v2/health/ready", "port": "http"}
        assert required(triton, "livenessProbe", "httpGet") == {"path": "/v2/health/live", "port": "http"}
        assert required(triton, "startupProbe", "httpGet", "path") == "/v2/health/live"


def test_shards_load_only_their_models_from_the_model_repository_volume() -> None:
    deployment = k8s(run_stack("aws"), "Deployment", "main")
    args = required(container(deployment), "args")
    assert [a for a in args if a.startswith("--load-model=")] == ["--load-model=risk", "--load-model=work"]
    assert "--model-repository=/models" in args
    # Triton's memory pools from the spec's shard (defaults: 256 MiB each)
    assert {f"--pinned-memory-pool-byte-size={256 << 20}", f"--cuda-memory-pool-byte-size=0:{256 << 20}"} <= set(args)
    mounts = {m["name"]: m["mountPath"] for m in required(container(deployment), "volumeMounts")}
    assert mounts["models"] == "/models"
    link = required(deployment, "spec", "template", "spec", "initContainers", 0, "command", 2)
    assert "ln -sfn /opt/models/risk /models/risk" in link


@pytest.mark.parametrize(("stack", "rdma"), [("aws", False), ("azure", True), ("existing", True)])
def test_rdma_resource_only_on_infiniband_pools(stack: str, rdma: bool) -> None:
    for deployment in shard_deployments(stack):
        triton = container(deployment)
        assert ("rdma/rdma_shared_device_a" in required(triton, "resources", "limits")) is rdma
        assert ("IPC_LOCK" in triton["securityContext"]["capabilities"].get("add", [])) is rdma


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_gateway_reaches_the_shards(stack: str) -> None:
    run = run_stack(stack)
    policy = k8s(run, "NetworkPolicy", "shards-from-gateway-only")
    assert required(policy, "spec", "podSelector") == {"matchLabels": {"controlplane.io/component": "shard"}}
    assert required(policy, "spec", "policyTypes") == ["Ingress"]
    (rule,) = required(policy, "spec", "ingress")
    assert rule["from"] == [{"podSelector": {"matchLabels": {"controlplane.io/component": "gateway"}}}]
    # The selectors must match the pods: every shard pod carries the shard label, only gateway pods the other.
    for deployment in shard_deployments(stack):
        assert deployment["spec"]["template"]["metadata"]["labels"]["controlplane.io/component"] == "shard"
        assert deployment["spec"]["template"]["metadata"]["labels"]["controlplane.io/serving"] == "true"
    gateway_pods = required(k8s(run, "Deployment", "gateway"), "spec", "template", "metadata", "labels")
    assert gateway_pods["controlplane.io/component"] == "gateway"


@pytest.mark.parametrize("stack", STACKS)
def test_every_shard_has_a_service_and_a_disruption_budget(stack: str) -> None:
    run = run_stack(stack)
    for shard in load_spec(SPECS[stack]).shards:
        service = k8s(run, "Service", shard.name)
        # Pods labelled serving "false" (an admin drain through the kubernetes shard backend) leave the Service.
        assert required(service, "spec", "selector") == {"controlplane.io/shard": shard.name,
                                                         "controlplane.io/serving": "true"}
        assert {p["port"] for p in required(service, "spec", "ports")} == {8000, 8001, 8002}
        budget = k8s(run, "PodDisruptionBudget", shard.name)
        assert required(budget, "spec", "maxUnavailable") == 1
        assert required(budget, "spec", "selector", "matchLabels") == {"controlplane.io/shard": shard.name}


def test_gateway_is_configured_from_the_spec_and_the_stack() -> None:
    run = run_stack("aws")
    spec = load_spec(SPECS["aws"])
    service = k8s(run, "Service", "gateway")
    assert required(service, "spec", "ports", 0, "port") == spec.gateway.port
    assert required(service, "spec", "type") == "LoadBalancer"
    hpa = k8s(run, "HorizontalPodAutoscaler", "gateway")
    assert (required(hpa, "spec", "minReplicas"), required(hpa, "spec", "maxReplicas")) == (2, 8)
    assert required(hpa, "spec", "scaleTargetRef", "name") == "gateway"
    assert required(hpa, "spec", "metrics", 0, "resource", "target", "averageUtilization") == 70
    gateway = k8s(run, "Deployment", "gateway")
    assert required(container(gateway), "resources", "requests", "cpu")  # the HPA's utilisation needs it
    pod_spec = parse_spec(required(k8s(run, "ConfigMap", "gateway-config"), "data", "cluster.yaml"))
    assert pod_spec.gateway.listen == "0.0.0.0" and pod_spec.tenants == spec.tenants
    assert pod_spec.gateway.workers == 2  # one per core of the pod's CPU request, not of the node


def test_registry_password_becomes_an_image_pull_secret() -> None:
    run = run_with("aws", registryServer="ghcr.io", registryUsername="bot", registryPassword="hunter2")
    secret = only(run, "kubernetes:core/v1:Secret").inputs
    assert required(secret, "type") == "kubernetes.io/dockerconfigjson"
    # It reaches the provider as a Pulumi secret (encrypted in state), not as plain text.
    data = required(secret, "stringData")
    assert is_secret(data), f"stringData is not a Pulumi secret: {data}"
    assert "hunter2" in unwrap_secrets(data)[".dockerconfigjson"]
    assert validate_run(ProgramRun([only(run, "kubernetes:core/v1:Secret")], [], {})).errors == []
    pull = required(k8s(run, "Deployment", "main"), "spec", "template", "spec", "imagePullSecrets")
    assert pull == [{"name": "image-pull"}]


def test_serving_layer_can_wait_for_the_nodes() -> None:
    run = run_with("aws", kubernetes='{"enabled": false}')
    assert not [r for r in run.resources if r.type.startswith("kubernetes:")]
    assert run.of_type("aws:ec2/instance:Instance")


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_object_passes_strict_schema_validation(stack: str) -> None:
    run = run_stack(stack)
    result = validate_run(run)
    assert result.errors == []
    assert len(result.checked) == len(kubernetes_objects(run)) >= 25
    # Custom resources have no schema offline: they may only warn, and only these do.
    assert all("NicClusterPolicy" in w for w in result.warnings)
    assert bool(result.warnings) is (stack != "aws")


def test_strict_validation_catches_an_unknown_field() -> None:
    from controlplane.infra.offline import Recorded

    bad = Recorded("kubernetes:core/v1:Service", "x", {"apiVersion": "v1", "kind": "Service",
                                                          "metadata": {"name": "x"}, "spec": {"portz": []}})
    assert validate_run(ProgramRun([bad], [], {})).errors


@pytest.mark.parametrize("stack", STACKS)
def test_the_gateway_finds_the_shards_through_their_endpoint_slices(stack: str) -> None:
    """The gateway pod runs the `kubernetes` shard backend on the namespace's shard Services and standby
    Deployments, exactly as the program names them (one rendering for both)."""
    from controlplane.shards.kubernetes import KubernetesShards

    run = run_stack(stack)
    config = k8s(run, "ConfigMap", "gateway-config")
    assert set(required(config, "data")) == {"cluster.yaml"}
    pod_spec = parse_spec(required(config, "data", "cluster.yaml"))
    assert (pod_spec.shards_backend.kind, pod_spec.shards_backend.namespace) == ("kubernetes", "serving")
    assert "--endpoints" not in required(container(k8s(run, "Deployment", "gateway")), "args")
    backend = KubernetesShards(pod_spec, api=None)  # names only: nothing is called before start()
    services = {r.inputs["metadata"]["name"] for r in run.resources if r.inputs.get("kind") == "Service"
                and r.inputs["metadata"]["labels"]["controlplane.io/component"] == "shard"}
    assert set(backend.shard_of_service) == services
    standby = {d["metadata"]["name"] for d in shard_deployments(stack)
               if d["spec"]["template"]["metadata"]["labels"]["controlplane.io/standby"] == "true"}
    assert standby and {g.deployment for gs in backend.standby_groups.values() for g in gs} == standby


@pytest.mark.parametrize("stack", STACKS)
def test_the_gateway_account_may_do_what_its_shard_backend_does_and_no_more(stack: str) -> None:
    run = run_stack(stack)
    gateway_pod = required(k8s(run, "Deployment", "gateway"), "spec", "template", "spec")
    assert required(gateway_pod, "serviceAccountName") == "gateway"
    assert k8s(run, "ServiceAccount", "gateway")
    binding = k8s(run, "RoleBinding", "gateway-shards")
    assert required(binding, "roleRef") == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                            "name": "gateway-shards"}
    assert required(binding, "subjects") == [{"kind": "ServiceAccount", "name": "gateway", "namespace": "serving"}]
    standby = sorted(d["metadata"]["name"] for d in shard_deployments(stack)
                     if d["spec"]["template"]["metadata"]["labels"]["controlplane.io/standby"] == "true")
    assert required(k8s(run, "Role", "gateway-shards"), "rules") == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": standby, "verbs": ["patch"]},
    ]
