"""Gateway answers when shards are missing, refuse connections, or freeze (in-process, on loopback).

A frozen shard is a listening socket that never answers: on the wire, exactly what a SIGSTOPped server is
(the kernel completes the TCP handshake, nothing ever replies).
"""

from __future__ import annotations

import asyncio
import json
import socket

from controlplane.gateway.app import GatewayApp
from controlplane.gateway.routing import Router
from controlplane.gateway.server import GatewayServer
from controlplane.shards.base import Endpoint
from controlplane.spec import load_spec

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
    from controlplane.gateway.inference import ModelSignature, TensorSpec

    async def scenario() -> dict[str, tuple[int, int]]:
        ports = []
        for _ in range(2):
            closed = socket.create_server(("127.0.0.1", 0))
            ports.append(closed.getsockname()[1])
            closed.close()  # nothing listens there: connections are refused, a failure before any response
        spec = load_spec(EXAMPLE_SPEC)
        router = Router()
        router.update([Endpoint(f"dead-{i}", "127.0.0.1", port, MODELS) for i, port in enumerate(ports)])
        router.retry_tokens = 0.0  # the budget is spent
        app = GatewayApp(spec, router)
        app.signatures["risk"] = ModelSignature({"features": TensorSpec("features", "FP32", (-1, 16))},
                                                frozenset({"score"}), batching=True)
        server = GatewayServer(app, spec.gateway.limits)
        app.serve_on(server)
        port = await server.start("127.0.0.1", 0)
        body = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16],
                                       "data": [0.0] * 16}]}).encode()
        results = {}
        for priority in ("standard", "critical"):
            head = (b"POST /v2/models/risk/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cp-demo-key\r\n"
                    b"x-priority: %s\r\nContent-Length: %d\r\n\r\n" % (priority.encode(), len(body)))
            status, _, _ = await request(port, head + body)
            results[priority] = (status, app.metrics.retries)
        await server.stop()
        return results

    results = asyncio.run(scenario())
    assert results["standard"] == (502, 0)  # no token left: not retried
    assert results["critical"] == (502, 1)  # retried once, on the other shard, though no token was left
