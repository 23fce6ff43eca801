"""Pooled keep-alive HTTP/1.1 connections to one Triton server, relaying responses as they arrive.

A response is handed to a `ResponseSink` event by event (head, body pieces, end), so a streamed
(chunked, server-sent events) response reaches the client chunk by chunk and an ordinary one is written
in one piece. Nothing here parses or copies tensor data.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from typing import Protocol

import httptools

# Triton response headers worth passing on; hop-by-hop and framing headers are the gateway's own business.
FORWARDED_RESPONSE_HEADERS = {b"content-type", b"inference-header-content-length", b"content-encoding"}


class UpstreamError(Exception):
    """The shard failed. `before_response` tells whether any response byte had arrived (retry is safe)."""

    def __init__(self, message: str, before_response: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.before_response = before_response
        self.timed_out = timed_out


class ResponseSink(Protocol):
    def attach(self, upstream: UpstreamConnection) -> None: ...
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], chunked: bool) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.done: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.responded = False
        self.closed = False
        self.reusable = True

    # --- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.done is None:  # bytes while idle: the server is confused; drop the connection
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"invalid HTTP from shard: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        # Triton frames every response (Content-Length or chunked): a close before the end is a failure.
        self._fail("shard closed the connection")

    def pause_writing(self) -> None:  # the shard reads slower than the client sends: fine, bodies are bounded
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers = []
        self.responded = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        chunked = any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers)
        self.reusable = self.parser.should_keep_alive()
        forwarded = [(n, v) for n, v in self.headers if n in FORWARDED_RESPONSE_HEADERS]
        self.sink.on_head(self.parser.get_status_code(), forwarded, chunked)

    def on_body(self, body: bytes) -> None:
        self.sink.on_body(body)

    def on_message_complete(self) -> None:
        sink, done = self.sink, self.done
        self.sink = self.done = None
        sink.on_end()
        done.set_result(None)
        if self.reusable and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    # --- used by the pool ------------------------------------------------------------------------------
    def send(self, data: list[bytes], sink: ResponseSink) -> asyncio.Future[None]:
        self.sink = sink
        self.responded = False
        self.done = asyncio.get_running_loop().create_future()
        sink.attach(self)
        if len(data) == 1:
            self.transport.write(data[0])  # uvloop's writelines() costs far more than write() for one buffer
        else:
            self.transport.writelines(data)
        return self.done

    def _fail(self, message: str) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(UpstreamError(message, before_response=not self.responded))
        self.sink = self.done = None

    def time_out(self, timeout_s: float) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(UpstreamError(f"no complete response within {timeout_s:.3g} s",
                                                  before_response=not self.responded, timed_out=True))
        self.sink = self.done = None
        self.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections to one shard, opened on demand and reused most-recent first."""

    def __init__(self, host: str, port: int, max_idle: int = 256, connect_timeout_s: float = 1.0) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.connect_timeout_s = connect_timeout_s
        self.idle: deque[UpstreamConnection] = deque()
        self.closed = False

    async def acquire(self) -> UpstreamConnection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
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


async def exchange(pool: UpstreamPool, request: list[bytes], sink: ResponseSink, timeout_s: float) -> None:
    """Send one request on a pooled connection and relay the response into `sink`.

    Raises UpstreamError on failure, a timeout included. A connection whose exchange did not finish is
    closed, never reused.
    """
    conn = await pool.acquire()
    done = conn.send(request, sink)
    timer = asyncio.get_running_loop().call_later(timeout_s, conn.time_out, timeout_s)
    try:
        await done
    except asyncio.CancelledError:  # the client went away mid-exchange
        conn.close()
        raise
    finally:
        timer.cancel()
