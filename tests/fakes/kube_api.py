"""A small wire-level fake of the Kubernetes API server, on loopback, for the few resources the gateway uses.

No API server can run here, so the `kubernetes` shard backend is tested against this one, driven by the
unchanged `kubernetes` client (a kubeconfig or `Configuration` pointing at `url`). What it serves, with the
real server's paths, status codes and `Status` bodies:

- `GET  /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices`: list (`labelSelector` with `k=v`, `k!=v`,
  `k in (a,b)`), and `watch=true` from a `resourceVersion`: events as JSON lines on a chunked stream
  (ADDED / MODIFIED / DELETED), ended after `timeoutSeconds` (a BOOKMARK first when `allowWatchBookmarks`);
  a resourceVersion older than the last compaction gets an ERROR event with a 410 `Expired` Status, as the
  real watch cache answers.
- `GET|PATCH /api/v1/namespaces/NS/pods/NAME`, `GET|PATCH /apis/apps/v1/namespaces/NS/deployments/NAME` and
  its `/scale` subresource (autoscaling/v1 Scale): patches as `application/merge-patch+json`,
  `application/strategic-merge-patch+json` (both applied as a JSON merge patch, which is what a strategic
  merge does to the maps patched here) or `application/json-patch+json` (add, replace, remove; an object
  body is a 400); server-side apply is answered 415.
- A bearer token is required (401 otherwise); given a Role (`rules` as rbac.authorization.k8s.io/v1 writes
  them), a request it does not allow is 403 Forbidden, as RBAC answers; unknown paths are 404, a bad
  selector 400, negative replicas 422.

Not served: creating objects through the API, other resources, field selectors, a real endpointslice
controller. The test plays the cluster's controllers through `put`, `delete` and `compact`.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlsplit

TOKEN = "fake-kube-token"
MAX_WATCH_S = 60.0  # a watch without timeoutSeconds ends after this (the real server picks 30-60 min)

ROUTES = [
    (re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/endpointslices$"), "EndpointSlice", None),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)$"), "Pod", None),
    (re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$"), "Deployment", None),
    (re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale$"), "Deployment",
     "scale"),
]
API_VERSIONS = {"EndpointSlice": "discovery.k8s.io/v1", "Pod": "v1", "Deployment": "apps/v1"}
RESOURCES = {"EndpointSlice": ("discovery.k8s.io", "endpointslices"), "Pod": ("", "pods"),
             "Deployment": ("apps", "deployments")}
VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
JSON_PATCH = "application/json-patch+json"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass
class Event:
    resource_version: int
    kind: str
    type: str
    obj: dict[str, Any]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(target: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """RFC 6902 JSON patch, the `add`, `replace` and `remove` operations (others: 422 like a failing test op)."""
    out = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove") or "path" not in op:
            raise ApiError(422, "Invalid", f"unsupported or malformed JSON patch operation: {op!r}")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if op["op"] == "remove":
            if last not in node:
                raise ApiError(422, "Invalid", f"the server rejected our request: missing path {op['path']}")
            del node[last]
        else:
            node[last] = copy.deepcopy(op.get("value"))
    return out


def parse_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """`k=v,k!=v,k in (a,b)` -> [(key, op, values)]; anything else is a 400, as on the real server."""
    terms = []
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", text):
        term = term.strip()
        if match := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            terms.append((match[1], match[2], {v.strip() for v in match[3].split(",") if v.strip()}))
        elif match := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            terms.append((match[1], "!=" if match[2] == "!=" else "=", {match[3]}))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return terms


def selected(obj: dict[str, Any], terms: list[tuple[str, str, set[str]]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, values in terms:
        present = labels.get(key) in values
        if (op in ("=", "in") and not present) or (op in ("!=", "notin") and present):
            return False
    return True


class FakeKubeApi:
    """The store, its history of events, and the HTTP server in front of them (a thread of the test)."""

    def __init__(self, role: dict[str, Any] | None = None) -> None:
        """`role`: the Role bound to the token; None allows everything."""
        self.role = role
        self.lock = threading.Condition()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[Event] = []
        self.revision = 1
        self.compacted = 0  # watches from a resourceVersion below this get 410 Expired
        self.expiry = 0  # bumped by `compact`: running watches end with 410 too
        self.requests: list[tuple[str, str, str]] = []  # (method, path with query, content type)
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # (path, content type, body)
        self.closing = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-kube-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def kubeconfig(self, namespace: str) -> dict[str, Any]:
        """A kubeconfig for this server, as `kubectl` and the `kubernetes` client read it."""
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "gateway", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "gateway", "namespace": namespace}}],
        }

    # --- what the test does: the cluster's controllers -------------------------------------------------------
    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (as a controller would); watchers see ADDED or MODIFIED."""
        kind, meta = obj["kind"], obj["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        with self.lock:
            stored = self._store(key, copy.deepcopy(obj), "MODIFIED" if key in self.objects else "ADDED")
        return copy.deepcopy(stored)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self.lock:
            obj = self.objects.pop((kind, namespace, name))
            self.revision += 1
            obj["metadata"]["resourceVersion"] = str(self.revision)
            self._record(Event(self.revision, kind, "DELETED", obj))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[(kind, namespace, name)])

    def compact(self) -> None:
        """Forget the history (as etcd compaction does): every watch running or resumed from before now gets
        410 Expired, so a client must list again."""
        with self.lock:
            self._compact()

    def put_unseen(self, obj: dict[str, Any]) -> None:
        """A change that no watch delivers (made while the client was away, then compacted): only a new list
        shows it."""
        kind, meta = obj["kind"], obj["metadata"]
        key = (kind, meta["namespace"], meta["name"])
        with self.lock:
            self._store(key, copy.deepcopy(obj), "MODIFIED")
            self._compact()

    def _compact(self) -> None:
        self.revision += 1
        self.compacted = self.revision
        self.history.clear()
        self.expiry += 1
        self.lock.notify_all()

    def count(self, method: str, path_prefix: str, query: str = "") -> int:
        """Requests seen of `method` on a path under `path_prefix` whose decoded query contains `query`."""
        with self.lock:
            return sum(1 for m, p, _ in self.requests
                       if m == method and p.startswith(path_prefix) and query in unquote_plus(p))

    # --- the store ----------------------------------------------------------------------------------------
    def _store(self, key: tuple[str, str, str], obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        self.revision += 1
        obj.setdefault("apiVersion", API_VERSIONS[key[0]])
        obj["metadata"]["resourceVersion"] = str(self.revision)
        obj["metadata"].setdefault("uid", f"uid-{key[2]}")
        self.objects[key] = obj
        self._record(Event(self.revision, key[0], event_type, copy.deepcopy(obj)))
        return obj

    def _record(self, event: Event) -> None:
        self.history.append(event)
        self.lock.notify_all()

    # --- the API --------------------------------------------------------------------------------------------
    def _route(self, path: str) -> tuple[str, str, str | None, str | None]:
        for pattern, kind, sub in ROUTES:
            if match := pattern.match(path):
                return kind, match["ns"], match.groupdict().get("name"), sub
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def authorize(self, method: str, kind: str, ns: str, name: str | None, sub: str | None, watch: bool) -> None:
        """RBAC: some rule of the Role must name the group, the resource (`deployments/scale` for the
        subresource), the verb, and the object's name when the rule lists names (never for list and watch)."""
        if self.role is None:
            return
        group, resource = RESOURCES[kind]
        resource = f"{resource}/{sub}" if sub else resource
        verb = ("watch" if watch else "list") if name is None and method == "GET" else VERBS.get(method, method.lower())
        for rule in self.role.get("rules", []):
            names = rule.get("resourceNames")
            if (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
                    and verb in rule.get("verbs", []) and (not names or (name is not None and name in names))):
                return
        plural = resource.split("/")[0] + (f".{group}" if group else "")
        named = f'"{name}" ' if name else ""
        raise ApiError(403, "Forbidden", f'{plural} {named}is forbidden: User "system:serviceaccount:{ns}:gateway" '
                       f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{ns}"')

    def _stored(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            plural = {"Pod": "pods", "Deployment": "deployments.apps", "EndpointSlice": "endpointslices"}[kind]
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
        return obj

    def list(self, ns: str, query: dict[str, str]) -> dict[str, Any]:
        terms = parse_selector(query.get("labelSelector", ""))
        with self.lock:
            items = [copy.deepcopy(o) for (k, n, _), o in sorted(self.objects.items())
                     if k == "EndpointSlice" and n == ns and selected(o, terms)]
            revision = self.revision
        for item in items:
            item.pop("apiVersion", None)
            item.pop("kind", None)
        return {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                "metadata": {"resourceVersion": str(revision)}, "items": items}

    def read(self, kind: str, ns: str, name: str, sub: str | None) -> dict[str, Any]:
        with self.lock:
            obj = copy.deepcopy(self._stored(kind, ns, name))
        return scale_of(obj) if sub == "scale" else obj

    def patch(self, kind: str, ns: str, name: str, sub: str | None, content_type: str, body: Any) -> dict[str, Any]:
        if content_type not in (*MERGE_PATCHES, JSON_PATCH):
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: {', '.join((JSON_PATCH, *MERGE_PATCHES))}")
        if content_type == JSON_PATCH and not isinstance(body, list):
            raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        if content_type != JSON_PATCH and not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the patch is not a JSON object")
        with self.lock:
            obj = self._stored(kind, ns, name)
            # A patch applies to what the path names: the Scale, or the object itself.
            target = scale_of(copy.deepcopy(obj)) if sub == "scale" else obj
            if content_type == JSON_PATCH:
                result = json_patch(target, body)
            else:
                result = merge_patch(target, {k: v for k, v in body.items() if k not in ("kind", "apiVersion")})
            if sub == "scale":
                replicas = (result.get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    raise ApiError(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: spec.replicas: '
                                   f"Invalid value: {replicas!r}: must be greater than or equal to 0")
                patched = merge_patch(obj, {"spec": {"replicas": replicas}})
            else:
                patched = result
            stored = self._store((kind, ns, name), patched, "MODIFIED")
            return scale_of(copy.deepcopy(stored)) if sub == "scale" else copy.deepcopy(stored)

    def watch(self, ns: str, query: dict[str, str], send: Any) -> None:
        """Stream the events after `resourceVersion` until `timeoutSeconds`; 410 when it is too old."""
        terms = parse_selector(query.get("labelSelector", ""))
        timeout = min(float(query.get("timeoutSeconds", MAX_WATCH_S)), MAX_WATCH_S)
        deadline = time.monotonic() + timeout
        with self.lock:
            expiry = self.expiry
            start = query.get("resourceVersion", "")
            if start in ("", "0"):  # "any": the current state as ADDED events, then changes
                cursor = self.revision
                backlog = [Event(cursor, k, "ADDED", copy.deepcopy(o)) for (k, n, _), o in sorted(self.objects.items())
                           if k == "EndpointSlice" and n == ns]
            else:
                cursor = int(start)
                if cursor < self.compacted:
                    send(expired(cursor, self.compacted))
                    return
                backlog = []
        for event in backlog:
            if selected(event.obj, terms):
                send({"type": event.type, "object": event.obj})
        while True:
            seen = cursor
            with self.lock:
                self.lock.wait_for(lambda: self.closing or self.expiry != expiry or time.monotonic() >= deadline
                                   or any(e.resource_version > seen for e in self.history),  # noqa: B023 - used now
                                   timeout=max(0.0, deadline - time.monotonic()))
                if self.closing:
                    return
                if self.expiry != expiry:
                    send(expired(cursor, self.compacted))
                    return
                events = [e for e in self.history if e.resource_version > cursor]
                if not events and time.monotonic() >= deadline:
                    if query.get("allowWatchBookmarks") == "true":
                        send({"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
                                                             "apiVersion": "discovery.k8s.io/v1",
                                                             "metadata": {"resourceVersion": str(self.revision)},
                                                             "addressType": "IPv4", "endpoints": []}})
                    return
            for event in events:
                cursor = event.resource_version
                if event.kind == "EndpointSlice" and event.obj["metadata"]["namespace"] == ns \
                        and selected(event.obj, terms):
                    send({"type": event.type, "object": event.obj})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("GET")

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve("PATCH")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def _serve(self, method: str) -> None:
                split = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(split.query).items()}
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                body_bytes = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with api.lock:
                    api.requests.append((method, self.path, content_type))
                try:
                    if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                        raise ApiError(401, "Unauthorized", "Unauthorized")
                    kind, ns, name, sub = api._route(split.path)
                    watch = query.get("watch") in ("true", "1")
                    api.authorize(method, kind, ns, name, sub, watch)
                    if name is None and method == "GET" and watch:
                        self._stream(lambda send: api.watch(ns, query, send))
                        return
                    if name is None and method == "GET":
                        self._json(200, api.list(ns, query))
                    elif name is not None and method == "GET":
                        self._json(200, api.read(kind, ns, name, sub))
                    elif name is not None and method == "PATCH":
                        try:
                            body = json.loads(body_bytes or b"null")
                        except ValueError:
                            raise ApiError(400, "BadRequest", "the patch is not valid JSON") from None
                        with api.lock:
                            api.patches.append((split.path, content_type, body))
                        self._json(200, api.patch(kind, ns, name, sub, content_type, body))
                    else:
                        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method ({method}) "
                                       "on the requested resource")
                except ApiError as exc:
                    self._json(exc.code, exc.status())

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code, HTTPStatus(code).phrase)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, produce: Any) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def send(event: dict[str, Any]) -> None:
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()

                try:
                    produce(send)
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler


def expired(cursor: int, compacted: int) -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                        "message": f"too old resource version: {cursor} ({compacted})",
                                        "reason": "Expired", "code": 410}}


def scale_of(deployment: dict[str, Any]) -> dict[str, Any]:
    """The autoscaling/v1 Scale of a Deployment, as the scale subresource returns it."""
    meta = deployment["metadata"]
    replicas = deployment["spec"].get("replicas", 1)
    selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "resourceVersion": meta["resourceVersion"], "uid": meta["uid"]},
            "spec": {"replicas": replicas}, "status": {"replicas": replicas, "selector": selector}}
