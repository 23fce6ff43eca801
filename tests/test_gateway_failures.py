"""Gateway answers when shards are missing, refuse connections, or freeze (in-process, on loopback).

A frozen shard is a listening socket that never answers: on the wire, exactly what a SIGSTOPped server is
(the kernel completes the TCP handshake, nothing ever replies). `FreezingShard` answers until told to freeze,
then reads requests and never answers them: a Triton server SIGSTOPped while it served.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket

import uvloop

from controlplane.gateway.app import GatewayApp
from controlplane.gateway.inference import ModelSignature, TensorSpec
from controlplane.gateway.routing import Router
from controlplane.gateway.server import GatewayServer
from controlplane.gateway.upstream import UpstreamPool
from controlplane.shards.base import Endpoint
from controlplane.spec import Concurrency, GatewayLimits, load_spec

from .conftest import EXAMPLE_SPEC

MODELS = frozenset({"risk", "work", "textgen"})


async def request(port: int, raw: bytes) -> tuple[int, dict, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    return int(lines[0].split()[1]), headers, json.loads(body)


async def gateway(endpoints: list[Endpoint], **limits) -> tuple[GatewayServer, int]:
    spec = load_spec(EXAMPLE_SPEC)
    spec = spec.model_copy(update={"gateway": spec.gateway.model_copy(
        update={"limits": spec.gateway.limits.model_copy(update=limits)})})
    router = Router()
    router.update(endpoints)
    server = GatewayServer(GatewayApp(spec, router), spec.gateway.limits)
    return server, await server.start("127.0.0.1", 0)


RISK_BODY = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0.0] * 16}]}).encode()


async def risk_gateway(router: Router) -> tuple[GatewayApp, GatewayServer, int]:
    """The example spec's gateway (admission, overload manager) over `router`, the `risk` model's signature known,
    so no lookup goes to a shard."""
    spec = load_spec(EXAMPLE_SPEC)
    app = GatewayApp(spec, router)
    app.signatures["risk"] = ModelSignature({"features": TensorSpec("features", "FP32", (-1, 16))},
                                            frozenset({"score"}), batching=True)
    server = GatewayServer(app, spec.gateway.limits)
    app.serve_on(server)
    return app, server, await server.start("127.0.0.1", 0)


def test_no_ready_shard_is_503_with_retry_after() -> None:
    async def scenario() -> None:
        server, port = await gateway([])
        body = b'{"inputs": []}'
        status, headers, error = await request(
            port, b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert (status, headers["retry-after"]) == (503, "1") and "no ready shard" in error["error"]
        status, _, error = await request(port, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and "risk" in error["error"]
        status, _, _ = await request(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        await server.stop()

    asyncio.run(scenario())


def test_frozen_shard_gets_504_within_the_upstream_timeout() -> None:
    async def scenario() -> None:
        frozen = socket.create_server(("127.0.0.1", 0), backlog=16)  # never accepts, never answers
        server, port = await gateway([Endpoint("frozen-0", "127.0.0.1", frozen.getsockname()[1], MODELS)],
                                     upstream_timeout_s=0.3)
        status, _, error = await request(port, b"GET /v2/models/risk/config HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 504 and "frozen-0 failed: no complete response within 0.3 s" in error["error"]
        await server.stop()
        frozen.close()

    asyncio.run(scenario())


def test_refusing_shard_is_reported_as_bad_gateway() -> None:
    async def scenario() -> None:
        closed = socket.create_server(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()  # nothing listens there any more: connections are refused
        server, port = await gateway([Endpoint("dead-0", "127.0.0.1", dead_port, MODELS)])
        status, headers, error = await request(port, b"GET /v2/models/risk HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 502 and "dead-0 failed: cannot connect" in error["error"]
        await server.stop()

    asyncio.run(scenario())


def test_the_highest_class_retries_outside_a_spent_retry_budget() -> None:
    async def scenario() -> dict[str, tuple[int, int]]:
        ports = []
        for _ in range(2):
            closed = socket.create_server(("127.0.0.1", 0))
            ports.append(closed.getsockname()[1])
            closed.close()  # nothing listens there: connections are refused, a failure before any response
        router = Router()
        router.update([Endpoint(f"dead-{i}", "127.0.0.1", port, MODELS) for i, port in enumerate(ports)])
        router.retry_tokens = 0.0  # the budget is spent
        app, server, port = await risk_gateway(router)
        results = {}
        for priority in ("standard", "critical"):
            head = (b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
                    b"x-priority: %s\r\nContent-Length: %d\r\n\r\n" % (priority.encode(), len(RISK_BODY)))
            status, _, _ = await request(port, head + RISK_BODY)
            results[priority] = (status, app.metrics.retries)
        await server.stop()
        return results

    results = asyncio.run(scenario())
    assert results["standard"] == (502, 0)  # no token left: not retried
    assert results["critical"] == (502, 1)  # retried once, on the other shard, though no token was left


def test_a_handler_that_neither_answers_nor_stays_pending_gets_a_500_not_silence() -> None:
    """The server's safety net under every route: a handler that returns without answering and without anything
    pending (a bug) still answers the client, and the connection is closed after it."""
    async def scenario() -> tuple[int, dict, dict]:
        server = GatewayServer(lambda request, conn: None, GatewayLimits())
        port = await server.start("127.0.0.1", 0)
        answer = await request(port, b"GET /v2/anything HTTP/1.1\r\nHost: x\r\n\r\n")
        await server.stop()
        return answer

    status, headers, error = asyncio.run(scenario())
    assert status == 500 and headers["connection"] == "close" and "internal gateway error" in error["error"]


def test_an_idle_upstream_connection_whose_transport_is_closing_is_not_reused() -> None:
    """A shard killed with connections idle in the pool: the event loop closes each transport on the reset before
    `connection_lost` reaches us; reused in that window, a write raised and the request got a 500 (seen in
    tests/test_stack.py's killed shard, a model signature lookup)."""
    async def scenario() -> tuple[bool, bool]:
        listener = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        pool = UpstreamPool("127.0.0.1", listener.sockets[0].getsockname()[1])
        conn = await pool.connect()
        pool.release(conn)
        conn.transport.close()  # what the loop does on a reset; `connection_lost` comes a turn later
        skipped = pool.take_idle() is None
        fresh = await pool.acquire()
        reused = fresh is conn
        fresh.close()
        listener.close()
        return skipped, reused

    assert uvloop.run(scenario()) == (True, False)

class FreezingShard:
    """A minimal HTTP/1.1 shard: answers every request with an empty 200 until `frozen`, then never again."""

    def __init__(self, service_s: float = 0.0) -> None:
        self.frozen = False
        self.service_s = service_s  # how long each answer takes
        self.never = asyncio.Event()  # never set: what a frozen request waits on

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1]))
                if self.frozen:
                    await self.never.wait()
                await asyncio.sleep(self.service_s)
                body = b'{"outputs": []}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def test_a_class_that_no_shard_takes_any_more_is_refused_at_once_not_left_waiting() -> None:
    """Every shard froze while a lower class queued: after a whole rate window in which the class drained nothing,
    its wait is estimated as infinite. A new request of that class is refused at once, 429 with a finite
    Retry-After. (Until 2026-12-01 the infinite estimate broke the Retry-After header after the request had been
    marked finished: the client got nothing, up to 487 requests in bench/diagnose/fault_repeat.py's 4th run.)"""
    async def scenario() -> list[tuple[int, dict, dict]]:
        shard = FreezingShard()
        shard_server = await asyncio.start_server(shard.serve, "127.0.0.1", 0)
        router = Router(Concurrency(initial=2, min=1, max=2))  # two requests in flight, the rest queue
        router.update([Endpoint("main-0", "127.0.0.1", shard_server.sockets[0].getsockname()[1], MODELS)])
        _, server, port = await risk_gateway(router)
        raw = (b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
               b"x-priority: sheddable\r\nx-deadline-ms: 5000\r\nContent-Length: %d\r\n\r\n%s"
               % (len(RISK_BODY), RISK_BODY))
        for _ in range(5):  # served: the gateway learns the service time
            assert (await request(port, raw))[0] == 200
        shard.frozen = True
        stuck = [asyncio.ensure_future(request(port, raw)) for _ in range(6)]  # 2 in flight, 4 queued
        await asyncio.sleep(1.3)  # a whole rate window without a dispatch of the class
        answers = [await request(port, raw) for _ in range(3)]
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        await server.stop()
        shard_server.close()
        return answers

    for status, headers, error in asyncio.run(scenario()):
        assert (status, headers["retry-after"], error["reason"]) == (429, "1", "deadline")
        assert "no request of class 'sheddable' was sent to a shard in the last 1 s" in error["error"]


