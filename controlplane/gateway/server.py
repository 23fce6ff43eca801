"""The gateway's HTTP/1.1 listener: one asyncio.Protocol per client connection, parsed by httptools.

State is grouped as in uvicorn's httptools protocol: per server (limits, counters), per connection
(transport, parser, the queue of pipelined requests), per request being parsed (url, headers, body).
Requests on a connection are answered strictly in order; reading pauses while a few are queued, and a
streamed response pauses its upstream when the client reads slowly. Every bound is checked while parsing:
oversized headers get 431, oversized bodies 413, garbage 400, each as JSON, before any work is done.

A request is screened right after its headers (`Screen`): admission and the overload manager can refuse it
there, before its body is buffered or parsed. The handler answers through the connection, at once or later
(it returns what to cancel if the client leaves first); no task is created per request.

A large binary inference request (`STREAM_BODY_BYTES` or more, with an inference header) is handed over as soon
as its JSON inference header has arrived, with a `StreamedBody` for the rest: the handler checks, queues and
forwards it while the tensor bytes are still arriving, so a 10 MB body crosses the gateway once, piece by piece,
instead of being received whole, joined and then sent whole (store and forward doubled the transfer time and
blocked the event loop on 10 MB copies: bench/diagnose/large_body.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import httptools
import orjson

from controlplane.gateway import diagnostics
from controlplane.gateway.upstream import Outbox
from controlplane.spec import GatewayLimits

log = logging.getLogger(__name__)

MAX_PIPELINED = 8  # requests queued on one connection before reading pauses
# binary inference bodies this large are forwarded while they arrive
STREAM_BODY_BYTES = diagnostics.STREAM_BODY_BYTES or 1 << 20
LINGER_S = 2.0  # how long a refused connection drains the client's input before closing
SWEEP_S = 1.0  # idle connections are looked for this often
ACCEPT_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
ACCEPT_BATCH = 512  # connections accepted a loop turn at most
ACCEPT_RETRY_S = 1.0  # after accept failed for want of descriptors or memory (asyncio waits as long)

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
JSON_CONTENT = (b"content-type", b"application/json")


class Request:
    """One parsed request. (A plain class: compiled, a dataclass's generated __init__ would run as Python code,
    once per request.)"""

    def __init__(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes, keep_alive: bool,
                 admitted: Any = None, streamed: StreamedBody | None = None) -> None:
        self.method = method
        self.path = path
        self.headers = headers  # names lower-cased; a repeated header keeps its last value
        self.body = body  # the whole body; with `streamed`, only its JSON inference header
        self.keep_alive = keep_alive
        self.admitted = admitted  # what the screen said after the headers (Any: compiled, `object` is refused)
        self.streamed = streamed  # the rest of the body, still arriving


class StreamedBody:
    """The binary part of a large inference body (after its JSON inference header), forwarded while it arrives.

    Pieces are kept as they come (references, no copy) until the request is answered, so that a retry on another
    shard can send them again, as the whole body would be kept otherwise; they are bounded by the body limit.
    The request's forwarder `attach`es a writer: it gets the pieces so far and then each new one as it arrives,
    and `on_finish` once the last one is in. `drop` (the request was answered) stops keeping them.
    """

    def __init__(self, header_length: int, length: int) -> None:
        self.header_length = header_length
        self.length = length - header_length  # bytes of binary data the Content-Length promises
        self.head_parts: list[bytes] = []  # the JSON inference header, while it arrives
        self.head_bytes = 0
        self.pieces: list[bytes] = []
        self.complete = False
        self.dropped = False
        self.writer: Callable[[bytes], None] | None = None
        self.on_finish: Callable[[], None] | None = None

    def feed(self, data: bytes) -> bool:
        """Take a piece of the body; True when it completed the JSON inference header."""
        if self.head_bytes < self.header_length:
            wanted = self.header_length - self.head_bytes
            self.head_parts.append(data[:wanted])
            self.head_bytes += min(wanted, len(data))
            data = data[wanted:]
            if self.head_bytes < self.header_length:
                return False
            if data:
                self._keep(data)
            return True
        self._keep(data)
        return False

    def _keep(self, data: bytes) -> None:
        if self.dropped:
            return
        self.pieces.append(data)
        if self.writer is not None:
            self.writer(data)

    def head(self) -> bytes:
        return b"".join(self.head_parts)

    def whole(self) -> bytes:
        """Everything received, as one body (a request handed over whole after all: its header never completed)."""
        return b"".join([*self.head_parts, *self.pieces])

    def attach(self, writer: Callable[[bytes], None] | None) -> list[bytes]:
        """From now on each new piece goes to `writer`; returns the pieces that arrived before."""
        self.writer = writer
        return self.pieces

    def finish(self) -> None:
        self.complete = True
        on_finish, self.on_finish = self.on_finish, None
        if on_finish is not None:
            on_finish()

    def drop(self) -> None:
        self.dropped = True
        self.pieces = []
        self.writer = self.on_finish = None


@dataclass
class Rejection:
    """A request refused while parsing or screening; answered in its turn. `close`: then the connection closes
    (a framing error, or keep-alive withdrawn); else the connection goes on with its next request. The same
    Rejection may answer many requests (the screen keeps its refusals): its response bytes are made once."""

    status: int
    message: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reason: str | None = None
    close: bool = True
    response: bytes = b""  # the whole response, made when first sent

    def response_bytes(self) -> bytes:
        if not self.response:
            body = json_error(self.message, self.reason)
            self.response = response_head(self.status, [JSON_CONTENT, *self.headers],
                                          b"content-length: %d\r\n" % len(body), self.close) + body
        return self.response


class Cancellable(Protocol):
    def cancel(self) -> object: ...


# handler(request, connection): answers through the connection, now or later; returns what to cancel when
# the client leaves before the answer (None when it answered already).
Handler = Callable[[Request, "ClientConnection"], Cancellable | None]


class Screen(Protocol):
    def screen(self, conn: ClientConnection, method: bytes, url: bytes, headers: dict[bytes, bytes]
               ) -> Rejection | object: ...

    def class_level(self, method: bytes, url: bytes, headers: dict[bytes, bytes]) -> int | None:
        """The class level of a request that is not read yet (no side effects); None where it has none."""


class Counters:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.in_flight = 0
        self.by_status: dict[int, int] = {}

    def count(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


class _HeadReader:
    """Collects the request line and headers of the first request in some bytes (see `request_head`)."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.complete = False

    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.complete = True


