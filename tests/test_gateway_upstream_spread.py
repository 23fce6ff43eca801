"""Upstream connections are opened several at once (UpstreamPool.open_spread), and the large-body timeline
(controlplane/gateway/diagnostics.py) reads back what the gateway wrote.

Triton's HTTP server pins each connection to the first of its threads with nothing queued; connections opened
one by one all land on one thread (seen with strace on this machine's tritonserver 2.51: 16 of 16). Which thread
a connection lands on cannot be seen from outside, so these tests check the pool's side, against a real HTTP
server on loopback: how many connections a pool with nothing idle opens, that each serves requests, and the
failure when none can be opened.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import tritonclient.http as httpclient

from controlplane.gateway import diagnostics
from controlplane.gateway.diagnostics import Timeline, timeline_summary
from controlplane.gateway.upstream import UpstreamError, UpstreamPool, fetch, request_bytes
from controlplane.procs import free_port

from .conftest import EXAMPLE_SPEC, RunningStack, start_gateway, stop_gateway
from .test_gateway_large_body import KEY, large_x

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def http_server(served: dict[int, int]) -> asyncio.Server:
    """A loopback HTTP/1.1 server that answers every request head with `{}`; counts requests per connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = writer.get_extra_info("peername")[1]
        served[connection] = 0
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                served[connection] += 1
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_pool_with_nothing_idle_opens_a_burst_and_uses_every_connection_in_turn() -> None:
    burst = diagnostics.CONNECT_BURST

    async def scenario() -> tuple[int, list[int], dict[int, int]]:
        served: dict[int, int] = {}
        server = await http_server(served)
        pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1])
        first = await pool.open_spread()
        idle_after_burst = len(pool.idle)
        pool.release(first)
        statuses = [(await fetch(pool, request_bytes(b"GET", "/v2/health/ready", [], b""), 5.0)).status
                    for _ in range(2 * burst)]
        pool.close()
        server.close()
        await server.wait_closed()
        return idle_after_burst, statuses, served

    idle_after_burst, statuses, served = asyncio.run(scenario())
    assert burst > 1
    assert idle_after_burst == burst - 1
    assert statuses == [200] * (2 * burst)
    # no more connections than the burst, and each carried its share: one sequential client used them in turn
    assert sorted(served.values()) == [2] * burst


def test_a_burst_to_a_shard_that_is_not_listening_fails_with_a_clear_error() -> None:
    async def scenario() -> None:
        pool = UpstreamPool("127.0.0.1", free_port())
        await pool.open_spread()

    with pytest.raises(UpstreamError, match="cannot connect to shard 127.0.0.1:") as caught:
        asyncio.run(scenario())
    assert caught.value.before_response


def test_the_timeline_summary_reads_what_the_gateway_wrote(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(diagnostics, "TIMELINE_DIR", str(tmp_path))
    monkeypatch.setattr(Timeline, "_file", None)
    begun = time.monotonic()
    for connection in (1, 1, 2):
        trace = Timeline(connection, None)
        trace.mark("dispatched", in_flight=3, room=16)
        trace.mark("sent", arrived_before=262144)
        trace.paused(False)
        trace.paused(True)
        trace.mark("body_out", unsent=0)
        trace.mark("head")
        trace.mark("end")
        trace.write(200)
    Timeline._file.close()
    summary = timeline_summary(tmp_path, (begun, time.monotonic()))
    assert summary["records"] == 3
    assert summary["pauses"] == [1, 1]
    assert summary["room"] == [16, 16]
    assert summary["requests_per_worker"] == [3] and summary["connections_per_worker"] == [2]
    assert all(0 <= summary[f"{phase}_ms"][0] <= summary["total_ms"][1] for phase in ("waited", "upload", "shard"))
    lines = (tmp_path / f"timeline-{os.getpid()}.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["status"] == 200
    assert timeline_summary(tmp_path, (0.0, begun - 1)) == {"records": 0}  # outside the window: nothing


def test_a_gateway_with_the_timeline_on_records_each_large_request_in_order(stack: RunningStack, tmp_path) -> None:
    """`cpctl gateway` with CPCTL_GATEWAY_TIMELINE, in front of the example stack's shards: each large request it
    relays leaves one record whose moments follow the request's path; a small one leaves none."""
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_text(json.dumps([{"name": s["name"], "host": urlsplit(s["url"]).hostname,
                                      "port": urlsplit(s["url"]).port, "models": s["models"]}
                                     for s in stack.state()["shards"] if s["url"]]))  # (a standby has none)
    timelines = tmp_path / "timelines"
    gateway = start_gateway(EXAMPLE_SPEC, endpoints, tmp_path / "gateway.log",
                            env={**os.environ, "CPCTL_GATEWAY_TIMELINE": str(timelines)})
    begun = time.monotonic()
    try:
        client = httpclient.InferenceServerClient(gateway.url.removeprefix("http://"), network_timeout=30)
        try:
            for rows in (4, 4, 1):  # two large bodies (streamed), then a small one
                x = large_x(seed=rows) if rows == 4 else np.ones((1, 4), np.float32)
                tensor = httpclient.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                np.testing.assert_array_equal(client.infer("work", [tensor], headers={"Authorization": KEY})
                                              .as_numpy("y"), x)
        finally:
            client.close()
    finally:
        assert not stop_gateway(gateway)
    records = [json.loads(line) for path in timelines.glob("timeline-*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == 200 for r in records)
    for record in records:
        moments = [record[m] for m in ("handed", "dispatched", "sent", "body_out", "head", "end")]
        assert moments == sorted(moments)
        assert 1 <= record["in_flight"] <= record["room"]
    assert timeline_summary(timelines, (begun, time.monotonic()))["records"] == 2
