"""The `kubernetes` shard backend, driven through the unchanged `kubernetes` client against the wire-level fake
API server of tests/fakes/kube_api.py (no API server can run here): per-pod endpoints from EndpointSlices,
watch expiry, the ladder's standby step on the scale subresource, drain through the pod's serving label; and
the real gateway + real tritonserver shards routed per pod."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from kubernetes import client

from controlplane.gpu.plan import plan_cluster
from controlplane.shards.base import Endpoint
from controlplane.shards.kubernetes import KubernetesShards, KubernetesUnavailable
from controlplane.shards.manifests import SERVING_LABEL, gateway_access, shard_groups
from controlplane.spec import ClusterSpec, parse_spec
from controlplane.stack import ServingStack
from tests.fakes.kube_api import TOKEN, FakeKubeApi

from .conftest import (
    EXAMPLE_SPEC,
    ROOT,
    ManualClock,
    RunningStack,
    start_gateway,
    stop_gateway,
)

NS = "serving"
ADMIN = {"Authorization": "Bearer cp-admin-key"}


def kubernetes_spec_text(cluster: str) -> str:
    """The example spec, its shards found in namespace `serving` of a cluster."""
    return (EXAMPLE_SPEC.read_text().replace("cluster: local-demo", f"cluster: {cluster}")
            .replace("model_repository: ../models", f"model_repository: {ROOT / 'examples' / 'models'}")
            + f"\nshards_backend:\n  kind: kubernetes\n  namespace: {NS}\n")


def kubernetes_spec() -> ClusterSpec:
    return parse_spec(kubernetes_spec_text("kube-test"))


def pod_endpoint(pod: str, address: str, ready: bool | None = True, terminating: bool = False) -> dict[str, Any]:
    conditions: dict[str, Any] = {"serving": ready, "terminating": terminating}
    if ready is not None:
        conditions["ready"] = ready
    return {"addresses": [address], "conditions": conditions,
            "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}}


def endpoint_slice(name: str, service: str, port: int, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """A slice as the endpointslice controller writes it (one port set per slice)."""
    return {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": port, "protocol": "TCP"},
                      {"name": "grpc", "port": port + 1, "protocol": "TCP"}]}


def deployment(name: str, replicas: int) -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"controlplane.io/deployment": name}}}}


def pod(name: str) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": NS,
                                        "labels": {"controlplane.io/shard": "main", SERVING_LABEL: "true"}}}


def api_for(fake: FakeKubeApi, token: str = TOKEN) -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = fake.url
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(configuration)


def gateway_role(spec: ClusterSpec) -> dict[str, Any]:
    """The Role the Pulumi program binds to the gateway's ServiceAccount for this spec."""
    objects = gateway_access(spec, shard_groups(spec, plan_cluster(spec)), NS)
    return next(o for o in objects if o["kind"] == "Role")


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    """The fake API server, answering only what the gateway's rendered Role allows."""
    with FakeKubeApi(role=gateway_role(kubernetes_spec())) as api:
        yield api


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait (bounded) for something the watch thread makes true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def names(endpoints: list[Endpoint]) -> list[str]:
    return [e.name for e in endpoints]


