"""The `kubernetes` shard backend: the gateway in a cluster, in front of the shard pods that Pulumi created.

- **Endpoints, one per pod.** A thread lists the EndpointSlices (discovery.k8s.io/v1) of the shard Services
  and watches them from the list's resourceVersion, so routing, ejection and adaptive concurrency act per pod
  (an endpoint is named after its pod). An endpoint is routed to while its conditions say ready (unset
  counts as ready, as the API documents) and not terminating: a pod shutting down gets no new requests, its
  in-flight ones finish. A watch that ends is resumed from the last resourceVersion it saw; one that expired
  (410 Gone) lists again; any other error lists again after a back-off (0.5 s doubling to 10 s).
- **Standby.** The ladder's step 1 scales a shard's standby Deployments (`<shard>-standby`) through the scale
  subresource, to the replicas the plan reserved slices for, and back to 0 when it steps down.
- **Drain.** `POST /admin/shards/POD/drain` sets the pod's `controlplane.io/serving` label to "false". The
  shard Service selects only "true" pods, so the endpointslice controller takes the pod out of every slice
  and every gateway replica stops sending to it, while the pod keeps running (its ReplicaSet still owns it);
  undrain sets "true" again. Only pods this backend has seen in the shards' slices can be patched.

The Service and Deployment names come from `controlplane.shards.manifests`, the functions the Pulumi serving
layer renders them with. Nothing is created or deleted here. The gateway's Role (infra/workloads.py) allows
exactly this: list/watch endpointslices, get/patch deployments/scale, patch pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from controlplane.gpu.plan import PlanError, plan_cluster
from controlplane.shards import manifests
from controlplane.shards.base import Endpoint, ShardBackend, ShardStatus
from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by the endpointslice controller on every slice
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = (5.0, 10.0)  # connect, read: for list, scale and patch (a watch reads as long as it lasts)
WATCH_TIMEOUT_S = 300  # the API server ends a watch after this; it is resumed from the last resourceVersion
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class KubernetesUnavailable(RuntimeError):
    """The API server cannot be reached or refuses the gateway; the message says which and what to do."""


def api_client() -> client.ApiClient:
    """A client of the cluster's API server: the pod's ServiceAccount in a pod, else the kubeconfig
    (`KUBECONFIG`, or ~/.kube/config), as kubectl finds it."""
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise KubernetesUnavailable(f"no Kubernetes API to watch the shards: not in a pod, and no usable "
                                    f"kubeconfig (set KUBECONFIG): {exc}") from None
    return client.ApiClient(configuration)


def _api_problem(action: str, exc: Exception) -> str:
    if isinstance(exc, ApiException):
        hint = {401: " (the token is refused)", 403: " (the gateway's Role does not allow it)",
                404: " (no such namespace or object)"}.get(exc.status or 0, "")
        return f"{action}: API server answered {exc.status} {exc.reason}{hint}"
    return f"{action}: {exc}"


class KubernetesShards(ShardBackend):
    def __init__(self, spec: ClusterSpec, api: client.ApiClient, watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        super().__init__()
        self.namespace = spec.shards_backend.namespace
        self.discovery = client.DiscoveryV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.watch_timeout_s = watch_timeout_s
        services = {manifests.shard_service(spec, shard, self.namespace)["metadata"]["name"]: shard
                    for shard in spec.shards}
        self.shard_of_service = services
        self.selector = f"{SERVICE_NAME_LABEL} in ({','.join(sorted(services))})"
        try:
            groups = manifests.shard_groups(spec, plan_cluster(spec))
        except PlanError as exc:
            raise KubernetesUnavailable(f"cannot name the standby Deployments: the spec does not plan: {exc}") from None
        self.standby_groups = {s.name: [g for g in groups if g.shard.name == s.name and g.standby]
                               for s in spec.shards}
        self.deployments = {g.deployment for g in groups}
        self.standby_deployments = {g.deployment for g in groups if g.standby}
        self.drained: set[str] = set()  # pods this gateway took out of their Service
        # Written by the watch thread only; published to the event loop as a whole.
        self.slices: dict[str, Any] = {}
        self.current: list[Endpoint] = []
        self.statuses: list[ShardStatus] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = threading.Event()
        self.watch: Watch | None = None
        self.thread: threading.Thread | None = None
        self.lists = 0  # how often the slices were listed (once, plus once per expired watch)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """List the slices once (raise if the API server refuses), then follow them in a thread."""
        self.loop = asyncio.get_running_loop()
        try:
            version = await asyncio.to_thread(self._list)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubernetesUnavailable(_api_problem(
                f"cannot list the EndpointSlices of the shard Services in namespace '{self.namespace}'", exc)) from None
        self._publish_now()
        self.thread = threading.Thread(target=self._follow, args=(version,), name="endpointslice-watch", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        self.stopping.set()
        if self.watch is not None:
            self.watch.stop()  # shuts the watch's socket down: the thread's read returns at once
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 5.0)
            self.thread = None

    # --- the watch thread -----------------------------------------------------------------------------
    def _list(self) -> str:
        """Replace the known slices with a fresh list; return its resourceVersion."""
        listed = self.discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _request_timeout=REQUEST_TIMEOUT_S)
        self.slices = {s.metadata.name: s for s in listed.items}
        self.lists += 1
        return listed.metadata.resource_version

    def _follow(self, version: str | None) -> None:
        backoff = BACKOFF_FIRST_S
        while not self.stopping.is_set():
            try:
                if version is None:
                    version = self._list()
                    self._publish()
                version = self._watch_from(version)
                backoff = BACKOFF_FIRST_S
            except ApiException as exc:
                if self.stopping.is_set():
                    break
                version = None
                if exc.status == 410:  # expired: what happened since is lost, only a list shows it
                    log.info("the watch of the shards' EndpointSlices expired: listing them again")
                    continue
                log.error("%s; listing again in %.1f s", _api_problem("watching the shards' EndpointSlices", exc),
                          backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if self.stopping.is_set():
                    break
                log.warning("the watch of the shards' EndpointSlices broke (%s); resuming in %.1f s", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _watch_from(self, version: str) -> str:
        """Apply the slices' changes after `version` until the API server ends the watch; return the last
        resourceVersion seen."""
        self.watch = Watch()
        if self.stopping.is_set():  # `stop` came before this watch existed
            return version
        stream = self.watch.stream(self.discovery.list_namespaced_endpoint_slice, self.namespace,
                                   label_selector=self.selector, resource_version=version,
                                   timeout_seconds=self.watch_timeout_s, allow_watch_bookmarks=True,
                                   # A connection that dies silently must not hang the watch past its end.
                                   _request_timeout=(REQUEST_TIMEOUT_S[0], self.watch_timeout_s + 30))
        for event in stream:
            if self.stopping.is_set():
                break
            if event is None:  # a blank line of the stream
                continue
            kind, endpoint_slice = event["type"], event["object"]
            if kind in ("ADDED", "MODIFIED"):
                self.slices[endpoint_slice.metadata.name] = endpoint_slice
            elif kind == "DELETED":
                self.slices.pop(endpoint_slice.metadata.name, None)
            if kind != "BOOKMARK":
                self._publish()
        return self.watch.resource_version or version

    # --- from slices to endpoints -----------------------------------------------------------------------
    def _read_slices(self) -> tuple[list[Endpoint], list[ShardStatus]]:
        endpoints: dict[str, Endpoint] = {}
        statuses: dict[str, ShardStatus] = {}
        for endpoint_slice in self.slices.values():
            service = (endpoint_slice.metadata.labels or {}).get(SERVICE_NAME_LABEL)
            shard = self.shard_of_service.get(service or "")
            port = next((p.port for p in endpoint_slice.ports or [] if p.name == "http" and p.port), None)
            if shard is None or port is None:
                continue
            for pod in endpoint_slice.endpoints or []:
                if not pod.addresses:
                    continue
                # Named after its pod; an endpoint without one (not from a selector) after its address.
                named = pod.target_ref is not None and pod.target_ref.name
                name = pod.target_ref.name if named else f"{service}-{pod.addresses[0]}"
                conditions = pod.conditions
                terminating = conditions is not None and conditions.terminating is True
                ready = (conditions is None or conditions.ready is not False) and not terminating
                standby = self._deployment_of(name) in self.standby_deployments
                endpoint = Endpoint(name, pod.addresses[0], port, frozenset(shard.models), standby,
                                    gpu=shard.gpu is not None)
                # A pod seen in two slices (while the controller moves it) counts once, ready if either says so.
                if ready:
                    endpoints[name] = endpoint
                if ready or name not in statuses:
                    statuses[name] = ShardStatus(name=name, shard=shard.name, url=endpoint.url,
                                                 state="ready" if ready else "stopping" if terminating else "unready",
                                                 models=sorted(shard.models), standby=standby)
        return sorted(endpoints.values(), key=lambda e: e.name), sorted(statuses.values(), key=lambda s: s.name)

    def _deployment_of(self, pod: str) -> str | None:
        """A Deployment's pods are named DEPLOYMENT-HASH-SUFFIX (its ReplicaSet's name, then the pod's)."""
        parts = pod.rsplit("-", 2)
        return parts[0] if len(parts) == 3 and parts[0] in self.deployments else None

    def _publish(self) -> None:
        """From the watch thread: hand the new set to the event loop."""
        endpoints, statuses = self._read_slices()
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the gateway stopped
                self.loop.call_soon_threadsafe(self._apply, endpoints, statuses)

    def _publish_now(self) -> None:
        self._apply(*self._read_slices())

    def _apply(self, endpoints: list[Endpoint], statuses: list[ShardStatus]) -> None:
        self.statuses = statuses
        if endpoints != self.current:
            self.current = endpoints
            log.info("shard endpoints: %s", ", ".join(f"{e.name} {e.host}:{e.port}" for e in endpoints) or "none")
            self._notify()

    # --- ShardBackend ---------------------------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        return list(self.current)

    def status(self) -> list[ShardStatus]:
        return list(self.statuses)

    async def set_standby_active(self, shard: str, count: int) -> None:
        """Scale the shard's standby Deployments to `count` replicas in all (each up to what the plan reserved)."""
        remaining = count
        for group in self.standby_groups.get(shard, []):
            replicas = min(remaining, group.planned)
            remaining -= replicas
            try:
                await asyncio.to_thread(self.apps.patch_namespaced_deployment_scale, group.deployment, self.namespace,
                                        {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH,
                                        _request_timeout=REQUEST_TIMEOUT_S)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                log.error("%s", _api_problem(f"cannot scale Deployment {group.deployment} to {replicas}", exc))
                continue
            log.warning("standby of shard %s: Deployment %s scaled to %d", shard, group.deployment, replicas)

    async def set_draining(self, name: str, draining: bool) -> bool:
        """Take pod `name` out of its Service (or put it back) through its `controlplane.io/serving` label."""
        if name not in self.drained and name not in {s.name for s in self.statuses}:
            return False
        label = {"metadata": {"labels": {manifests.SERVING_LABEL: "false" if draining else "true"}}}
        try:
            await asyncio.to_thread(self.core.patch_namespaced_pod, name, self.namespace, label,
                                    _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT_S)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.error("%s", _api_problem(f"cannot {'drain' if draining else 'undrain'} pod {name}", exc))
            return False
        (self.drained.add if draining else self.drained.discard)(name)
        log.warning("pod %s %s its Service", name, "taken out of" if draining else "back in")
        return True