def test_a_stall_is_seen_while_the_deadline_still_leaves_a_retry_time() -> None:
    """A shard froze with a critical request in flight. A lower class's stall timeout (twice mean + 4 deviations of
    its service time) would run past the deadline; the top class's fires after one such time, or sooner, leaving
    its retry as long before the deadline: the retry on the other shard answers in time, 200, not 504. (Suite run
    13's fault run lost one critical request so.)"""
    async def scenario() -> tuple[list[int], int]:
        shards = [FreezingShard(service_s=0.1), FreezingShard(service_s=0.1)]
        servers = [await asyncio.start_server(shard.serve, "127.0.0.1", 0) for shard in shards]
        router = Router(Concurrency(initial=1, min=1, max=1))  # one request at a shard: the next goes to the other
        router.update([Endpoint(f"main-{i}", "127.0.0.1", s.sockets[0].getsockname()[1], MODELS)
                       for i, s in enumerate(servers)])
        app, server, port = await risk_gateway(router)
        raw = (b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
               b"x-priority: critical\r\nx-deadline-ms: 400\r\nContent-Length: %d\r\n\r\n%s"
               % (len(RISK_BODY), RISK_BODY))
        for _ in range(4):  # served: the gateway learns the class's service time (~0.1 s, its deviation still large)
            assert (await request(port, raw))[0] == 200
        shards[0].frozen = True
        retries = app.metrics.retries
        answers = await asyncio.gather(*(request(port, raw) for _ in range(2)))  # one of them lands on main-0
        retries = app.metrics.retries - retries
        await server.stop()
        for listener in servers:
            listener.close()
        return [status for status, _, _ in answers], retries

    statuses, retries = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert retries == 1


def test_a_shard_that_served_and_then_died_is_ejected() -> None:
    """A shard that answered before and now refuses connections: its failures count toward ejection (they are timed
    from the dispatch, so they do not look like requests out while it answered others)."""
    async def scenario() -> tuple[bool, bool]:
        shard = FreezingShard()
        listener = await asyncio.start_server(shard.serve, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        router = Router()
        router.update([Endpoint("main-0", "127.0.0.1", port, MODELS)])
        _, server, gateway_port = await risk_gateway(router)
        raw = (b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(RISK_BODY), RISK_BODY))
        assert (await request(gateway_port, raw))[0] == 200
        target = router.target_named("main-0")
        target.pool.close()  # no idle connection to reuse
        listener.close()
        await listener.wait_closed()
        for _ in range(3):
            await request(gateway_port, raw)  # connection refused: 502
        ejected = not target.available
        await server.stop()
        return target.served > 0, ejected

    served, ejected = asyncio.run(scenario())
    assert served and ejected
