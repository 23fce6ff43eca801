"""KServe v2 / Triton HTTP routes of the gateway.

An inference request is screened right after its headers (`screen`: admission, then the overload manager),
then walks its path as one `Exchange` (controlplane/gateway/exchange.py): check -> queue -> forward -> relay
-> release. The other routes are answered here: health, server metadata, model metadata and configuration
(passed through from a shard), /metrics, and the admin endpoints.

Overload contract: 429 + Retry-After when shed (rate, queue full, displaced, deadline, gateway overload);
503 + Retry-After when no shard can serve the model; 504 when the deadline passes in flight; 4xx JSON for bad
input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from controlplane import __version__
from controlplane.gateway.admission import Admission, Admitted, Refused, over_rate, retry_after_s
from controlplane.gateway.errors import ANSWERED, RETRY_AFTER_NO_SHARD, HttpError, refusal_headers, send_error
from controlplane.gateway.exchange import Exchange
from controlplane.gateway.inference import BadRequest, InferHeader, ModelSignature, check_infer_request, decompress
from controlplane.gateway.ladder import DegradationLadder
from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gateway.overload import OverloadManager
from controlplane.gateway.pipeline_stream import PipelineRun, PipelineSequences
from controlplane.gateway.routing import Router, Target
from controlplane.gateway.scheduler import Scheduler
from controlplane.gateway.server import Cancellable, ClientConnection, GatewayServer, Handler, Rejection, Request
from controlplane.gateway.upstream import Outbox, UpstreamError, fetch, request_bytes
from controlplane.shards.base import probe_ready
from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

MODEL_ROUTE = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<action>infer|ready|config|generate|generate_stream|stats))?$"
)
INFERENCE_ACTIONS = (b"/infer", b"/generate", b"/generate_stream")
ADMIN_SHARD_ROUTE = re.compile(r"^/admin/shards/(?P<shard>[^/]+)/(?P<action>drain|undrain)$")
PASSED_THROUGH_HEADERS = (b"accept",)  # what a metadata request may carry to the shard
ROUTES_KEPT = 1024  # model paths (clients ask for the same few)
REJECTIONS_KEPT = 256  # prebuilt refusals (kind, class or tenant, Retry-After)
TICK_S = 0.1  # background upkeep: probes of ejected shards, the ladder
EXTENSIONS = ["classification", "model_configuration", "binary_tensor_data", "parameters", "statistics",
              "generate"]


class GatewayApp:
    """The request handler: routes, the screen after the headers, and what the exchanges share."""

    def __init__(self, spec: ClusterSpec, router: Router, clock: Callable[[], float] = time.monotonic,
                 set_standby: Callable[[bool], None] | None = None) -> None:
        self.spec = spec
        self.router = router
        self.clock = clock
        self.models = {m.name for m in spec.models}
        self.pipeline_sequences = PipelineSequences(spec.pipelines)  # models whose token loop the gateway drives
        self.limits = spec.gateway.limits
        self.admission = Admission(spec, clock)
        self.scheduler: Scheduler[Target] = Scheduler(spec.priority_classes, self.limits, router, clock)
        router.on_capacity = self.scheduler.pump
        # what a turn of the event loop writes, written together at its end (upstream.Outbox)
        concurrency = spec.gateway.concurrency
        self.outbox = Outbox(router.end_turn) if concurrency.coalesce_writes else None
        router.turn_affinity = concurrency.coalesce_writes and concurrency.turn_affinity
        self.metrics = GatewayMetrics()
        self.ladder = DegradationLadder(spec, clock, set_standby)
        self.overload: OverloadManager | None = None  # set by `serve_on`
        ranked = sorted(spec.priority_classes, key=lambda c: c.level, reverse=True)
        self.triton_priority = {c.name: rank for rank, c in enumerate(ranked, start=1)}  # Triton: 1 is highest
        self.lowest_class = ranked[-1].name
        self.top_class = ranked[0].name
        self.variants = {m.name: m.cheaper_variant for m in spec.models if m.cheaper_variant}
        self.smaller_batches = {m.name: m.smaller_batch_variant for m in spec.models if m.smaller_batch_variant}
        self.signatures: dict[str, ModelSignature] = {}
        # Who answers the paths that are not /v2/models/ ones, when not `server_route` (a worker process: the views
        # that speak for every worker); the model routes never leave this compiled handler.
        self.other_routes: Handler | None = None
        self._model_routes: dict[str, tuple[str, str | None]] = {}  # path -> (model, action), see `model_route`
        self._rejections: dict[tuple, Rejection] = {}  # refusals after the headers, by kind (see `rejection`)
        self._signature_lookups: dict[str, asyncio.Future[ModelSignature]] = {}
        self._upkeep: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    def routed_model(self, model: str, band: str) -> str:
        """The model that serves a request of class `band` for `model`: for the lowest class, its cheaper variant
        from ladder step 2 and then that one's smaller-batch variant from step 3; else `model` itself."""
        if band != self.lowest_class or not self.ladder.use_variants:
            return model
        model = self.variants.get(model, model)
        return self.smaller_batches.get(model, model) if self.ladder.use_smaller_batches else model

    def serve_on(self, server: GatewayServer) -> None:
        """Screen the server's requests after their headers and protect it from overload."""
        server.screen = self
        server.outbox = self.outbox
        self.overload = OverloadManager(self.spec.gateway.overload, self.spec.priority_classes, server)

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_loop(), name="gateway-upkeep")
        if self.overload is not None:
            self.overload.start()

    async def stop(self) -> None:
        if self.overload is not None:
            self.overload.stop()
        for task in [self._upkeep, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _upkeep_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for target in self.router.due_for_probe():
                self._spawn(self._probe(target))
            self.ladder.tick({b.name: b.count for b in self.scheduler.bands})
            self.router.validate_limits()
            self.scheduler.pump()

    async def _probe(self, target: Target) -> None:
        healthy = await probe_ready(target.pool.host, target.pool.port)
        log.info("shard %s probed after ejection: %s", target.name, "healthy" if healthy else "still failing")
        self.router.probed(target, healthy)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- right after the headers ---------------------------------------------------------------------------
    def screen(self, conn: ClientConnection, method: bytes, url: bytes, headers: dict[bytes, bytes]
               ) -> Rejection | Admitted | None:
        """Admit an inference request (identity, class, bucket, deadline) before its body is read; refuse it
        there when admission or the overload manager says so. A refusal is as cheap as it can be: the class comes
        from admission's cache, and the answer is a kept `Rejection` (its bytes made once: `_keep_rejection`)."""
        if method != b"POST" or not url.endswith(INFERENCE_ACTIONS):
            return None
        try:
            admitted = self.admission.classify(headers)
        except Refused as refused:
            return Rejection(refused.status, str(refused), refusal_headers(refused), refused.reason, close=False)
        priority_class = admitted.priority_class
        if priority_class.level > conn.top_level:
            conn.top_level = priority_class.level
        overload = self.overload
        if overload is not None and overload.refuses(conn, priority_class):
            self.count_shed(priority_class.name, admitted.tenant.name, "overload")
            overload.refused(conn, priority_class)
            close = overload.withdraws_keep_alive()
            kind = ("overload", priority_class.name, close)
            rejection = self._rejections.get(kind)
            if rejection is None:
                rejection = self._keep_rejection(kind, Rejection(
                    429, f"the gateway is overloaded: class '{priority_class.name}' is refused for now",
                    [(b"retry-after", b"1")], "overload", close=close))
            return rejection
        wait = self.admission.take_token(admitted)
        if wait > 0.0:
            self.count_shed("-", "-", "rate")
            key = ("rate", admitted.tenant.name, retry_after_s(wait))
            rejection = self._rejections.get(key)
            if rejection is None:
                over = over_rate(admitted.tenant, wait)
                rejection = self._keep_rejection(key, Rejection(429, str(over), refusal_headers(over), "rate",
                                                                close=False))
            return rejection
        if overload is not None and overload.level:
            overload.admitted(conn, priority_class)
        return admitted

    def _keep_rejection(self, key: tuple, rejection: Rejection) -> Rejection:
        """Keep a refusal to answer again: the server answers a Rejection with the bytes it built the first time."""
        if len(self._rejections) >= REJECTIONS_KEPT:
            self._rejections.clear()
        self._rejections[key] = rejection
        return rejection

    def class_level(self, method: bytes, url: bytes, headers: dict[bytes, bytes]) -> int | None:
        """The class level of a request not read yet, for the overload manager (None: not an inference request,
        or one that admission refuses anyway)."""
        if method != b"POST" or not url.endswith(INFERENCE_ACTIONS):
            return None
        try:
            return self.admission.classify(headers).priority_class.level
        except Refused:
            return None

    def count_shed(self, class_name: str, tenant: str, reason: str) -> None:
        self.metrics.shed[class_name, tenant, reason] += 1
        self.metrics.requests[class_name, tenant, "shed"] += 1

    # --- routes ------------------------------------------------------------------------------------------
    def __call__(self, request: Request, conn: ClientConnection) -> Cancellable | None:
        path = request.path
        route = self._model_routes.get(path) or self.model_route(path)
        try:
            if route is None:
                if self.other_routes is not None:
                    return self.other_routes(request, conn)
                self.server_route(request, conn)
                return None
            model, action = route
            pipeline = self.pipeline_sequences.pipelines.get(model)
            if pipeline is not None:
                if action not in ("generate", "generate_stream") or request.method != b"POST":
                    raise HttpError(405, f"'{model}' is a pipeline: POST /generate or /generate_stream")
                admitted = request.admitted or self.admission.admit(request.headers)
                return self._spawn(PipelineRun(self, request, conn, pipeline, admitted,
                                               streaming=action == "generate_stream").run())
            if model not in self.models:
                raise HttpError(404, f"unknown model '{model}' (served: {', '.join(sorted(self.models))})")
            if action in ("infer", "generate", "generate_stream"):
                if request.method != b"POST":
                    raise HttpError(405, f"{action} takes POST")
                admitted = request.admitted or self.admission.admit(request.headers)  # unscreened: admit now
                return Exchange(self, request, conn, model, action, admitted).start()
            return self._spawn(self.model_metadata(request, conn, model, action))
        except ANSWERED as error:
            if isinstance(error, Refused) and error.status == 429:
                self.count_shed("-", "-", error.reason)
            send_error(conn, error)
            return None

    def model_route(self, path: str) -> tuple[str, str | None] | None:
        """(model, action) of a /v2/models/ path, else None. Kept for the next request to the same path."""
        match = MODEL_ROUTE.match(path)
        if match is None:
            return None
        if len(self._model_routes) >= ROUTES_KEPT:
            self._model_routes.clear()
        route = self._model_routes[path] = (match["model"], match["action"])
        return route

    def server_route(self, request: Request, conn: ClientConnection) -> None:
        path = request.path
        if path == "/v2/health/live":
            conn.send_json(200, b"{}")
        elif path == "/v2/health/ready":
            not_ready = sorted(m for m in self.models if not self.router.has_ready(m))
            if not_ready:
                raise HttpError(503, f"no ready shard for: {', '.join(not_ready)}", RETRY_AFTER_NO_SHARD)
            conn.send_json(200, b"{}")
        elif path in ("/v2", "/v2/"):
            conn.send_json(200, orjson.dumps({"name": "controlplane-gateway", "version": __version__,
                                              "extensions": EXTENSIONS}))
        elif path == "/metrics":
            body = self.metrics.render(self.scheduler.snapshot(), self.router.snapshot(), self.ladder.step,
                                       self.overload.snapshot() if self.overload else None)
            conn.send(200, body, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")])
        elif path.startswith("/admin/"):
            self.admin(request, conn)
        else:
            raise HttpError(404, f"no route for {path}")

    def admin(self, request: Request, conn: ClientConnection) -> None:
        self.admission.admin_ok(request.headers, self.spec.gateway.admin_token_sha256)
        if request.path == "/admin/queues" and request.method == b"GET":
            conn.send_json(200, orjson.dumps({"classes": self.scheduler.snapshot(), "shards": self.router.snapshot(),
                                              "ladder": self.ladder.snapshot(),
                                              "overload": self.overload.snapshot() if self.overload else None,
                                              "service_rate": round(self.scheduler.service_rate(), 1)}))
            return
        match = ADMIN_SHARD_ROUTE.match(request.path)
        if match is None or request.method != b"POST":
            raise HttpError(404, f"no admin route {request.method.decode()} {request.path} (GET /admin/queues, "
                                 "POST /admin/shards/NAME/drain or /undrain)")
        target = self.router.target_named(match["shard"])
        if target is None:
            raise HttpError(404, f"no ready shard named '{match['shard']}'")
        target.draining = match["action"] == "drain"
        if not target.draining:
            self.scheduler.pump()
        conn.send_json(200, orjson.dumps({"shard": target.name, "draining": target.draining,
                                          "in_flight": target.outstanding}))

    async def model_metadata(self, request: Request, conn: ClientConnection, model: str, action: str | None
                             ) -> None:
        """Model metadata, readiness and configuration, asked of a shard (they bypass the queue)."""
        try:
            self.admission.identify(request.headers)
            if action == "stats":
                raise HttpError(501, "per-model statistics are per shard: read each shard's metrics")
            if request.method not in (b"GET", b"HEAD"):
                raise HttpError(405, f"{request.path} takes GET")
            target = self.router.any_target(model)
            if target is None:
                raise HttpError(503, f"no ready shard serves model '{model}'", RETRY_AFTER_NO_SHARD)
            lines = [b"%s: %s\r\n" % (n, request.headers[n]) for n in PASSED_THROUGH_HEADERS if n in request.headers]
            try:
                answer = await fetch(target.pool, request_bytes(request.method, request.path, lines, b""),
                                     self.limits.upstream_timeout_s)
            except UpstreamError as exc:
                raise HttpError(504 if exc.timed_out else 502, f"shard {target.name} failed: {exc}") from None
            conn.send(answer.status, b"".join(answer.parts), answer.headers)
        except ANSWERED as error:
            send_error(conn, error)
        except Exception:
            log.exception("model metadata route failed")
            conn.fail()

    # --- checks and model facts -----------------------------------------------------------------------------
    def check_infer(self, request: Request, signature: ModelSignature) -> InferHeader:
        header_length = request.headers.get(b"inference-header-content-length")
        if header_length is not None:
            if not header_length.isdigit():
                raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
            header_length = int(header_length)
        if request.streamed is not None:  # its binary data is still arriving (never compressed: server.py)
            return check_infer_request(request.body, header_length, signature, request.streamed.length)
        body = request.body
        encoding = request.headers.get(b"content-encoding")
        if encoding is not None and encoding != b"identity":
            body = decompress(body, encoding.decode("latin-1").strip().lower(), self.limits.max_body_bytes)
        return check_infer_request(body, header_length, signature)

    async def signature(self, model: str) -> ModelSignature:
        """The model's inputs, outputs and queue settings, asked of a shard once and then cached."""
        known = self.signatures.get(model)
        if known is not None:
            return known
        lookup = self._signature_lookups.get(model)
        if lookup is None:
            lookup = asyncio.ensure_future(self._fetch_signature(model))
            self._signature_lookups[model] = lookup
            lookup.add_done_callback(lambda _: self._signature_lookups.pop(model, None))
        return await asyncio.shield(lookup)

    async def _fetch_signature(self, model: str) -> ModelSignature:
        """Ask the shards of the model in turn (least loaded first) until one describes it."""
        candidates = sorted((t for t in self.router.by_model.get(model, ()) if t.available),
                            key=lambda t: t.outstanding / t.limit)
        if not candidates:
            raise HttpError(503, f"no ready shard serves model '{model}'", RETRY_AFTER_NO_SHARD)
        failures = []
        for target in candidates:
            try:
                documents = [await self._get_json(target, f"/v2/models/{model}"),
                             await self._get_json(target, f"/v2/models/{model}/config")]
            except (UpstreamError, ValueError) as exc:
                failures.append(f"{target.name}: {exc}")
                continue
            signature = ModelSignature.from_triton(*documents)
            self.signatures[model] = signature
            return signature
        raise HttpError(502, f"no shard could describe model '{model}' ({'; '.join(failures)})")

    async def _get_json(self, target: Target, path: str) -> dict:
        answer = await fetch(target.pool, request_bytes(b"GET", path, [], b""), self.limits.upstream_timeout_s)
        if answer.status != 200:
            raise ValueError(f"status {answer.status} for {path}")
        return orjson.loads(b"".join(answer.parts))
