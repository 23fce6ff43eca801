"""Priority flow control end to end: real Triton shards running `work`, the real gateway, real HTTP.

The stack here is small on purpose (per-shard concurrency capped at 4, 20 ms of work per batch) so that a
burst of a few hundred requests is far over its capacity.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from controlplane.bench.client import HttpClient
from controlplane.gateway.inference import InferHeader
from controlplane.spec import hash_api_key

from .conftest import ROOT, RunningStack, stack_of

DEMO = {"Authorization": "Bearer cp-demo-key"}
OTHER = {"x-api-key": "cp-other-key"}
SLOW = {"Authorization": "Bearer cp-slow-key"}
ADMIN = {"Authorization": "Bearer cp-admin-key"}

SPEC = f"""
cluster: flow-test
model_repository: {ROOT / 'examples' / 'models'}
node_pools: [{{name: local, provider: existing, instance_type: this-machine}}]
models:
  - {{name: work, path: work, memory_mb: 32, instance_count: 2, max_batch: 64}}
  - {{name: risk, path: risk, memory_mb: 64, instance_count: 1, max_batch: 64, cheaper_variant: risk_lite}}
  - {{name: risk_lite, path: risk_lite, memory_mb: 16, instance_count: 1, max_batch: 64}}
shards:
  - {{name: main, models: [work, risk, risk_lite], replicas: 2, standby: 1}}
priority_classes:
  - {{name: critical, level: 300, default_deadline_ms: 3000, share: 0.5}}
  - {{name: standard, level: 200, default_deadline_ms: 1500, share: 0.3}}
  - {{name: sheddable, level: 100, default_deadline_ms: 1000, share: 0.2, max_queue: 200}}
tenants:
  - {{name: demo, api_key_sha256: {hash_api_key('cp-demo-key')}, default_class: standard,
      allowed_classes: [critical, sheddable], rate: 100000, burst: 100000}}
  - {{name: other, api_key_sha256: {hash_api_key('cp-other-key')}, default_class: standard,
      rate: 100000, burst: 100000}}
  - {{name: slow, api_key_sha256: {hash_api_key('cp-slow-key')}, default_class: sheddable, rate: 2, burst: 2}}
gateway:
  workers: 1  # the bursts, limits and ladder timings below are sized for one gateway process
  admin_token_sha256: {hash_api_key('cp-admin-key')}
  concurrency: {{initial: 4, max: 4}}
  ladder: {{backlog_high: 8, backlog_low: 0, up_after_s: 0.5, down_after_s: 1.0}}
  # Shard-bound control only: the gateway's own overload manager would act on how loaded the test machine is
  # (test_overload.py tests it with deterministic pressure).
  overload: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def flow_stack(run_dir: Path):
    with stack_of(SPEC, run_dir, "flow-test") as running:
        yield running


def work_body(values: list[float], work_ms: float = 20) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(values)], "data": values}],
                       "parameters": {"work_ms": work_ms}}).encode()


def call(stack: RunningStack, coroutine_factory):
    async def run():
        client = HttpClient.for_url(stack.gateway)
        try:
            return await coroutine_factory(client)
        finally:
            client.close()

    return asyncio.run(run())


def infer(client: HttpClient, headers: dict, body: bytes | None = None):
    return client.request("POST", "/v2/models/work/infer", body or work_body([1.0]),
                          {"Content-Type": "application/json", **headers})


def test_identity_and_class_permissions(flow_stack: RunningStack) -> None:
    async def scenario(client: HttpClient):
        return [await infer(client, {}), await infer(client, {"Authorization": "Bearer nope"}),
                await infer(client, {**SLOW, "x-priority": "critical"}),
                await infer(client, {**DEMO, "x-priority": "gold"}),
                await infer(client, {**DEMO, "x-deadline-ms": "soon"}),
                await infer(client, {**DEMO, "x-priority": "critical"})]

    no_key, bad_key, above, unknown_class, bad_deadline, ok = call(flow_stack, scenario)
    assert no_key.status == 401 and b"API key is required" in no_key.body
    assert bad_key.status == 401 and b"unknown API key" in bad_key.body
    assert above.status == 403 and b"may not use class 'critical'" in above.body
    assert unknown_class.status == 400 and bad_deadline.status == 400
    assert ok.status == 200 and json.loads(ok.body)["outputs"][0]["data"] == [1.0]


def test_token_bucket_sheds_with_retry_after(flow_stack: RunningStack) -> None:
    async def scenario(client: HttpClient):
        await asyncio.sleep(1.1)  # let the bucket (2/s, burst 2) refill from earlier tests
        return [await infer(client, SLOW) for _ in range(4)]

    responses = call(flow_stack, scenario)
    statuses = [r.status for r in responses]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    refused = next(r for r in responses if r.status == 429)
    assert int(refused.headers[b"retry-after"]) >= 1 and b"over its rate of 2 requests/s" in refused.body


