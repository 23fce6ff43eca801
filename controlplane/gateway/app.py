"""KServe v2 / Triton HTTP routes of the gateway, and the straight path of a request to a shard.

client -> route -> check (only the JSON inference header is parsed) -> pick a ready shard hosting the model
(least outstanding) -> forward the body as bytes on a pooled keep-alive connection -> relay the response,
streamed chunk by chunk when the shard streams. A failure before any response byte is retried once on
another shard. Errors are JSON: unknown model 404, bad request 400, no ready shard 503, shard timeout 504.
"""

from __future__ import annotations

import asyncio
import re

import orjson

from controlplane import __version__
from controlplane.gateway.inference import (
    BadRequest,
    ModelSignature,
    check_generate_request,
    check_infer_request,
    decompress,
)
from controlplane.gateway.routing import Router
from controlplane.gateway.server import ClientConnection, Request, json_error
from controlplane.gateway.upstream import UpstreamConnection, UpstreamError, exchange
from controlplane.spec import ClusterSpec

MODEL_ROUTE = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<action>infer|ready|config|generate|generate_stream|stats))?$"
)
# Client request headers that mean something to Triton; all others stay at the gateway.
FORWARDED_REQUEST_HEADERS = (b"content-type", b"inference-header-content-length", b"content-encoding",
                             b"accept-encoding", b"accept")
SEPARATE_BODY_BYTES = 64 * 1024  # larger bodies are written as they are, not copied behind the headers
RETRY_AFTER_NO_SHARD = [(b"retry-after", b"1")]
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
    """The request handler: routes, checks and forwards."""

    def __init__(self, spec: ClusterSpec, router: Router) -> None:
        self.spec = spec
        self.router = router
        self.models = {m.name for m in spec.models}
        self.limits = spec.gateway.limits
        self.signatures: dict[str, ModelSignature] = {}
        self._signature_lookups: dict[str, asyncio.Future[ModelSignature]] = {}

    async def __call__(self, request: Request, conn: ClientConnection) -> None:
        try:
            await self.route(request, conn)
        except HttpError as exc:
            conn.send_json(exc.status, json_error(str(exc)), exc.headers)
        except BadRequest as exc:
            conn.send_json(400, json_error(str(exc)))

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
        else:
            raise HttpError(404, f"no route for {path}")

    async def model_route(self, request: Request, conn: ClientConnection, model: str, action: str | None) -> None:
        if model not in self.models:
            raise HttpError(404, f"unknown model '{model}' (served: {', '.join(sorted(self.models))})")
        if action == "stats":
            raise HttpError(501, "per-model statistics are per shard: read each shard's metrics")
        if action in ("infer", "generate", "generate_stream"):
            if request.method != b"POST":
                raise HttpError(405, f"{action} takes POST")
            body = request.body
            if action == "infer":
                await self.check_infer(model, request)
            else:
                check_generate_request(body, await self.signature(model))
        else:
            if request.method not in (b"GET", b"HEAD"):
                raise HttpError(405, f"{request.path} takes GET")
            body = b""
        if not self.router.has_ready(model):
            raise HttpError(503, f"no ready shard serves model '{model}'", RETRY_AFTER_NO_SHARD)
        await self.forward(model, self.upstream_request(request, body), conn)

    async def check_infer(self, model: str, request: Request) -> None:
        header_length = request.headers.get(b"inference-header-content-length")
        if header_length is not None:
            if not header_length.isdigit():
                raise BadRequest("Inference-Header-Content-Length must be a non-negative integer")
            header_length = int(header_length)
        body = request.body
        encoding = request.headers.get(b"content-encoding")
        if encoding is not None and encoding != b"identity":
            body = decompress(body, encoding.decode("latin-1").strip().lower(), self.limits.max_body_bytes)
        check_infer_request(body, header_length, await self.signature(model))

    async def signature(self, model: str) -> ModelSignature:
        """The model's inputs and outputs, asked of a shard once and then cached."""
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
        target = self.router.pick(model)
        if target is None:
            raise HttpError(503, f"no ready shard serves model '{model}'", RETRY_AFTER_NO_SHARD)
        sink = CollectingSink()
        request = b"GET /v2/models/%s HTTP/1.1\r\nhost: shard\r\ncontent-length: 0\r\n\r\n" % model.encode()
        try:
            await exchange(target.pool, [request], sink, self.limits.upstream_timeout_s)
        except UpstreamError as exc:
            self.router.mark_failed(target)
            raise HttpError(502, f"shard {target.name} failed to describe model '{model}': {exc}") from None
        if sink.status != 200:
            raise HttpError(503, f"shard {target.name} cannot describe model '{model}' (status {sink.status})",
                            RETRY_AFTER_NO_SHARD)
        signature = ModelSignature.from_metadata(orjson.loads(b"".join(sink.parts)))
        self.signatures[model] = signature
        return signature

    @staticmethod
    def upstream_request(request: Request, body: bytes) -> list[bytes]:
        lines = [b"%s %s HTTP/1.1\r\nhost: shard\r\ncontent-length: %d\r\n" % (request.method, request.path.encode(),
                                                                                len(body))]
        for name in FORWARDED_REQUEST_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"\r\n")
        if len(body) < SEPARATE_BODY_BYTES:
            lines.append(body)  # one send() instead of two
            return [b"".join(lines)]
        return [b"".join(lines), body]

    async def forward(self, model: str, data: list[bytes], conn: ClientConnection) -> None:
        """Send to the least-loaded ready shard; on a failure before any response byte, once to another."""
        failed, failure = None, ""
        for attempt in range(2):
            target = self.router.pick(model, exclude=failed)
            if target is None:
                break
            relay = Relay(conn)
            target.outstanding += 1
            try:
                await exchange(target.pool, data, relay, self.limits.upstream_timeout_s)
                target.served += 1
                return
            except UpstreamError as exc:
                self.router.mark_failed(target)
                if relay.started:
                    conn.abort()
                    return
                if exc.timed_out:
                    raise HttpError(504, f"shard {target.name} did not answer in time: {exc}") from None
                if not exc.before_response or attempt == 1:
                    raise HttpError(502, f"shard {target.name} failed: {exc}") from None
                failed, failure = target, f" ({target.name} failed: {exc})"
            finally:
                target.outstanding -= 1
        raise HttpError(503, f"no ready shard serves model '{model}'{failure}", RETRY_AFTER_NO_SHARD)
