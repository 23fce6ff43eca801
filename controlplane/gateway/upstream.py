"""Pooled keep-alive HTTP/1.1 connections to one Triton server, relaying responses as they arrive.

A response is handed to a `ResponseSink` event by event (head, body pieces, end, or error), so a streamed
(chunked, server-sent events) response reaches the client chunk by chunk and an ordinary one is written
in one piece. Nothing here parses or copies tensor data, and the request path needs no task or future: the
sink's callbacks carry it on (`exchange()` wraps them in a future for the gateway's own lookups and probes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import httptools

from controlplane.gateway import diagnostics

# Triton response headers worth passing on; hop-by-hop and framing headers are the gateway's own business.
FORWARDED_RESPONSE_HEADERS = {b"content-type", b"inference-header-content-length", b"content-encoding"}


class UpstreamError(Exception):
    """The shard failed. `before_response` tells whether any response byte had arrived (retry is safe)."""

    def __init__(self, message: str, before_response: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.timed_out = timed_out


class ResponseSink(Protocol):
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_error(self, error: UpstreamError) -> None: ...


def request_bytes(method: bytes, path: str, headers: list[bytes], body: bytes, arriving: int = 0) -> list[bytes]:
    """An HTTP/1.1 request to a shard: `headers` are complete `name: value\\r\\n` lines. A small body travels
    in the same buffer as the head (one send); a large one is written as it is, not copied. `arriving`: bytes
    of the body still to come after `body` (a streamed body; the caller writes them)."""
    head = b"%s %s HTTP/1.1\r\nhost: shard\r\ncontent-length: %d\r\n%s\r\n" % (
        method, path.encode(), len(body) + arriving, b"".join(headers))
    if len(body) < SEPARATE_BODY_BYTES:
        return [head + body]
    return [head, body]


SEPARATE_BODY_BYTES = 64 * 1024


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.headers: list[tuple[bytes, bytes]] = []  # the response's FORWARDED_RESPONSE_HEADERS
        self.chunked = False
        self.responded = False
        self.closed = False
        self.reusable = True
        self.reused = False  # it carried a request before: a close before any answer may be the shard's idle close
        self.body_open = False  # a streamed request body is still being written: never reuse it before its end
        self.write_listener: Callable[[bool], None] | None = None  # told when the shard stops/resumes reading

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if diagnostics.UPSTREAM_SNDBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, diagnostics.UPSTREAM_SNDBUF)
        if diagnostics.UPSTREAM_WRITE_HIGH:
            transport.set_write_buffer_limits(high=diagnostics.UPSTREAM_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.sink is None:  # bytes while idle: the server is confused; drop the connection
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"invalid HTTP from shard: {exc}", before_response=not self.responded))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        # Triton frames every response (Content-Length or chunked): a close before the end is a failure.
        self.fail(UpstreamError("shard closed the connection", before_response=not self.responded))

    def pause_writing(self) -> None:
        """The shard reads slower than we write: a streamed body pauses its client (a whole body is bounded)."""
        if self.write_listener is not None:
            self.write_listener(False)

    def resume_writing(self) -> None:
        if self.write_listener is not None:
            self.write_listener(True)

    # --- httptools callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = []
        self.chunked = False
        self.responded = True

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in FORWARDED_RESPONSE_HEADERS:
            self.headers.append((name, value))
        elif name == b"transfer-encoding":
            self.chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self.sink.on_head(self.parser.get_status_code(), self.headers, self.chunked)

    def on_body(self, body: bytes) -> None:
        self.sink.on_body(body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        if self.reusable and not self.closed and not self.body_open:
            self.reused = True
            self.pool.release(self)
        else:
            self.close()
        sink.on_end()

    # --- used by the sink's owner --------------------------------------------------------------------
    def expect(self, sink: ResponseSink) -> None:
        """The next response goes to `sink` (the request is written now, or by an `Outbox` at the turn's end)."""
        self.sink = sink
        self.responded = False

    def send(self, data: list[bytes], sink: ResponseSink) -> None:
        """Write a request; its response goes to `sink`."""
        self.expect(sink)
        if len(data) == 1:
            self.transport.write(data[0])  # uvloop's writelines() costs far more than write() for one buffer
        else:
            self.transport.writelines(data)

    def write_body(self, data: bytes) -> None:
        """More of a streamed request body (dropped once the connection is closed: its exchange has ended)."""
        if not self.closed:
            self.transport.write(data)

    def fail(self, error: UpstreamError) -> None:
        """End the exchange in flight with `error` (if any) and drop the connection: it is never reused."""
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_error(error)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections to one shard, opened on demand, several at once (`open_spread`), and reused
    in turn, oldest first: Triton pins each connection to one of its HTTP threads (`open_spread` says how), so
    using every connection of the pool in turn spreads the bodies over every thread that holds one. (Reused most
    recent first, as until 2026-12-01, a few hot connections carried the load, on one thread when they happened
    to share it: 10.8k img/s with one Triton thread busy, where the next run had two and 18.7k;
    bench/results/gpu-2026-12-01-run4.md.)"""

    def __init__(self, host: str, port: int, max_idle: int = 256, connect_timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.idle: deque[UpstreamConnection] = deque()
        self.closed = False
        self.spreading = False  # a burst of connections is being opened

    def take_idle(self) -> UpstreamConnection | None:
        """An open idle connection, or None (then `connect`). One whose transport is already closing is skipped: the
        event loop closes it on a reset (a shard killed) before telling us, and a write on it raises."""
        idle = self.idle
        while idle:
            conn = idle.popleft()
            if not conn.closed and not conn.transport.is_closing():
                return conn
        return None

    async def open_spread(self) -> UpstreamConnection:
        """A new connection, opened together with CONNECT_BURST - 1 others that wait idle. Triton 2.51's HTTP
        server hands each accepted connection to the first of its threads with nothing queued, and a connection
        stays on its thread: connections opened one by one all land on one thread, which then reads every body
        sent on them alone, 4 KiB a read (one core: 8-10k images of 150 KB a second on the H200). Connections that
        arrive together find the first threads still busy taking the earlier ones and spread; which thread each
        gets is not visible from here (bench/results/gpu-2026-12-01-run4.md)."""
        burst = diagnostics.CONNECT_BURST
        if burst <= 1 or self.spreading:
            return await self.connect()
        self.spreading = True
        try:
            opened = await asyncio.gather(*(self.connect() for _ in range(burst)), return_exceptions=True)
        finally:
            self.spreading = False
        connections = [conn for conn in opened if isinstance(conn, UpstreamConnection)]
        if not connections:
            raise [failure for failure in opened if isinstance(failure, BaseException)][0]
        for extra in connections[1:]:
            self.release(extra)
        return connections[0]

    async def connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout_s,
            )
        except (TimeoutError, OSError) as exc:
            raise UpstreamError(f"cannot connect to shard {self.host}:{self.port}: {exc or 'timeout'}",
                                before_response=True) from None
        return conn

    async def acquire(self) -> UpstreamConnection:
        return self.take_idle() or await self.open_spread()

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        self.closed = True
        while self.idle:
            self.idle.pop().close()


class Outbox:
    """Writes held until the end of the event loop's turn, then made together.

    A turn reads several requests, each costing the gateway tens of microseconds. Toward the shards: written as
    they are read, they reach a shard spread over the turn, and Triton's dynamic batcher (which waits
    `max_queue_delay` for more) runs them as several small batches; written at once, they arrive together and run
    as one batch: fewer model executions, less of the shards' CPU per request. Toward the clients and the shards
    alike: every write wakes a process on the other side, which on a busy machine takes the gateway's core there
    and then; writes made together cost one such switch a turn instead of one a request
    (bench/results/gateway-limits-2026-12-01-run2.md). A write waits at most the rest of its turn (the callbacks of
    I/O that was ready with it), never for a timer or for more traffic. Writes keep their order.
    """

    def __init__(self, on_flush: Callable[[], None] | None = None) -> None:
        self.queued: list[tuple[asyncio.Transport, bytes]] = []
        self.on_flush = on_flush  # told when a turn's writes went (routing.Router.end_turn)

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write `data` on `transport` at the end of this turn (dropped if it is closed by then)."""
        if not self.queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self.queued.append((transport, data))

    def send(self, conn: UpstreamConnection, data: bytes, sink: ResponseSink) -> None:
        """Send a request on `conn` at the end of this turn; its response goes to `sink`."""
        conn.expect(sink)
        self.write(conn.transport, data)

    def flush(self) -> None:
        """Make the held writes now (also before a write that cannot wait, so that order is kept)."""
        queued, self.queued = self.queued, []
        for transport, data in queued:
            if not transport.is_closing():  # closed meanwhile: its exchange has heard of it (connection_lost, cancel)
                transport.write(data)
        if self.on_flush is not None:
            self.on_flush()


class CollectingSink:
    """Keeps a whole shard response in memory and completes a future (the gateway's own lookups, probes)."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None:
        self.status = status
        self.headers = headers

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)

    def on_end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_error(self, error: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(error)


async def fetch(pool: UpstreamPool, request: list[bytes], timeout_s: float) -> CollectingSink:
    """Send one request on a pooled connection and collect the whole response.

    Raises UpstreamError on failure, a timeout included. A connection whose exchange did not finish is
    closed, never reused.
    """
    conn = await pool.acquire()
    sink = CollectingSink(asyncio.get_running_loop().create_future())
    conn.send(request, sink)
    try:
        await asyncio.wait_for(sink.done, timeout_s)
    except TimeoutError:
        raise UpstreamError(f"no complete response within {timeout_s:.3g} s", before_response=not conn.responded,
                            timed_out=True) from None
    finally:
        if not sink.done.done() or sink.done.cancelled():
            conn.close()  # unfinished: never reused
    return sink