def test_tenants_only_ever_see_their_own_data(flow_stack: RunningStack) -> None:
    async def one(client: HttpClient, headers: dict, value: float):
        response = await infer(client, headers, work_body([value, value], work_ms=5))
        return value, json.loads(response.body)["outputs"][0]["data"]

    async def scenario(client: HttpClient):
        return await asyncio.gather(*(one(client, DEMO if i % 2 else OTHER, float(i)) for i in range(60)))

    for sent, received in call(flow_stack, scenario):
        assert received == [sent, sent]


def burst(stack: RunningStack, sheddable: int, critical: int, work_ms: float = 20
          ) -> list[tuple[str, int, float, str]]:
    """Send a burst far over capacity; (class, status, seconds, error message or "") per request."""
    async def one(client: HttpClient, cls: str, delay: float):
        await asyncio.sleep(delay)
        started = time.monotonic()
        response = await infer(client, {**DEMO, "x-priority": cls}, work_body([1.0], work_ms))
        error = json.loads(response.body)["error"] if response.status != 200 else ""
        return cls, response.status, time.monotonic() - started, error

    async def scenario(client: HttpClient):
        jobs = [one(client, "sheddable", 0.0) for _ in range(sheddable)]
        jobs += [one(client, "critical", 0.02 * i) for i in range(critical)]  # critical trickles in during the flood
        return await asyncio.gather(*jobs)

    return call(stack, scenario)


def test_overload_burst_keeps_critical_fast_and_sheds_the_rest_early(flow_stack: RunningStack) -> None:
    results = burst(flow_stack, sheddable=600, critical=40)
    by_class = {cls: Counter(status for c, status, _, _ in results if c == cls) for cls in ("critical", "sheddable")}
    assert by_class["critical"] == {200: 40}  # every critical request succeeds...
    assert max(t for c, _, t, _ in results if c == "critical") < 3.0  # ...within its deadline
    assert by_class["sheddable"][429] > 100 and set(by_class["sheddable"]) <= {200, 429}
    assert all(status < 500 for _, status, _, _ in results)
    # Most sheds are answered on arrival (queue full, deadline out of reach) or when displaced, not after a
    # wait that used up their deadline (what the clock says depends on how loaded the machine is; this does not).
    sheds = [error for _, status, _, error in results if status == 429]
    assert sum("passed while queued" in error for error in sheds) < len(sheds) / 2, Counter(sheds).most_common(4)


def admin(stack: RunningStack, method: str, path: str, headers: dict):
    return call(stack, lambda client: client.request(method, path, b"", headers))


def test_admin_needs_the_token_and_drains_a_shard(flow_stack: RunningStack) -> None:
    assert admin(flow_stack, "GET", "/admin/queues", {}).status == 401
    assert admin(flow_stack, "GET", "/admin/queues", {"Authorization": "Bearer wrong"}).status == 403
    queues = json.loads(admin(flow_stack, "GET", "/admin/queues", ADMIN).body)
    assert [c["class"] for c in queues["classes"]] == ["critical", "standard", "sheddable"]
    assert {s["name"] for s in queues["shards"]} >= {"main-0", "main-1"}
    drained = admin(flow_stack, "POST", "/admin/shards/main-0/drain", ADMIN)
    assert drained.status == 200 and json.loads(drained.body)["draining"] is True
    served_before = {s["name"]: s["served"] for s in json.loads(admin(flow_stack, "GET", "/admin/queues", ADMIN)
                                                                  .body)["shards"]}
    statuses = call(flow_stack, lambda client: asyncio.gather(*(infer(client, DEMO) for _ in range(20))))
    assert all(r.status == 200 for r in statuses)
    served_after = {s["name"]: s["served"] for s in json.loads(admin(flow_stack, "GET", "/admin/queues", ADMIN)
                                                                 .body)["shards"]}
    assert served_after["main-0"] == served_before["main-0"]  # drained: no new request went there
    assert sum(served_after.values()) == sum(served_before.values()) + 20
    assert admin(flow_stack, "POST", "/admin/shards/main-0/undrain", ADMIN).status == 200


def test_metrics_count_admissions_sheds_and_latency(flow_stack: RunningStack) -> None:
    text = admin(flow_stack, "GET", "/metrics", {}).body.decode()
    assert 'cp_requests_total{class="critical",outcome="completed",tenant="demo"}' in text
    assert 'cp_shed_total{class="sheddable",reason=' in text
    assert 'cp_latency_seconds_bucket{class="critical",le="0.1"}' in text
    assert 'cp_shard_concurrency_limit{shard="main-0"}' in text and "cp_ladder_step" in text


def test_standby_shard_wakes_under_sustained_backlog_and_retires_after(flow_stack: RunningStack) -> None:
    def standby_state() -> str:
        return next(s["state"] for s in flow_stack.state()["shards"] if s["name"] == "main-2")

    deadline = time.monotonic() + 20
    while standby_state() != "stopped":  # an earlier burst may have woken it: wait for its release
        assert time.monotonic() < deadline, "the standby shard was not released after an earlier burst"
        time.sleep(0.2)

    async def sustained(client: HttpClient):
        deadline = time.monotonic() + 4.0
        woke = False

        async def sender():
            nonlocal woke
            while time.monotonic() < deadline and not woke:
                await infer(client, {**DEMO, "x-priority": "sheddable"}, work_body([1.0], 50))

        async def watcher():
            nonlocal woke
            while time.monotonic() < deadline and not woke:
                await asyncio.sleep(0.2)
                queues = json.loads((await client.request("GET", "/admin/queues", b"", ADMIN)).body)
                woke = any(s["name"] == "main-2" for s in queues["shards"])

        await asyncio.gather(watcher(), *(sender() for _ in range(60)))
        return woke

    assert call(flow_stack, sustained), "the standby shard did not join under sustained backlog"
    deadline = time.monotonic() + 20
    while standby_state() != "stopped":  # backlog gone: after down_after_s the ladder steps down
        assert time.monotonic() < deadline, "the standby shard was not released"
        time.sleep(0.2)