def request_head(data: bytes) -> tuple[bytes, bytes, dict[bytes, bytes]] | None:
    """(method, url, headers) of the first request in `data`, or None while its headers are incomplete.
    Raises httptools.HttpParserError on bytes that are not HTTP (HttpParserUpgrade on an upgrade)."""
    head = _HeadReader()
    parser = httptools.HttpRequestParser(head)
    parser.feed_data(data)
    return (parser.get_method(), head.url, head.headers) if head.complete else None


def json_error(message: str, reason: str | None = None) -> bytes:
    """The JSON body of an error: what went wrong, and for a shed request the machine-readable reason."""
    return orjson.dumps({"error": message, "reason": reason} if reason else {"error": message})


def response_head(status: int, headers: list[tuple[bytes, bytes]], framing: bytes, close: bool) -> bytes:
    """The status line and headers of a response; `framing` is its content-length or transfer-encoding line."""
    status_line = STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
    fields = b"".join([b"%s: %s\r\n" % header for header in headers])
    return b"%s%s%s%s\r\n" % (status_line, fields, framing, b"connection: close\r\n" if close else b"")


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: GatewayServer) -> None:
        # per server
        self.server = server
        self.loop = server.loop
        self.handler = server.handler
        self.screen = server.screen
        self.max_header_bytes = server.limits.max_header_bytes  # plain ints: read for every header and body piece
        self.max_body_bytes = server.limits.max_body_bytes
        self.counters = server.counters
        # per connection
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request | Rejection] = deque()
        self.responding = False  # a response is being produced for the request at the head of the line
        self.active: Cancellable | None = None
        self.rejected = False  # stop parsing: the connection closes after the queued answers
        self.paused_for: set[str] = set()  # why reading is paused: "pipeline", "overload"
        self.last_seen = server.now
        self.held_since = 0.0  # when a hold of this connection began, while its waiting request is not yet read
        self.top_level = -1  # highest class level of the requests this connection carried (screen's business)
        self.write_listener: Callable[[bool], None] | None = None  # told when the client stops/resumes reading
        # per response
        self.response_started = False
        self.close_after_response = False
        self.raw_left = 0  # bytes of a streamed body still to come, read without the parser
        # per request being parsed
        self._reset_request()

    def _reset_request(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_bytes = 0
        self.body_parts: list[bytes] = []
        self.body_bytes = 0
        self.admitted: object = None
        self.skip_body = False  # answered at its headers: the body is parsed past, never kept
        self.streamed: StreamedBody | None = None  # a large body forwarded while it arrives
        self.streamed_size = 0  # its Content-Length

    # --- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.server.connections.add(self)
        self.counters.connections += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if diagnostics.CLIENT_RCVBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, diagnostics.CLIENT_RCVBUF)
        refusal = self.server.refuse_connection()
        if refusal is not None:
            self._refuse_connection(503, refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.held.pop(self, None)
        self.counters.connections -= 1
        self.pending.clear()
        if self.responding:
            self.responding = False
            self.counters.in_flight -= 1
        if self.active is not None:
            active, self.active = self.active, None
            active.cancel()  # the client is gone: stop waiting on its shard

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        self.last_seen = self.server.now
        if self.raw_left:
            data = self._raw_body(data)
            if not data or self.rejected:
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_connection(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse_connection(400, f"malformed HTTP request: {exc}")
            return
        if self.streamed is not None and self.body_bytes < self.streamed_size:
            self.raw_left = self.streamed_size - self.body_bytes  # the rest of it bypasses the parser

    def _raw_body(self, data: bytes) -> bytes:
        """A streamed body's bytes as they come, not through the parser (which would copy each piece once more);
        returns what follows the body. At its end a fresh parser takes over for the next request."""
        piece = data if len(data) <= self.raw_left else data[:self.raw_left]
        self.raw_left -= len(piece)
        self.on_body(piece)
        if self.raw_left or self.rejected:
            return b""
        self.on_message_complete()
        self.parser = httptools.HttpRequestParser(self)
        return data[len(piece):]

    def pause_writing(self) -> None:
        if self.write_listener is not None:
            self.write_listener(False)

    def resume_writing(self) -> None:
        if self.write_listener is not None:
            self.write_listener(True)

    # --- httptools callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._reset_request()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes <= self.max_header_bytes:
            self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        # Refuse at once, before reading a body that will not be used.
        if self.header_bytes > self.max_header_bytes:
            self._refuse_connection(431, f"request line and headers exceed {self.max_header_bytes} bytes")
            return
        length = self.headers.get(b"content-length")
        size = int(length) if length is not None and length.isdigit() else 0
        if size > self.max_body_bytes:
            self._refuse_connection(413, f"body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes")
            return
        if self.screen is not None:
            verdict = self.screen.screen(self, self.parser.get_method(), self.url, self.headers)
            if isinstance(verdict, Rejection):
                self.skip_body = True
                self.pending.append(verdict)
                self._next()
            else:
                self.admitted = verdict
                if size >= STREAM_BODY_BYTES and verdict is not None:
                    self._stream_body(size)

    def _stream_body(self, size: int) -> None:
        """Forward this body while it arrives, if it is a binary inference body that nothing queued waits ahead
        of (then the answers stay in order without holding its pieces back)."""
        header_length = self.headers.get(b"inference-header-content-length")
        encoding = self.headers.get(b"content-encoding")
        if (header_length is not None and header_length.isdigit() and 0 < int(header_length) <= size
                and (encoding is None or encoding == b"identity") and self.url.endswith(b"/infer")
                and not self.responding and not self.pending):
            self.streamed = StreamedBody(int(header_length), size)
            self.streamed_size = size

    def on_body(self, body: bytes) -> None:
        if self.rejected or self.skip_body:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body_bytes:
            self.body_parts = []
            self._refuse_connection(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
        elif self.streamed is not None:
            if self.streamed.feed(body):  # its inference header is in: hand the request over now
                self._hand_over(self.streamed.head(), self.streamed)
        else:
            self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self.rejected or self.skip_body:
            return
        streamed = self.streamed
        if streamed is not None:
            if streamed.head_bytes >= streamed.header_length:  # handed over already: its body is all in
                streamed.finish()
                return
            self.streamed = None
            self._hand_over(streamed.whole(), None)  # the header was never complete: checked (and refused) whole
            return
        parts = self.body_parts
        self._hand_over(parts[0] if len(parts) == 1 else b"".join(parts), None)

    def _hand_over(self, body: bytes, streamed: StreamedBody | None) -> None:
        url = self.url
        if not url.startswith(b"/") or b"?" in url or b"#" in url:  # origin-form without a query is the rule
            url = httptools.parse_url(url).path
        try:
            path = url.decode("ascii")
        except UnicodeDecodeError:
            self.streamed = None
            self._refuse_connection(400, "request path must be ASCII")
            return
        self.pending.append(Request(self.parser.get_method(), path, self.headers, body,
                                    self.parser.should_keep_alive(), self.admitted, streamed))
        if len(self.pending) >= MAX_PIPELINED:
            self.pause("pipeline")
        self._next()

    # --- request queue -----------------------------------------------------------------------------------
    def _refuse_connection(self, status: int, message: str) -> None:
        self.rejected = True
        self.pending.append(Rejection(status, message))
        self._next()

    def _next(self) -> None:
        if self.responding or not self.pending or self.transport.is_closing():
            return
        item = self.pending.popleft()
        if "pipeline" in self.paused_for and len(self.pending) < MAX_PIPELINED // 2:
            self.resume("pipeline")
        self.response_started = False
        self.responding = True
        self.counters.in_flight += 1
        if isinstance(item, Rejection):
            self.close_after_response = item.close
            self.rejected = self.rejected or item.close  # read nothing more; `_linger` closes
            self.response_started = True
            self.counters.count(item.status)
            self._write(item.response_bytes(), later=not item.close)
            self._response_done()
            if item.close:
                self._linger()
            return
        self.close_after_response = not item.keep_alive
        self.counters.requests += 1
        try:
            pending = self.handler(item, self)
        except Exception:
            log.exception("request handler failed")
            self.fail()
            return
        if self.responding:
            if pending is None:  # neither answered nor pending: a bug in the handler; never leave the client waiting
                log.error("request handler left %s %s without an answer", item.method.decode(), item.path)
                self.fail()
                return
            self.active = pending

    def fail(self) -> None:
        """The handler broke: a 500 if nothing was sent yet, else the connection is dropped."""
        if not self.responding:
            return
        if not self.response_started:
            self.close_after_response = True
            self.send_json(500, json_error("internal gateway error; the gateway log has the details"))
        else:
            self._close()

    def _response_done(self) -> None:
        self.responding = False
        self.active = None
        self.write_listener = None
        if self.streamed is not None:  # answered while (or after) its body arrived: its pieces are not needed
            self.streamed.drop()
            self.resume_after_upstream()
        self.counters.in_flight -= 1
        self.last_seen = self.server.now
        if "overload" in self.paused_for:
            self.server.held_answered(self)
        if self.close_after_response:
            if not self.rejected:
                self._close()
        elif self.pending:
            self.loop.call_soon(self._next)  # not recursively: a pipelined burst must not deepen the stack

    # --- reading control ---------------------------------------------------------------------------------
    def pause(self, why: str) -> None:
        if not self.paused_for and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused_for.add(why)

    def resume(self, why: str) -> None:
        self.paused_for.discard(why)
        if not self.paused_for and not self.transport.is_closing():
            self.transport.resume_reading()

    def resume_after_upstream(self) -> None:
        """Read again if a shard's back-pressure on a streamed body had paused reading."""
        if "upstream" in self.paused_for:
            self.resume("upstream")

    def hold(self) -> None:
        """Stop reading this connection until the overload passes (TCP back-pressure on its client)."""
        self.pause("overload")
        self.server.held[self] = None
        self.held_since = self.server.now

    def waiting_since(self, now: float) -> float:
        """When the request now read began to wait: when the hold began if it waited unread through one (its
        deadline counts from there: its client has been waiting as long), else `now`."""
        since, self.held_since = self.held_since, 0.0
        return since or now

    def peek(self, limit: int) -> bytes | None:
        """Up to `limit` bytes the client sent that were not read yet, left in the socket; b"" once the client
        has closed (or the socket is gone), None while it has sent nothing."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return b""
        view = socket.socket(sock.family, socket.SOCK_STREAM, 0, sock.fileno())  # borrows the descriptor
        try:
            return view.recv(limit, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return b""
        finally:
            view.detach()  # the transport owns the descriptor: never close it here

    # --- writing responses -------------------------------------------------------------------------------
    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> bytes:
        self.response_started = True
        self.counters.count(status)
        return response_head(status, headers, framing, self.close_after_response)

    def _write(self, data: bytes, later: bool = False) -> None:
        """Write now, or (`later`: a whole response on a connection that stays open) at the end of the turn, with
        the turn's other writes (upstream.Outbox). A write now first lets the held ones go: order is kept."""
        outbox = self.server.outbox
        if later and outbox is not None:
            outbox.write(self.transport, data)
            return
        self._let_held_go()
        self.transport.write(data)

    def _let_held_go(self) -> None:
        """Make the writes held for the end of the turn now, before a write or close that cannot wait."""
        outbox = self.server.outbox
        if outbox is not None and outbox.queued:
            outbox.flush()

    def _close(self) -> None:
        """Close after what was written, held writes included."""
        self._let_held_go()
        self.transport.close()

    def send(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]], at_once: bool = False) -> None:
        """A whole response in one write, at the end of the turn unless `at_once` (or the connection closes).
        `headers` must include the content type."""
        self._write(self._head(status, headers, b"content-length: %d\r\n" % len(body)) + body,
                    later=not (at_once or self.close_after_response))
        self._response_done()

    def send_json(self, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.send(status, body, [JSON_CONTENT, *extra])

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Begin a chunked response; each `send_chunk` reaches the client as it comes."""
        self._write(self._head(status, headers, b"transfer-encoding: chunked\r\n"))

    def send_chunk(self, data: bytes) -> None:
        if data:
            self._let_held_go()
            self.transport.writelines([b"%x\r\n" % len(data), data, b"\r\n"])

    def end_stream(self) -> None:
        self._write(b"0\r\n\r\n")
        self._response_done()

    def abort(self) -> None:
        """Drop the connection mid-response (the shard failed after the response began)."""
        self._close()

    def _linger(self) -> None:
        """Close after a refusal without losing the answer: closing a socket with unread input sends a TCP
        reset that can overtake the response, so half-close, drain what the client still sends, then close."""
        self.rejected = True
        self._let_held_go()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


class GatewayServer:
    """Listens and hands each parsed request to `handler`, after `screen` saw its headers."""

    def __init__(self, handler: Handler, limits: GatewayLimits, screen: Screen | None = None) -> None:
        self.handler = handler
        self.screen = screen
        self.limits = limits
        self.counters = Counters()
        self.connections: set[ClientConnection] = set()
        self.held: dict[ClientConnection, None] = {}  # connections not read while overloaded, oldest first
        self.max_connections = limits.max_connections
        self.outbox: Outbox | None = None  # writes held to the end of the loop's turn (set by the app)
        self.connection_gate: Callable[[int], str | None] = lambda count: None
        # a held connection was answered (the overload manager's, for connections held for their turn)
        self.held_answered: Callable[[ClientConnection], None] = lambda connection: None
        self.listener: socket.socket | None = None
        self._opening: set[asyncio.Task] = set()  # accepted sockets whose transports are being made
        self.loop: asyncio.AbstractEventLoop | None = None
        self.now = 0.0  # coarse clock for idle checks, set by the sweep
        self._sweeper: asyncio.TimerHandle | None = None

    def refuse_connection(self) -> str | None:
        """Why a new connection is refused at once, or None."""
        if self.counters.connections > self.max_connections:
            return "too many connections to the gateway; retry later"
        return self.connection_gate(self.counters.connections)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Start listening; return the bound port (useful with port 0)."""
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind(address)
            listener.listen(ACCEPT_BACKLOG)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self.listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)
        return listener.getsockname()[1]

    def _accept(self) -> None:
        """Take every connection waiting in the accept queue (up to ACCEPT_BATCH a turn). uvloop's own server
        takes one a loop turn: under a flood on open connections a turn lasts tens of milliseconds, so new
        clients, critical ones among them, waited seconds unaccepted, unclassified, invisible to the overload
        manager (bench/diagnose/flood_order.py)."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors or buffers: leave the queue, look again in a while
                log.warning("accept failed (%s); accepting again in %.0f s", exc, ACCEPT_RETRY_S)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_RETRY_S, self._resume_accepting)
                return
            task = self.loop.create_task(self._open(sock))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _resume_accepting(self) -> None:
        if self.listener.fileno() != -1:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    async def _open(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: ClientConnection(self), sock)
        except OSError:  # the client left before its transport was made
            sock.close()

    def _sweep(self) -> None:
        """Close keep-alive connections idle past the limit (one pass a second instead of a timer per request)."""
        self.now = self.loop.time()
        idle_after = self.limits.idle_timeout_s
        for connection in list(self.connections):
            if (not connection.responding and not connection.pending and not connection.rejected
                    and connection not in self.held and self.now - connection.last_seen >= idle_after):
                connection.transport.close()
        self._sweeper = self.loop.call_later(min(SWEEP_S, idle_after / 4), self._sweep)

    def release_held(self, count: int | None = None) -> int:
        """Read again up to `count` held connections (all by default), oldest first; how many."""
        released = 0
        while self.held and (count is None or released < count):
            self.release(next(iter(self.held)))
            released += 1
        return released

    def release(self, connection: ClientConnection) -> None:
        """Read one held connection again (a request that waited unread through the hold keeps its start)."""
        del self.held[connection]
        if not connection.peek(1):  # nothing waited: the next request starts when it comes
            connection.held_since = 0.0
        connection.resume("overload")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            for task in list(self._opening):
                task.cancel()
            for connection in list(self.connections):
                connection.transport.close()
            await asyncio.sleep(0)  # let the transports run their connection_lost
