"""Upstream connections are opened several at once (UpstreamPool.open_spread), and the large-body timeline
(controlplane/gateway/diagnostics.py) reads back what the gateway wrote.

Triton's HTTP server pins each connection to the first of its threads with nothing queued; connections opened
one by one all land on one thread (seen with strace on this machine's tritonserver 2.51: 16 of 16). Which thread
a connection lands on cannot be seen from outside, so these tests check the pool's side, against the example
stack's real Triton shard: how many connections a pool with nothing idle opens, that each serves requests in
turn, and the failure when none can be opened.
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
from .test_gateway_large_body import assert_work_echoes, large_x


def test_a_pool_with_nothing_idle_opens_a_burst_and_uses_every_connection_in_turn(stack: RunningStack) -> None:
    burst = diagnostics.CONNECT_BURST
    shard = urlsplit(next(s["url"] for s in stack.state()["shards"] if s["url"]))

    async def scenario() -> tuple[int, list[int], list[int]]:
        pool = UpstreamPool(shard.hostname, shard.port)  # to a real Triton shard of the example stack
        first = await pool.open_spread()
        idle_after_burst = len(pool.idle)
        pool.release(first)
        used, statuses = [], []
        for _ in range(2 * burst):
            used.append(id(pool.idle[0]))  # the connection the next request takes
            statuses.append((await fetch(pool, request_bytes(b"GET", "/v2/health/ready", [], b""), 5.0)).status)
        pool.close()
        return idle_after_burst, statuses, used

    idle_after_burst, statuses, used = asyncio.run(scenario())
    assert burst > 1
    assert idle_after_burst == burst - 1
    assert statuses == [200] * (2 * burst)
    # no connection opened beyond the burst, and each carried its share: one request after another took them in turn
    assert sorted(used.count(conn) for conn in set(used)) == [2] * burst


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
                assert_work_echoes(client, large_x(seed=rows) if rows == 4 else np.ones((1, 4), np.float32))
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