RISK_BODY = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 16],
                                    "data": [0.5] * 16}]}).encode()


def test_sheddable_traffic_moves_to_the_cheaper_variant_under_sustained_backlog(flow_stack: RunningStack) -> None:
    async def scenario(client: HttpClient):
        stop = time.monotonic() + 10
        answered_by: dict[str, set[str]] = {"sheddable": set(), "critical": set()}

        async def flood():
            while time.monotonic() < stop and "risk_lite" not in answered_by["sheddable"]:
                await infer(client, {**DEMO, "x-priority": "sheddable"}, work_body([1.0], 50))

        async def probe():
            while time.monotonic() < stop and "risk_lite" not in answered_by["sheddable"]:
                for cls in ("sheddable", "critical"):
                    response = await client.request("POST", "/v2/models/risk/infer", RISK_BODY,
                                                    {**DEMO, "x-priority": cls, "x-deadline-ms": "5000"})
                    if response.status == 200:
                        answered_by[cls].add(json.loads(response.body)["model_name"])
                await asyncio.sleep(0.05)

        await asyncio.gather(probe(), *(flood() for _ in range(60)))
        ladder = json.loads((await client.request("GET", "/admin/queues", b"", ADMIN)).body)["ladder"]
        return answered_by, ladder

    answered_by, ladder = call(flow_stack, scenario)
    assert "risk_lite" in answered_by["sheddable"], f"no sheddable request went to the variant: {ladder}"
    assert answered_by["critical"] == {"risk"}  # only the lowest class is degraded
    assert any(step["step"] == 2 for step in ladder["history"])


def test_shard_killed_mid_load_leaves_the_pool_and_no_request_fails(flow_stack: RunningStack) -> None:
    victim = flow_stack.shard_pids()["main-1"]

    async def scenario(client: HttpClient):
        async def one(i: int):
            await asyncio.sleep(0.005 * i)
            response = await infer(client, {**DEMO, "x-priority": "critical"}, work_body([1.0], 10))
            return response.status

        async def killer():
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)

        results = await asyncio.gather(killer(), *(one(i) for i in range(200)))
        return results[1:]

    statuses = Counter(call(flow_stack, scenario))
    assert statuses == {200: 200}
    deadline = time.monotonic() + 30
    while flow_stack.shard_pids().get("main-1") in (None, victim):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_class_and_deadline_become_triton_priority_and_timeout() -> None:
    body = json.dumps({"inputs": [], "parameters": {"work_ms": 3}}).encode() + b"\x00" * 8
    checked = InferHeader(json.loads(body[:-8]), len(body) - 8, 1.0)
    rewritten, header_length = checked.with_parameters(body, {"priority": 1, "timeout": 250000})
    assert json.loads(rewritten[:header_length])["parameters"] == {"work_ms": 3, "priority": 1, "timeout": 250000}
    assert rewritten[header_length:] == b"\x00" * 8


def test_triton_rejects_a_request_whose_propagated_timeout_expires_in_its_queue(flow_stack: RunningStack) -> None:
    """The `work` model's queue policy honours the `timeout` the gateway sets: a request whose remaining
    deadline is shorter than its wait behind busy instances is rejected by Triton itself."""
    shard = next(s["url"] for s in flow_stack.state()["shards"] if s["state"] == "ready")

    async def scenario():
        client = HttpClient.for_url(shard)
        try:
            def body(parameters: dict, width: int) -> bytes:
                tensor = {"name": "x", "datatype": "FP32", "shape": [1, width], "data": [1.0] * width}
                return json.dumps({"inputs": [tensor], "parameters": parameters}).encode()
            # both instances busy for 300 ms (requests of different shapes are never batched together)
            busy = [asyncio.ensure_future(client.request("POST", "/v2/models/work/infer", body({"work_ms": 300}, w)))
                    for w in (1, 2)]
            await asyncio.sleep(0.05)
            expired = await client.request("POST", "/v2/models/work/infer",
                                           body({"work_ms": 0, "priority": 1, "timeout": 1000}, 3))
            served = await client.request("POST", "/v2/models/work/infer",
                                          body({"work_ms": 0, "priority": 1, "timeout": 5_000_000}, 3))
            await asyncio.gather(*busy)
            return expired, served
        finally:
            client.close()

    expired, served = asyncio.run(scenario())
    assert served.status == 200
    assert expired.status == 503 and b"timeout" in expired.body.lower()
