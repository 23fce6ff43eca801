"""A small, fast asyncio HTTP/1.1 client for load generation: keep-alive connections parsed by httptools.

aiohttp's client costs ~67 us a request on these machines (FACTS.md), enough to make the load generator
the bottleneck; this one does the minimum: one request at a time per connection, Content-Length or
chunked responses, a connection per concurrent request taken from an idle list.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass, field

import httptools


class ClientError(Exception):
    """The exchange failed below HTTP (refused, reset, timeout)."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.response: Response | None = None
        self.parts: list[bytes] = []
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ClientError(f"connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ClientError(f"bad HTTP response: {exc}"))
            self.transport.close()

    def on_message_begin(self) -> None:
        self.response = Response(0)
        self.parts = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        self.response.status = self.parser.get_status_code()
        self.response.body = b"".join(self.parts)
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.response)


class HttpClient:
    """Requests to one host:port over pooled keep-alive connections."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.idle: deque[_Connection] = deque()
        self.all: set[_Connection] = set()

    @classmethod
    def for_url(cls, url: str, timeout_s: float = 30.0) -> HttpClient:
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        return cls(host, int(port or 80), timeout_s)

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> Response:
        conn = None
        while self.idle:
            candidate = self.idle.pop()
            if not candidate.closed and not candidate.transport.is_closing():
                conn = candidate
                break
        loop = asyncio.get_running_loop()
        if conn is None:
            try:
                _, conn = await asyncio.wait_for(loop.create_connection(_Connection, self.host, self.port),
                                                 self.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise ClientError(f"cannot connect: {exc}") from None
            self.all.add(conn)
        head = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in (headers or {}).items()]
        head.append("\r\n")
        conn.waiter = loop.create_future()
        try:
            conn.transport.write("".join(head).encode() + body)
        except RuntimeError as exc:  # closed by the server between the check and the write
            self.all.discard(conn)
            raise ClientError(f"connection closed: {exc}") from None
        try:
            response = await asyncio.wait_for(conn.waiter, self.timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            conn.transport.close()
            self.all.discard(conn)
            raise
        except ClientError:
            self.all.discard(conn)
            raise
        conn.waiter = None
        if conn.keep_alive and not conn.closed:
            self.idle.append(conn)
        else:
            conn.transport.close()
            self.all.discard(conn)
        return response

    def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
        self.all.clear()
        self.idle.clear()
