"""The gateway's HTTP/1.1 listener: one asyncio.Protocol per client connection, parsed by httptools.

State is grouped as in uvicorn's httptools protocol: per server (limits, counters), per connection
(transport, parser, the queue of pipelined requests), per request being parsed (url, headers, body).
Requests on a connection are answered strictly in order; reading pauses while a few are queued, and a
streamed response pauses its upstream when the client reads slowly. Every bound is checked while parsing:
oversized headers get 431, oversized bodies 413, garbage 400, each as JSON, before any work is done.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools
import orjson

from controlplane.spec import GatewayLimits

log = logging.getLogger(__name__)

MAX_PIPELINED = 8  # requests queued on one connection before reading pauses
LINGER_S = 2.0  # how long a refused connection drains the client's input before closing

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    keep_alive: bool


@dataclass
class Rejection:
    """A request refused while parsing; answered in its turn, then the connection closes."""

    status: int
    message: str


Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]


class Counters:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.in_flight = 0
        self.by_status: dict[int, int] = {}

    def count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


def json_error(message: str, reason: str | None = None) -> bytes:
    """The JSON body of an error: what went wrong, and for a shed request the machine-readable reason."""
    return orjson.dumps({"error": message, "reason": reason} if reason else {"error": message})


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: GatewayServer) -> None:
        # per server
        self.server = server
        self.handler = server.handler
        self.limits = server.limits
        self.counters = server.counters
        # per connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request | Rejection] = deque()
        self.active: asyncio.Task[None] | None = None
        self.rejected = False  # stop parsing: the connection closes after the queued answers
        self.reading_paused = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self.write_listener: Callable[[bool], None] | None = None  # told when the client stops/resumes reading
        # per response
        self.response_started = False
        self.close_after_response = False
        # per request being parsed
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body_parts: list[bytes] = []
        self.body_bytes = 0

    # --- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.server.connections.add(self)
        self.counters.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.counters.connections > self.limits.max_connections:
            self.rejected = True
            self.pending.append(Rejection(503, "too many connections to the gateway; retry later"))
            self._next()
            return
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.counters.connections -= 1
        self.pending.clear()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.active is not None:
            self.active.cancel()  # the client is gone: stop waiting on its shard

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_connection(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse_connection(400, f"malformed HTTP request: {exc}")

    def pause_writing(self) -> None:
        if self.write_listener is not None:
            self.write_listener(False)

    def resume_writing(self) -> None:
        if self.write_listener is not None:
            self.write_listener(True)

    # --- httptools callbacks ---------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset_request()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes <= self.limits.max_header_bytes:
            self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        # Refuse at once, before reading a body that will not be used.
        if self.header_bytes > self.limits.max_header_bytes:
            self._refuse_connection(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")
            return
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            self._refuse_connection(413, f"body of {int(length)} bytes exceeds the limit of "
                                         f"{self.limits.max_body_bytes} bytes")

    def on_body(self, body: bytes) -> None:
        if self.rejected:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.limits.max_body_bytes:
            self.body_parts = []
            self._refuse_connection(413, f"body exceeds the limit of {self.limits.max_body_bytes} bytes")
        else:
            self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self.rejected:
            return
        url = httptools.parse_url(self.url)
        try:
            path = url.path.decode("ascii")
        except UnicodeDecodeError:
            self._refuse_connection(400, "request path must be ASCII")
            return
        body = self.body_parts[0] if len(self.body_parts) == 1 else b"".join(self.body_parts)
        self.pending.append(Request(self.parser.get_method(), path, self.headers, body,
                                    self.parser.should_keep_alive()))
        if len(self.pending) >= MAX_PIPELINED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._next()

    # --- request queue -----------------------------------------------------------------------------------
    def _refuse_connection(self, status: int, message: str) -> None:
        self.rejected = True
        self.pending.append(Rejection(status, message))
        self._next()

    def _next(self) -> None:
        if self.active is not None or not self.pending or self.transport.is_closing():
            return
        item = self.pending.popleft()
        self.response_started = False
        if isinstance(item, Rejection):
            self.close_after_response = True
            self.send_json(item.status, json_error(item.message))
            self._linger()
            return
        if self.reading_paused and len(self.pending) < MAX_PIPELINED // 2:
            self.reading_paused = False
            self.transport.resume_reading()
        self.close_after_response = not item.keep_alive
        self.counters.requests += 1
        self.counters.in_flight += 1
        self.active = asyncio.get_running_loop().create_task(self.handler(item, self))
        self.active.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.active = None
        self.counters.in_flight -= 1
        self.write_listener = None
        if not task.cancelled() and task.exception() is not None:
            log.error("request handler failed", exc_info=task.exception())
            if not self.response_started:
                self.close_after_response = True
                self.send_json(500, json_error("internal gateway error; the gateway log has the details"))
            else:
                self.transport.close()
            return
        if self.transport.is_closing():
            return
        if not self.pending and not self.rejected:
            self._arm_idle_timer()
        self._next()

    def _arm_idle_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self.idle_timer = loop.call_later(self.limits.idle_timeout_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.active is None and not self.pending:
            self.transport.close()

    # --- writing responses -------------------------------------------------------------------------------
    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        self.response_started = True
        self.counters.count(status)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        lines += [b"%s: %s\r\n" % header for header in headers]
        lines.append(framing)
        if self.close_after_response:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def send(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A whole response in one write. `headers` must include the content type."""
        self.transport.write(self._head(status, headers, b"content-length: %d\r\n" % len(body)) + body)
        self._finish_response()

    def send_json(self, status: int, body: bytes, extra: list[tuple[bytes, bytes]] = ()) -> None:
        self.send(status, body, [(b"content-type", b"application/json"), *extra])

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Begin a chunked response; each `send_chunk` reaches the client as it comes."""
        self.transport.write(self._head(status, headers, b"transfer-encoding: chunked\r\n"))

    def send_chunk(self, data: bytes) -> None:
        if data:
            self.transport.writelines([b"%x\r\n" % len(data), data, b"\r\n"])

    def end_stream(self) -> None:
        self.transport.write(b"0\r\n\r\n")
        self._finish_response()

    def abort(self) -> None:
        """Drop the connection mid-response (the shard failed after the response began)."""
        self.transport.close()

    def _finish_response(self) -> None:
        if self.close_after_response and not self.rejected:
            self.transport.close()

    def _linger(self) -> None:
        """Close after a refusal without losing the answer: closing a socket with unread input sends a TCP
        reset that can overtake the response, so half-close, drain what the client still sends, then close."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


class GatewayServer:
    """Listens and hands each parsed request to `handler`."""

    def __init__(self, handler: Handler, limits: GatewayLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.counters = Counters()
        self.connections: set[ClientConnection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self), host, port, backlog=4096,
            reuse_address=True,
        )
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for connection in list(self.connections):
                connection.transport.close()
            await self.server.wait_closed()
