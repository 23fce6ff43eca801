"""KServe v2 / Triton HTTP routes of the gateway, and the one straight path of an inference request.

client -> route -> admission (API key -> tenant, class, token bucket, deadline) -> check (only the JSON
inference header is parsed) -> scheduler (class queues; shed at once when the deadline cannot be met) ->
a free slot on the least loaded shard -> Triton `priority` and `timeout` set from the class and the remaining
deadline -> body forwarded as bytes on a pooled keep-alive connection -> response relayed, chunk by chunk when
the shard streams -> latency fed to the shard's limiter and the scheduler's rate.

Overload contract: 429 + Retry-After when shed (rate, queue full, displaced, deadline); 503 + Retry-After when
no shard can serve the model; 504 when the deadline passes in flight; 4xx JSON for bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable

import orjson

from controlplane import __version__
from controlplane.gateway.admission import Admission, Admitted, Refused
from controlplane.gateway.inference import (
    BadRequest,
    InferHeader,
    ModelSignature,
    check_generate_request,
    check_infer_request,
    decompress,
)
from controlplane.gateway.ladder import DegradationLadder
from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gateway.routing import Router, Target
from controlplane.gateway.scheduler import Scheduler, Shed, Ticket, retry_after_header
from controlplane.gateway.server import ClientConnection, Request, json_error
from controlplane.gateway.upstream import UpstreamConnection, UpstreamError, exchange
from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

MODEL_ROUTE = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<action>infer|ready|config|generate|generate_stream|stats))?$"
)
ADMIN_SHARD_ROUTE = re.compile(r"^/admin/shards/(?P<shard>[^/]+)/(?P<action>drain|undrain)$")
# Client request headers that mean something to Triton; all others stay at the gateway.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"content-encoding", b"accept-encoding", b"accept")
SEPARATE_BODY_BYTES = 64 * 1024  # larger bodies are written as they are, not copied behind the headers
RETRY_AFTER_NO_SHARD = [(b"retry-after", b"1")]
TICK_S = 0.1  # background upkeep: probes of ejected shards, the ladder
STALL_FACTOR = 2.0  # no answer after this many of the class's stall times (and STALL_MIN_S): stalled
STALL_MIN_S = 0.1
EXTENSIONS = ["classification", "model_configuration", "binary_tensor_data", "parameters", "statistics",
              "generate"]


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


class Relay:
    """Passes one shard response to the client: whole when it has a length, chunk by chunk when streamed."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.parts: list[bytes] = []
        self.started = False  # bytes reached the client: no retry, no error response any more

    def attach(self, upstream: UpstreamConnection) -> None:
        # A slow client pauses the shard's side of a streamed response instead of buffering it here.
        self.conn.write_listener = lambda writable: upstream.resume_reading() if writable else upstream.pause_reading()

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None:
        self.status, self.headers, self.chunked = status, headers, chunked
        if chunked:
            self.started = True
            self.conn.start_stream(status, headers)

    def on_body(self, data: bytes) -> None:
        if self.chunked:
            self.conn.send_chunk(data)
        else:
            self.parts.append(data)

    def on_end(self) -> None:
        if self.chunked:
            self.conn.end_stream()
        else:
            self.started = True
            self.conn.send(self.status, b"".join(self.parts), self.headers)


class CollectingSink:
    """Keeps a whole shard response in memory (for the gateway's own metadata lookups)."""

    def __init__(self) -> None:
        self.status = 0
        self.parts: list[bytes] = []

    def attach(self, upstream: UpstreamConnection) -> None:
        pass

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    def on_end(self) -> None:
        pass


