"""Requests to shards written together at the end of the event loop's turn (`upstream.Outbox`,
`gateway.concurrency.coalesce_writes`): on real loopback sockets, and end to end in front of real Triton shards
with the setting on and off."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from controlplane.gateway.app import GatewayApp
from controlplane.gateway.routing import Router
from controlplane.gateway.server import GatewayServer
from controlplane.gateway.upstream import CollectingSink, Outbox, UpstreamPool, request_bytes
from controlplane.shards.base import Endpoint
from controlplane.spec import load_spec

from .conftest import EXAMPLE_SPEC, RunningStack


def unread(sock: socket.socket) -> bytes | None:
    """What the peer wrote that `sock` holds unread, or None while nothing came (never blocks)."""
    try:
        return sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def test_requests_sent_during_a_turn_reach_their_shards_together_at_its_end() -> None:
    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        pool = UpstreamPool("127.0.0.1", listener.getsockname()[1])
        first, second, closed = [await pool.connect() for _ in range(3)]
        shard_side = [listener.accept()[0] for _ in range(3)]
        loop = asyncio.get_running_loop()
        turns_ended: list[int] = []
        outbox = Outbox(on_flush=lambda: turns_ended.append(1))  # as the router's end of a turn
        request = request_bytes(b"POST", "/v2/models/work/infer", [], b"{}")[0]
        seen_during_the_turn: list[bytes | None] = []

        def one_turn() -> None:
            for conn in (first, second, closed):
                outbox.send(conn, request, CollectingSink(loop.create_future()))
            closed.close()  # e.g. its client left: its exchange closed it, its request must not go out
            seen_during_the_turn.extend(unread(sock) for sock in shard_side)

        loop.call_soon(one_turn)
        await asyncio.sleep(0)  # the turn that sends
        await asyncio.sleep(0)  # the turn after it
        assert seen_during_the_turn == [None, None, None], "a request left before its turn ended"
        assert turns_ended == [1]  # the router hears once that the turn's requests went
        assert [unread(sock) for sock in shard_side[:2]] == [request, request]
        assert unread(shard_side[2]) in (None, b""), "a request was written on a closed connection"
        assert first.sink is not None and second.sink is not None  # their answers go to their sinks
        for conn in (first, second):
            conn.close()
        for sock in [*shard_side, listener]:
            sock.close()

    asyncio.run(scenario())


async def infer_through(gateway_port: int, index: int) -> tuple[int, list[float]]:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [index, -index]}],
                       "parameters": {"work_ms": 2}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
    writer.write(b"POST /v2/models/work/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer cp-demo-key\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    answer = json.loads(await reader.readexactly(length))
    writer.close()
    return int(head.split()[1]), answer["outputs"][0]["data"] if "outputs" in answer else answer


@pytest.mark.parametrize("coalesce", [True, False], ids=["at-the-turns-end", "each-at-once"])
def test_concurrent_requests_are_answered_by_real_shards_either_way(stack: RunningStack, coalesce: bool) -> None:
    """Many requests read in the same turns and written together (or one by one) each get their own answer."""
    spec = load_spec(EXAMPLE_SPEC)
    concurrency = spec.gateway.concurrency.model_copy(update={"coalesce_writes": coalesce})
    spec = spec.model_copy(update={"gateway": spec.gateway.model_copy(update={"concurrency": concurrency})})
    shards = [s for s in stack.state()["shards"] if s["url"] and "work" in s["models"]]
    assert shards, "the example stack serves `work`"

    async def scenario() -> None:
        router = Router(spec.gateway.concurrency)
        router.update([Endpoint(s["name"], "127.0.0.1", int(s["url"].rsplit(":", 1)[1]), frozenset({"work"}))
                       for s in shards])
        app = GatewayApp(spec, router)
        assert (app.outbox is not None) is coalesce
        server = GatewayServer(app, spec.gateway.limits)
        app.serve_on(server)
        port = await server.start("127.0.0.1", 0)
        answers = await asyncio.gather(*(infer_through(port, i) for i in range(24)))
        assert answers == [(200, [float(i), float(-i)]) for i in range(24)]
        await server.stop()
        router.close()

    asyncio.run(scenario())


def test_held_responses_keep_their_order_before_a_stream_and_a_close_on_the_same_connection() -> None:
    """Pipelined requests: a whole response held for the turn's end must still reach the client before the next
    request's streamed response (written at once) and before the connection closes."""
    def handler(request, conn) -> None:  # noqa: ANN001
        if request.path == "/stream":
            conn.start_stream(200, [(b"content-type", b"text/plain")])
            conn.send_chunk(b"streamed")
            conn.end_stream()
        else:
            conn.send(200, request.path.encode(), [(b"content-type", b"text/plain")])

    async def scenario() -> None:
        spec = load_spec(EXAMPLE_SPEC)
        server = GatewayServer(handler, spec.gateway.limits)
        server.outbox = Outbox()
        port = await server.start("127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 10)  # until the gateway closes
        writer.close()
        await server.stop()
        bodies = [received.index(marker) for marker in (b"/first", b"streamed", b"/second", b"/last")]
        assert bodies == sorted(bodies), received
        assert received.count(b"HTTP/1.1 200") == 4 and b"connection: close" in received

    asyncio.run(scenario())