def test_endpoints_follow_pods_as_they_appear_turn_unready_terminate_and_go(fake: FakeKubeApi) -> None:
    fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1")]))
    fake.put(endpoint_slice("other-a", "not-a-shard", 9000, [pod_endpoint("web-1-x", "10.0.0.9")]))

    async def scenario() -> None:
        backend = KubernetesShards(kubernetes_spec(), api_for(fake), watch_timeout_s=5)
        seen: list[list[str]] = []
        await backend.start()
        backend.subscribe(lambda endpoints: seen.append(names(endpoints)))  # as the stack does: after start
        try:
            # One endpoint per pod, at the pod's address and the slice's `http` port, serving the shard's models.
            (first,) = backend.endpoints()
            assert (first.name, first.host, first.port) == ("main-7d4f9-aaaaa", "10.0.0.1", 9000)
            assert first.models == frozenset({"risk", "risk_lite", "work", "textgen"}) and not first.standby

            # A second pod (ready unset counts as ready), and a woken standby pod in its own slice.
            fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1"),
                                                              pod_endpoint("main-7d4f9-bbbbb", "10.0.0.2", None)]))
            fake.put(endpoint_slice("main-b", "main", 9100, [pod_endpoint("main-standby-55c6d-ccccc", "10.0.0.3")]))
            await until(lambda: len(backend.endpoints()) == 3, "three pods")
            standby = {e.name: e.standby for e in backend.endpoints()}
            assert standby == {"main-7d4f9-aaaaa": False, "main-7d4f9-bbbbb": False, "main-standby-55c6d-ccccc": True}

            # Not ready: out of rotation, still reported; terminating (ready false, serving true): out too.
            fake.put(endpoint_slice("main-a", "main", 9000, [
                pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1", ready=False),
                {**pod_endpoint("main-7d4f9-bbbbb", "10.0.0.2", ready=False, terminating=True),
                 "conditions": {"ready": False, "serving": True, "terminating": True}}]))
            await until(lambda: names(backend.endpoints()) == ["main-standby-55c6d-ccccc"], "only the standby pod")
            states = {s.name: s.state for s in backend.status()}
            assert states == {"main-7d4f9-aaaaa": "unready", "main-7d4f9-bbbbb": "stopping",
                              "main-standby-55c6d-ccccc": "ready"}

            # A slice deleted: its pods are gone.
            fake.delete("EndpointSlice", NS, "main-b")
            await until(lambda: backend.endpoints() == [], "no endpoint")
            # The subscriber got every distinct set, whole, in order; the other Service's pods never.
            assert seen[0] == ["main-7d4f9-aaaaa"] and seen[-1] == []
            assert ["main-standby-55c6d-ccccc"] in seen and not any("web-1-x" in s for s in seen)
        finally:
            await backend.stop()
        assert backend.thread is None

    asyncio.run(scenario())
    # The watch asked only for the shard Services' slices, from the list's resourceVersion.
    assert fake.count("GET", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", "watch=true") >= 1
    assert fake.count("GET", "/apis/discovery.k8s.io/v1/", "labelSelector=kubernetes.io/service-name in (main)") >= 2


def test_an_expired_watch_lists_again_and_sees_what_it_missed(fake: FakeKubeApi) -> None:
    fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1")]))

    async def scenario() -> None:
        backend = KubernetesShards(kubernetes_spec(), api_for(fake), watch_timeout_s=5)
        await backend.start()
        try:
            assert names(backend.endpoints()) == ["main-7d4f9-aaaaa"] and backend.lists == 1
            # A change no watch delivers (history compacted): the running watch gets 410 Expired.
            fake.put_unseen(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-zzzzz", "10.0.0.7")]))
            await until(lambda: names(backend.endpoints()) == ["main-7d4f9-zzzzz"], "the change, through a new list")
            assert backend.lists == 2
            # The new watch works from the new list's resourceVersion.
            fake.put(endpoint_slice("main-a", "main", 9000, []))
            await until(lambda: backend.endpoints() == [], "the next change, through the new watch")
            assert backend.lists == 2
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_a_watch_the_server_ends_is_resumed_from_where_it_was_without_listing(fake: FakeKubeApi) -> None:
    fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1")]))
    watches = ("GET", "/apis/discovery.k8s.io/v1/", "watch=true")

    async def scenario() -> None:
        backend = KubernetesShards(kubernetes_spec(), api_for(fake), watch_timeout_s=1)
        await backend.start()
        try:
            await until(lambda: fake.count(*watches) >= 2, "the server ending the first watch (timeoutSeconds)")
            fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-bbbbb", "10.0.0.2")]))
            await until(lambda: names(backend.endpoints()) == ["main-7d4f9-bbbbb"], "the change, on a resumed watch")
            assert backend.lists == 1
        finally:
            await backend.stop()

    asyncio.run(scenario())
    # Each watch after the first resumed from a resourceVersion the server had sent (a bookmark at the end).
    resumed = [p for m, p, _ in fake.requests if m == "GET" and "watch=true" in p][1:]
    assert resumed and all("resourceVersion=" in p and "allowWatchBookmarks=true" in p for p in resumed)


def test_the_ladders_standby_step_scales_the_standby_deployment(fake: FakeKubeApi, tmp_path: Path) -> None:
    spec = kubernetes_spec()
    fake.put(deployment("main", 2))
    fake.put(deployment("main-standby", 0))

    async def scenario() -> None:
        backend = KubernetesShards(spec, api_for(fake), watch_timeout_s=5)
        await backend.start()
        # The stack's own wiring: its ladder's step 1 calls the backend (no worker process is started here).
        stack = ServingStack(spec, backend)
        ladder = stack.gateway.ladder
        clock = ManualClock()
        ladder.clock = clock
        try:
            for _ in range(2):  # sustained backlog: up one step (standby), after `up_after_s`
                ladder.tick({"critical": spec.gateway.ladder.backlog_high + 1})
                clock.now += spec.gateway.ladder.up_after_s
            assert ladder.step == 1
            await until(lambda: fake.get("Deployment", NS, "main-standby")["spec"]["replicas"] == 1,
                        "the standby Deployment scaled to the spec's standby count")
            for _ in range(2):  # backlog cleared: back down, standby released
                ladder.tick({"critical": 0})
                clock.now += spec.gateway.ladder.down_after_s
            assert ladder.step == 0
            await until(lambda: fake.get("Deployment", NS, "main-standby")["spec"]["replicas"] == 0,
                        "the standby Deployment scaled back to 0")
        finally:
            await backend.stop()

    asyncio.run(scenario())
    scale_patches = [(path, kind, body) for path, kind, body in fake.patches if path.endswith("/scale")]
    assert scale_patches == [
        (f"/apis/apps/v1/namespaces/{NS}/deployments/main-standby/scale", "application/merge-patch+json",
         {"spec": {"replicas": replicas}}) for replicas in (1, 0)]
    assert fake.get("Deployment", NS, "main")["spec"]["replicas"] == 2  # the serving Deployment is untouched


def test_drain_takes_the_pod_out_of_its_service_and_undrain_puts_it_back(fake: FakeKubeApi) -> None:
    fake.put(endpoint_slice("main-a", "main", 9000, [pod_endpoint("main-7d4f9-aaaaa", "10.0.0.1")]))
    fake.put(pod("main-7d4f9-aaaaa"))
    fake.put(pod("unrelated-pod"))

    async def scenario() -> None:
        backend = KubernetesShards(kubernetes_spec(), api_for(fake), watch_timeout_s=5)
        await backend.start()
        try:
            assert await backend.set_draining("main-7d4f9-aaaaa", True)
            assert fake.get("Pod", NS, "main-7d4f9-aaaaa")["metadata"]["labels"][SERVING_LABEL] == "false"
            # The endpointslice controller drops it from the Service's slice; undrain still finds the pod.
            fake.put(endpoint_slice("main-a", "main", 9000, []))
            await until(lambda: backend.status() == [], "the drained pod out of the slices")
            assert await backend.set_draining("main-7d4f9-aaaaa", False)
            assert fake.get("Pod", NS, "main-7d4f9-aaaaa")["metadata"]["labels"][SERVING_LABEL] == "true"
            # A pod that is not one of the shards' is never patched through the gateway's admin API.
            assert not await backend.set_draining("unrelated-pod", True)
        finally:
            await backend.stop()

    asyncio.run(scenario())
    assert [path.rsplit("/", 1)[1] for path, _, _ in fake.patches] == ["main-7d4f9-aaaaa"] * 2
    assert fake.get("Pod", NS, "unrelated-pod")["metadata"]["labels"][SERVING_LABEL] == "true"


def test_a_refused_token_is_a_clear_error_at_start(fake: FakeKubeApi) -> None:
    async def scenario() -> None:
        backend = KubernetesShards(kubernetes_spec(), api_for(fake, token="wrong"))
        with pytest.raises(KubernetesUnavailable, match="namespace 'serving': API server answered 401"):
            await backend.start()

    asyncio.run(scenario())


def test_the_gateways_role_allows_nothing_else(fake: FakeKubeApi) -> None:
    """Every request of the tests above passed RBAC with the rendered Role; what it does not need is refused."""
    fake.put(deployment("main", 2))
    fake.put(pod("main-7d4f9-aaaaa"))
    apps, core = client.AppsV1Api(api_for(fake)), client.CoreV1Api(api_for(fake))
    refused = {}
    for what, call in {
        "scale the serving Deployment": lambda: apps.patch_namespaced_deployment_scale(
            "main", NS, {"spec": {"replicas": 9}}, _content_type="application/merge-patch+json"),
        "patch a Deployment": lambda: apps.patch_namespaced_deployment(
            "main", NS, {"spec": {"replicas": 9}}, _content_type="application/merge-patch+json"),
        "read a pod": lambda: core.read_namespaced_pod("main-7d4f9-aaaaa", NS),
    }.items():
        with pytest.raises(client.ApiException) as forbidden:
            call()
        refused[what] = forbidden.value.status
    assert set(refused.values()) == {403}
    assert fake.get("Deployment", NS, "main")["spec"]["replicas"] == 2


def test_the_fake_answers_the_clients_patches_with_the_real_servers_codes() -> None:
    """The fake itself: what the unchanged client sends for each patch type, and the real server's status codes."""
    with FakeKubeApi() as fake:
        fake.put(deployment("main-standby", 0))
        check_patch_codes(fake)


def check_patch_codes(fake: FakeKubeApi) -> None:
    apps = client.AppsV1Api(api_for(fake))
    assert apps.patch_namespaced_deployment_scale("main-standby", NS, {"spec": {"replicas": 2}}).spec.replicas == 2
    assert fake.patches[-1][1] == "application/strategic-merge-patch+json"  # the client's choice for an object
    scale = apps.patch_namespaced_deployment_scale("main-standby", NS,
                                                   [{"op": "replace", "path": "/spec/replicas", "value": 1}])
    assert (scale.spec.replicas, fake.patches[-1][1]) == (1, "application/json-patch+json")
    codes = {}
    for what, call in {
        "negative replicas": lambda: apps.patch_namespaced_deployment_scale(
            "main-standby", NS, {"spec": {"replicas": -1}}, _content_type="application/merge-patch+json"),
        "no such Deployment": lambda: apps.read_namespaced_deployment_scale("nope", NS),
        "server-side apply": lambda: apps.patch_namespaced_deployment_scale(
            "main-standby", NS, {"spec": {"replicas": 1}}, _content_type="application/apply-patch+yaml",
            field_manager="test"),
    }.items():
        with pytest.raises(client.ApiException) as refused:
            call()
        codes[what] = refused.value.status
    assert codes == {"negative replicas": 422, "no such Deployment": 404, "server-side apply": 415}
    assert fake.get("Deployment", NS, "main-standby")["spec"]["replicas"] == 1


# --- the real gateway, real tritonserver shards as the pods -----------------------------------------------------
def test_gateway_routes_per_pod_from_endpoint_slices(stack: RunningStack, run_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpctl gateway` in-cluster mode: the example stack's two tritonserver processes are the shard's pods."""
    ports = {s["name"]: int(s["url"].rsplit(":", 1)[1]) for s in stack.state()["shards"] if s["url"]}
    pods = {"main-7d4f9-aaaaa": ports["main-0"], "main-7d4f9-bbbbb": ports["main-1"]}
    with FakeKubeApi(role=gateway_role(kubernetes_spec())) as fake:
        for pod_name, port in pods.items():  # different ports: one slice each, as the controller would split them
            fake.put(endpoint_slice(f"main-{pod_name[-5:]}", "main", port, [pod_endpoint(pod_name, "127.0.0.1")]))
            fake.put(pod(pod_name))
        kubeconfig = run_dir / "kube-gateway.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(fake.kubeconfig(NS)))
        spec = run_dir / "kube-gateway.yaml"
        spec.write_text(kubernetes_spec_text("kube-gateway"))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the gateway is not in a pod: kubectl's way in
        gateway = start_gateway(spec, None, run_dir / "kube-gateway.log")
        try:
            def shards() -> dict[str, dict]:
                request = urllib.request.Request(f"{gateway.url}/admin/queues", headers=ADMIN)
                with urllib.request.urlopen(request, timeout=5) as response:
                    return {s["name"]: s for s in json.loads(response.read())["shards"]}

            def wait_for(names_wanted: set[str]) -> None:
                deadline = time.monotonic() + 15
                while set(shards()) != names_wanted:
                    assert time.monotonic() < deadline, f"the gateway did not follow the slices to {names_wanted}"
                    time.sleep(0.1)

            wait_for(set(pods))
            client_ = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"))
            features = httpclient.InferInput("features", [1, 16], "FP32")
            features.set_data_from_numpy(np.zeros((1, 16), np.float32))
            for _ in range(4):
                assert client_.infer("risk", [features]).as_numpy("score").shape == (1, 1)

            # Pod b turns unready: every request goes to pod a, and still succeeds.
            fake.put(endpoint_slice("main-bbbbb", "main", pods["main-7d4f9-bbbbb"],
                                    [pod_endpoint("main-7d4f9-bbbbb", "127.0.0.1", ready=False)]))
            wait_for({"main-7d4f9-aaaaa"})
            before = shards()["main-7d4f9-aaaaa"]["served"]
            for _ in range(3):
                assert client_.infer("risk", [features]).as_numpy("score").shape == (1, 1)
            assert shards()["main-7d4f9-aaaaa"]["served"] == before + 3  # routed to the pod, per pod
            assert shards()["main-7d4f9-aaaaa"]["url"] == f"http://127.0.0.1:{pods['main-7d4f9-aaaaa']}"

            # An admin drain of pod a reaches the pod's label in the cluster (every gateway replica follows it).
            request = urllib.request.Request(f"{gateway.url}/admin/shards/main-7d4f9-aaaaa/drain", method="POST",
                                             headers=ADMIN)
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["draining"] is True
            assert fake.get("Pod", NS, "main-7d4f9-aaaaa")["metadata"]["labels"][SERVING_LABEL] == "false"
            # The endpointslice controller (played here) takes it out of the slice: no pod serves the shard now.
            fake.put(endpoint_slice("main-aaaaa", "main", pods["main-7d4f9-aaaaa"], []))
            wait_for(set())
            # Undrain reaches the pod no worker routes to any more; the controller puts it back; it serves again.
            request = urllib.request.Request(f"{gateway.url}/admin/shards/main-7d4f9-aaaaa/undrain",
                                             method="POST", headers=ADMIN)
            with urllib.request.urlopen(request, timeout=10) as response:
                assert json.loads(response.read())["draining"] is False
            assert fake.get("Pod", NS, "main-7d4f9-aaaaa")["metadata"]["labels"][SERVING_LABEL] == "true"
            fake.put(endpoint_slice("main-aaaaa", "main", pods["main-7d4f9-aaaaa"],
                                    [pod_endpoint("main-7d4f9-aaaaa", "127.0.0.1")]))
            wait_for({"main-7d4f9-aaaaa"})
            assert shards()["main-7d4f9-aaaaa"]["draining"] is False
            assert client_.infer("risk", [features]).as_numpy("score").shape == (1, 1)
            # A pod of no shard is a 404 naming it, not a patch.
            with pytest.raises(urllib.error.HTTPError) as unknown:
                urllib.request.urlopen(urllib.request.Request(f"{gateway.url}/admin/shards/web-1/drain",
                                                              method="POST", headers=ADMIN), timeout=10)
            assert unknown.value.code == 404 and "web-1" in json.loads(unknown.value.read())["error"]
            client_.close()
        finally:
            assert not stop_gateway(gateway)


def cpctl_gateway(spec: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`cpctl gateway` that is expected to refuse to start (bounded: it must not hang)."""
    return subprocess.run([sys.executable, "-m", "controlplane.cli", "gateway", "-f", str(spec), "--port", "0", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_cpctl_gateway_says_what_is_missing_for_its_shards_backend(tmp_path: Path) -> None:
    in_cluster = tmp_path / "kube.yaml"
    in_cluster.write_text(kubernetes_spec_text("kube-cli"))
    static = tmp_path / "static.yaml"
    static.write_text(kubernetes_spec_text("static-cli").replace("kind: kubernetes", "kind: static"))
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    results = {
        "static, no file": cpctl_gateway(static, env=env),
        "kubernetes, a file": cpctl_gateway(in_cluster, "--endpoints", str(tmp_path / "e.json"), env=env),
        "kubernetes, no kubeconfig": cpctl_gateway(in_cluster, env={**env, "KUBECONFIG": str(tmp_path / "none")}),
    }
    with FakeKubeApi() as fake:  # reachable, but the token is refused
        config = fake.kubeconfig(NS)
        config["users"][0]["user"]["token"] = "wrong"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(config))
        results["kubernetes, refused"] = cpctl_gateway(in_cluster, env={**env, "KUBECONFIG": str(kubeconfig)})
    errors = {what: " ".join(r.stderr.split()) for what, r in results.items()}
    assert {what: r.returncode for what, r in results.items()} == {
        "static, no file": 2, "kubernetes, a file": 2, "kubernetes, no kubeconfig": 1, "kubernetes, refused": 1}
    assert "pass --endpoints FILE" in errors["static, no file"]
    assert "--endpoints is for `static`" in errors["kubernetes, a file"]
    assert "no usable kubeconfig (set KUBECONFIG)" in errors["kubernetes, no kubeconfig"]
    assert "cannot list the EndpointSlices" in errors["kubernetes, refused"] and "401" in errors["kubernetes, refused"]
    assert not any("Traceback" in r.stderr for r in results.values())