class GatewayApp:
    """The request handler: routes, admission, scheduling and forwarding."""

    def __init__(self, spec: ClusterSpec, router: Router, clock: Callable[[], float] = time.monotonic,
                 set_standby: Callable[[bool], None] | None = None) -> None:
        self.spec = spec
        self.router = router
        self.clock = clock
        self.models = {m.name for m in spec.models}
        self.limits = spec.gateway.limits
        self.admission = Admission(spec, clock)
        self.scheduler = Scheduler(spec.priority_classes, self.limits, router, clock)
        router.on_capacity = self.scheduler.pump
        self.metrics = GatewayMetrics()
        self.ladder = DegradationLadder(spec, clock, set_standby)
        ranked = sorted(spec.priority_classes, key=lambda c: c.level, reverse=True)
        self.triton_priority = {c.name: rank for rank, c in enumerate(ranked, start=1)}  # Triton: 1 is highest
        self.lowest_class = ranked[-1].name
        self.variants = {m.name: m.cheaper_variant for m in spec.models if m.cheaper_variant}
        self.signatures: dict[str, ModelSignature] = {}
        self._signature_lookups: dict[str, asyncio.Future[ModelSignature]] = {}
        self._upkeep: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_loop(), name="gateway-upkeep")

    async def stop(self) -> None:
        if self._upkeep is not None:
            self._upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._upkeep

    async def _upkeep_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for target in self.router.due_for_probe():
                asyncio.get_running_loop().create_task(self._probe(target))
            self.ladder.tick({b.name: b.count for b in self.scheduler.bands})
            self.scheduler.pump()

    async def _probe(self, target: Target) -> None:
        sink = CollectingSink()
        request = [b"GET /v2/health/ready HTTP/1.1\r\nhost: shard\r\ncontent-length: 0\r\n\r\n"]
        try:
            await exchange(target.pool, request, sink, 1.0)
            healthy = sink.status == 200
        except UpstreamError:
            healthy = False
        log.info("shard %s probed after ejection: %s", target.name, "healthy" if healthy else "still failing")
        self.router.probed(target, healthy)

    # --- routes ------------------------------------------------------------------------------------------
    async def __call__(self, request: Request, conn: ClientConnection) -> None:
        try:
            await self.route(request, conn)
        except HttpError as exc:
            conn.send_json(exc.status, json_error(str(exc)), exc.headers)
        except BadRequest as exc:
            conn.send_json(400, json_error(str(exc)))
        except Refused as exc:
            headers = [(b"retry-after", retry_after_header(exc.retry_after_s))] if exc.retry_after_s is not None \
                else []
            conn.send_json(exc.status, json_error(str(exc), exc.reason), headers)

    async def route(self, request: Request, conn: ClientConnection) -> None:
        path = request.path
        match = MODEL_ROUTE.match(path)
        if match is not None:
            await self.model_route(request, conn, match["model"], match["action"])
        elif path == "/v2/health/live":
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
            body = self.metrics.render(self.scheduler.snapshot(), self.router.snapshot(), self.ladder.step)
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

    async def model_route(self, request: Request, conn: ClientConnection, model: str, action: str | None) -> None:
        if model not in self.models:
            raise HttpError(404, f"unknown model '{model}' (served: {', '.join(sorted(self.models))})")
        if action in ("infer", "generate", "generate_stream"):
            if request.method != b"POST":
                raise HttpError(405, f"{action} takes POST")
            await self.inference(request, conn, model, action)
            return
        self.admission.identify(request.headers)
        if action == "stats":
            raise HttpError(501, "per-model statistics are per shard: read each shard's metrics")
        if request.method not in (b"GET", b"HEAD"):
            raise HttpError(405, f"{request.path} takes GET")
        target = self.router.any_target(model)
        if target is None:
            raise HttpError(503, f"no ready shard serves model '{model}'", RETRY_AFTER_NO_SHARD)
        relay = Relay(conn)
        try:
            await exchange(target.pool, self.upstream_request(request.method, request.path, request.headers, b""),
                           relay, self.limits.upstream_timeout_s)
        except UpstreamError as exc:
            if relay.started:
                conn.abort()
                return
            raise HttpError(504 if exc.timed_out else 502, f"shard {target.name} failed: {exc}") from None

    # --- the inference path --------------------------------------------------------------------------------
    async def inference(self, request: Request, conn: ClientConnection, model: str, action: str) -> None:
        arrived = self.clock()
        admitted = self._admit(request)
        signature = await self.signature(model)
        checked = None
        if action == "infer":
            checked = self.check_infer(request, signature)
        else:
            check_generate_request(request.body, signature)
        class_name, tenant = admitted.priority_class.name, admitted.tenant.name
        if class_name == self.lowest_class and self.ladder.use_variants and model in self.variants:
            model = self.variants[model]
        ticket = Ticket(model=model, tenant=tenant, band=class_name, cost=checked.cost if checked else 1.0,
                        size=len(request.body), deadline=arrived + admitted.deadline_s)
        self.metrics.requests[class_name, tenant, "admitted"] += 1
        retry_from = None
        for attempt in range(2):
            relay = Relay(conn)
            try:
                target = await self._dispatched(ticket, retry_from)
                if attempt == 0:
                    self.metrics.queue_wait[class_name].observe(self.clock() - arrived)
                outcome = await self._exchange(request, model, action, checked, signature, ticket, target, relay)
            except Shed as shed:
                self._count_shed(class_name, tenant, shed.reason)
                raise Refused(429, str(shed), shed.retry_after_s, shed.reason) from None
            if outcome is None:
                self.metrics.requests[class_name, tenant, "completed" if relay.status < 500 else "failed"] += 1
                self.metrics.latency[class_name].observe(self.clock() - arrived)
                return
            if relay.started:
                conn.abort()
                return
            deadline_left = ticket.deadline - self.clock()
            if outcome.timed_out and (deadline_left <= 0 or attempt == 1 or not outcome.before_response):
                self.metrics.requests[class_name, tenant, "failed"] += 1
                raise HttpError(504, f"the deadline passed in flight: {outcome}")
            if attempt == 0 and outcome.before_response and self.router.take_retry_token():
                self.metrics.retries += 1
                retry_from = target
                continue
            self.metrics.requests[class_name, tenant, "failed"] += 1
            raise HttpError(502, f"shard {target.name} failed: {outcome}")
        raise HttpError(502, "the request failed on two shards")

    def _admit(self, request: Request) -> Admitted:
        try:
            return self.admission.admit(request.headers)
        except Refused as refused:
            if refused.status == 429:
                self._count_shed("-", "-", "rate")
            raise

    def _count_shed(self, class_name: str, tenant: str, reason: str) -> None:
        self.metrics.shed[class_name, tenant, reason] += 1
        self.metrics.requests[class_name, tenant, "shed"] += 1

    async def _dispatched(self, ticket: Ticket, retry_from: Target | None) -> Target:
        """Wait until the scheduler gives the ticket a slot (on another shard than `retry_from` when retrying);
        raise Shed when it refuses or the deadline passes first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Target] = loop.create_future()
        ticket.on_dispatch = lambda target: waiter.done() or waiter.set_result(target)
        ticket.on_shed = lambda shed: waiter.done() or waiter.set_exception(shed)
        if retry_from is None:
            self.scheduler.submit(ticket)
        else:
            self.scheduler.requeue(ticket, exclude=retry_from)
        if waiter.done():
            return waiter.result()
        expiry = loop.call_later(max(0.0, ticket.deadline - self.clock()), self.scheduler.expire, ticket)
        try:
            return await waiter
        except asyncio.CancelledError:  # the client went away
            if ticket.state == "queued":
                self.scheduler.expire(ticket)
            elif ticket.state == "dispatched" and waiter.done() and not waiter.cancelled():
                self.router.unreserve(waiter.result())
            raise
        finally:
            expiry.cancel()

    async def _exchange(self, request: Request, model: str, action: str, checked: InferHeader | None,
                        signature: ModelSignature, ticket: Ticket, target: Target, relay: Relay
                        ) -> UpstreamError | None:
        """Forward to `target` and release its slot; the failure if there was one."""
        remaining = ticket.deadline - self.clock()
        if remaining <= 0:  # the scheduler checked at dispatch; the event loop may have been slow since
            self.router.unreserve(target)
            raise Shed("deadline", "the deadline passed before the request could be sent", 0.0)
        body, headers = request.body, request.headers
        if checked is not None and b"content-encoding" not in headers:
            body, headers = self._with_triton_parameters(body, headers, checked, signature, ticket.band, remaining)
        # the client's path, unless the ladder sent the request to the model's cheaper variant
        path = request.path if request.path.startswith(f"/v2/models/{model}/") else f"/v2/models/{model}/{action}"
        started = self.clock()
        # A shard that has not answered after several typical service times is treated as stalled (frozen,
        # wedged), so the request can still be retried elsewhere before its deadline; streams are exempt.
        stall_s = max(STALL_MIN_S, STALL_FACTOR * self.scheduler.band[ticket.band].service.stall_s())
        timeout = min(remaining, self.limits.upstream_timeout_s,
                      stall_s if action == "infer" and ticket.exclude is None else remaining)
        try:
            await exchange(target.pool, self.upstream_request(b"POST", path, headers, body), relay, timeout)
        except UpstreamError as exc:
            self.router.release(target, self.clock() - started, ok=False)
            return exc
        except asyncio.CancelledError:
            self.router.release(target, self.clock() - started, ok=False)
            raise
        service_time = self.clock() - started
        # 5xx from Triton (its queue full, a timeout, a crash in the model) is an overload or failure signal
        self.router.release(target, service_time, ok=relay.status < 500)
        self.scheduler.completed(service_time, ticket.band)
        return None

    def _with_triton_parameters(self, body: bytes, headers: dict[bytes, bytes], checked: InferHeader,
                                signature: ModelSignature, band: str, remaining_s: float
                                ) -> tuple[bytes, dict[bytes, bytes]]:
        """Carry the class and the remaining deadline into Triton's own queue (`priority`, `timeout` in us)."""
        parameters: dict[str, int] = {}
        if signature.priority_levels:
            parameters["priority"] = min(self.triton_priority[band], signature.priority_levels)
        if signature.timeout_override:
            parameters["timeout"] = max(1, int(remaining_s * 1_000_000))
        if not parameters:
            return body, headers
        body, header_length = checked.with_parameters(body, parameters)
        headers = dict(headers)
        if header_length is not None:
            headers[b"inference-header-content-length"] = str(header_length).encode()
        return body, headers

    # --- checks and model facts -----------------------------------------------------------------------------
    def check_infer(self, request: Request, signature: ModelSignature) -> InferHeader:
        header_length = request.headers.get(b"inference-header-content-length")
        if header_length is not None:
            if not header_length.isdigit():
                raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
            header_length = int(header_length)
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
        sink = CollectingSink()
        request = b"GET %s HTTP/1.1\r\nhost: shard\r\ncontent-length: 0\r\n\r\n" % path.encode()
        await exchange(target.pool, [request], sink, self.limits.upstream_timeout_s)
        if sink.status != 200:
            raise ValueError(f"status {sink.status} for {path}")
        return orjson.loads(b"".join(sink.parts))

    @staticmethod
    def upstream_request(method: bytes, path: str, headers: dict[bytes, bytes], body: bytes) -> list[bytes]:
        lines = [b"%s %s HTTP/1.1\r\nhost: shard\r\ncontent-length: %d\r\n" % (method, path.encode(), len(body))]
        for name in FORWARDED_REQUEST_HEADERS:
            value = headers.get(name)
            if value is not None:
                lines.append(b"%s: %s\r\n" % (name, value))
        header_length = headers.get(b"inference-header-content-length")
        if header_length is not None:
            lines.append(b"inference-header-content-length: %s\r\n" % header_length)
        lines.append(b"\r\n")
        if len(body) < SEPARATE_BODY_BYTES:
            lines.append(body)  # one send() instead of two
            return [b"".join(lines)]
        return [b"".join(lines), body]
