"""The gateway on many cores (`gateway.workers: 2`): real worker processes on one port, real Triton shards.

What must be global holds across workers: a tenant's rate, the queue bounds (split), admin actions, /metrics.
Clients open many connections because the kernel spreads connections (not requests) over the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.bench.client import HttpClient
from controlplane.gateway.admission import LocalBuckets
from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gateway.shared_buckets import SharedBuckets
from controlplane.gateway.worker import merge_overload
from controlplane.gateway.workers import partition_spec
from controlplane.spec import hash_api_key, parse_spec

from .conftest import ROOT, RunningStack, stack_of

DEMO = {"Authorization": "Bearer cp-demo-key", "Content-Type": "application/json"}
CAPPED = {"Authorization": "Bearer cp-capped-key", "Content-Type": "application/json"}
ADMIN = {"Authorization": "Bearer cp-admin-key"}
CONNECTIONS = 40  # the kernel hashes each connection to a worker: 40 miss one of 2 workers with p = 2^-39
BURST, RATE = 12, 0.5

SPEC = f"""
cluster: workers-test
model_repository: {ROOT / 'examples' / 'models'}
node_pools: [{{name: local, provider: existing, instance_type: this-machine}}]
models:
  - {{name: work, path: work, memory_mb: 32, instance_count: 2, max_batch: 64}}
shards:
  - {{name: main, models: [work], replicas: 2, standby: 1}}
priority_classes:
  - {{name: critical, level: 300, default_deadline_ms: 3000, share: 0.5, max_queue: 51, max_queue_bytes: 100001}}
  - {{name: standard, level: 200, default_deadline_ms: 3000, share: 0.5}}
tenants:
  - {{name: demo, api_key_sha256: {hash_api_key('cp-demo-key')}, default_class: standard,
      allowed_classes: [critical], rate: 100000, burst: 100000}}
  - {{name: capped, api_key_sha256: {hash_api_key('cp-capped-key')}, default_class: standard,
      rate: {RATE}, burst: {BURST}}}
gateway:
  workers: 2
  admin_token_sha256: {hash_api_key('cp-admin-key')}
  concurrency: {{initial: 5, max: 9}}
  ladder: {{backlog_high: 6, backlog_low: 0, up_after_s: 1.0, down_after_s: 0.5}}
  limits: {{max_queued_requests: 101, max_queued_bytes: 1000001}}
"""
WORK = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
                   "parameters": {"work_ms": 1}}).encode()


@pytest.fixture(scope="module")
def workers_stack(run_dir: Path):
    with stack_of(SPEC, run_dir, "workers-test") as running:
        yield running


def run(coroutine):  # noqa: ANN001, ANN201
    return asyncio.run(coroutine)


async def on_many_connections(stack: RunningStack, headers: dict, per_connection: int = 1) -> list[int]:
    """`per_connection` requests on each of CONNECTIONS keep-alive connections, all at once; the statuses."""
    async def one_connection() -> list[int]:
        client = HttpClient.for_url(stack.gateway)  # used sequentially: one connection
        try:
            return [(await client.request("POST", "/v2/models/work/infer", WORK, headers)).status
                    for _ in range(per_connection)]
        finally:
            client.close()

    results = await asyncio.gather(*(one_connection() for _ in range(CONNECTIONS)))
    return [status for statuses in results for status in statuses]


def get(stack: RunningStack, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, bytes]:
    async def once() -> tuple[int, bytes]:
        client = HttpClient.for_url(stack.gateway)
        try:
            response = await client.request(method, path, b"", headers or {})
            return response.status, response.body
        finally:
            client.close()

    return run(once())


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match[1] or "") for k, v in labels.items()):
            total += float(match[2])
    return total


def scrape(stack: RunningStack) -> str:
    status, body = get(stack, "/metrics")
    assert status == 200
    return body.decode()


def served_by_worker(text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'^cp_worker_http_responses_total{worker="(\d+)"} (\S+)$',
                                                    text, re.M)}


def queues(stack: RunningStack) -> dict:
    status, body = get(stack, "/admin/queues", ADMIN)
    assert status == 200
    return json.loads(body)


# --- with real worker processes ------------------------------------------------------------------------------

def test_a_tenant_rate_is_global_across_workers(workers_stack: RunningStack) -> None:
    before = served_by_worker(scrape(workers_stack))
    started = time.monotonic()
    statuses = run(on_many_connections(workers_stack, CAPPED, per_connection=2))
    elapsed = time.monotonic() - started
    after = served_by_worker(scrape(workers_stack))
    assert all(after[w] > before.get(w, 0) for w in ("0", "1")), "both workers must have answered requests"
    granted = statuses.count(200)
    # one bucket for both workers: burst + rate x elapsed at most (two per-worker buckets would grant ~2 x burst)
    assert BURST <= granted <= BURST + RATE * elapsed, (granted, elapsed)
    assert statuses.count(429) == len(statuses) - granted


def test_connections_spread_over_both_workers_and_metrics_count_every_request(workers_stack: RunningStack) -> None:
    before = scrape(workers_stack)
    statuses = run(on_many_connections(workers_stack, DEMO, per_connection=3))
    assert statuses == [200] * (3 * CONNECTIONS)
    after = scrape(workers_stack)
    completed = {text: metric(text, "cp_requests_total", tenant="demo", outcome="completed")
                 for text in (before, after)}
    assert completed[after] - completed[before] == 3 * CONNECTIONS  # the sum over both workers, any worker asked
    spread = {w: served_by_worker(after)[w] - served_by_worker(before).get(w, 0) for w in ("0", "1")}
    assert all(n > 0 for n in spread.values()), spread
    assert metric(after, "cp_gateway_workers") == 2
    histogram = metric(after, "cp_latency_seconds_count", **{"class": "standard"})
    assert histogram - metric(before, "cp_latency_seconds_count", **{"class": "standard"}) == 3 * CONNECTIONS


def test_drain_through_one_worker_reaches_every_worker(workers_stack: RunningStack) -> None:
    status, body = get(workers_stack, "/admin/shards/main-0/drain", ADMIN, method="POST")
    assert status == 200 and json.loads(body) == {"shard": "main-0", "draining": True, "in_flight": 0, "workers": 2}
    try:
        view = queues(workers_stack)
        assert [next(s["draining"] for s in w["shards"] if s["name"] == "main-0") for w in view["workers"]] == \
            [True, True]
        served = {s["name"]: s["served"] for s in view["shards"]}
        assert run(on_many_connections(workers_stack, DEMO)) == [200] * CONNECTIONS
        after = {s["name"]: s["served"] for s in queues(workers_stack)["shards"]}
        assert after["main-0"] == served["main-0"]  # no connection, whichever worker it reached, used main-0
        assert sum(after.values()) == sum(served.values()) + CONNECTIONS
    finally:
        status, body = get(workers_stack, "/admin/shards/main-0/undrain", ADMIN, method="POST")
    assert status == 200 and json.loads(body)["workers"] == 2
    assert get(workers_stack, "/admin/shards/nope/drain", ADMIN, method="POST")[0] == 404


def test_queue_and_concurrency_bounds_are_the_spec_split_between_workers(workers_stack: RunningStack) -> None:
    bounds = [w["bounds"] for w in queues(workers_stack)["workers"]]
    assert len(bounds) == 2
    assert sorted(b["max_queued_requests"] for b in bounds) == [50, 51]  # 101 in total, never more
    assert sum(b["max_queued_bytes"] for b in bounds) == 1000001
    assert sorted(b["classes"]["critical"][0] for b in bounds) == [25, 26]
    assert sum(b["classes"]["critical"][1] for b in bounds) == 100001
    assert [b["concurrency"] for b in bounds] == [[2, 4], [2, 4]]  # initial 5 // 2, max 9 // 2


def test_status_lists_every_worker(workers_stack: RunningStack) -> None:
    result = subprocess.run([sys.executable, "-m", "controlplane.cli", "status", "-f", str(workers_stack.spec),
                             "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    workers = json.loads(result.stdout)["workers"]
    assert [(w["index"], w["alive"]) for w in workers] == [(0, True), (1, True)]
    assert {w["pid"] for w in workers} == set(workers_stack.worker_pids().values())
    assert workers_stack.process.pid not in {w["pid"] for w in workers}


def test_the_ladder_sees_the_backlog_of_all_workers_and_wakes_the_standby_shard(workers_stack: RunningStack
                                                                               ) -> None:
    slow = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}],
                       "parameters": {"work_ms": 50}}).encode()

    async def flood() -> dict:
        deadline = time.monotonic() + 15
        seen: dict = {}

        async def sender() -> None:
            client = HttpClient.for_url(workers_stack.gateway)
            try:
                while not seen and time.monotonic() < deadline:
                    await client.request("POST", "/v2/models/work/infer", slow, DEMO)
            finally:
                client.close()

        async def watcher() -> None:
            client = HttpClient.for_url(workers_stack.gateway)
            try:
                while not seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    view = json.loads((await client.request("GET", "/admin/queues", b"", ADMIN)).body)
                    if any(s["name"] == "main-2" for s in view["shards"]):
                        seen.update(view)
            finally:
                client.close()

        await asyncio.gather(watcher(), *(sender() for _ in range(CONNECTIONS)))
        return seen

    view = run(flood())
    # 16 slots over 2 workers and 40 connections: ~24 queued in all, above backlog_high in the sum
    assert view, "the standby shard did not join under sustained backlog"
    assert view["ladder"]["step"] >= 1 and any(h["step"] == 1 for h in view["ladder"]["history"])
    assert all(any(s["name"] == "main-2" for s in w["shards"]) for w in view["workers"])  # pushed to every worker
    assert next(s for s in workers_stack.state()["shards"] if s["name"] == "main-2")["state"] == "ready"


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(workers_stack: RunningStack) -> None:
    assert get(workers_stack, "/admin/shards/main-0/drain", ADMIN, method="POST")[0] == 200
    victim = workers_stack.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    # Reaped by the supervisor: by then all its threads are gone, and with them its listening socket (a
    # zombie leader alone does not say so; connections in a dying worker's queue are reset).
    while Path(f"/proc/{victim}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # new connections all go to the other worker meanwhile
    assert run(on_many_connections(workers_stack, DEMO)) == [200] * CONNECTIONS
    while workers_stack.worker_pids().get(0) in (None, victim) or \
            not all(w["alive"] for w in workers_stack.state()["workers"]):
        assert time.monotonic() < deadline, f"worker 0 was not restarted: {workers_stack.state()['workers']}"
        time.sleep(0.05)
    assert workers_stack.state()["workers"][0]["restarts"] == 1
    before = served_by_worker(scrape(workers_stack))
    served = {s["name"]: s["served"] for s in queues(workers_stack)["shards"]}
    assert run(on_many_connections(workers_stack, DEMO)) == [200] * CONNECTIONS
    after = served_by_worker(scrape(workers_stack))
    assert all(after[w] > before.get(w, 0) for w in ("0", "1")), "the restarted worker takes connections again"
    # the drain from before the kill holds in the new worker too (the supervisor replays it)
    view = queues(workers_stack)
    assert all(next(s["draining"] for s in w["shards"] if s["name"] == "main-0") for w in view["workers"])
    assert {s["name"]: s["served"] for s in view["shards"]}.get("main-0", 0) == served.get("main-0", 0)
    assert get(workers_stack, "/admin/shards/main-0/undrain", ADMIN, method="POST")[0] == 200


# --- the pieces, without a stack ---------------------------------------------------------------------------------

def test_partition_gives_every_worker_a_share_and_the_shares_add_up_to_the_spec() -> None:
    spec = parse_spec(SPEC)
    parts = [partition_spec(spec, i, 3) for i in range(3)]
    assert sum(p.gateway.limits.max_queued_requests for p in parts) == 101
    assert sum(p.gateway.limits.max_queued_bytes for p in parts) == 1000001
    assert [p.priority_classes[0].max_queue for p in parts] == [17, 17, 17]
    assert sum(p.priority_classes[1].max_queue for p in parts) == 1024
    assert all((p.gateway.concurrency.initial, p.gateway.concurrency.max) == (1, 3) for p in parts)
    assert partition_spec(spec, 0, 1) is spec


def test_partition_splits_the_gpu_floor_and_urgent_bound_keeping_one_each() -> None:
    spec = parse_spec(SPEC)
    spec = spec.model_copy(update={"gateway": spec.gateway.model_copy(update={"concurrency": spec.gateway.concurrency
                                   .model_copy(update={"gpu_floor": 24, "urgent_bound": 4})})})
    parts = [partition_spec(spec, i, 6) for i in range(6)]
    assert [(p.gateway.concurrency.gpu_floor, p.gateway.concurrency.urgent_bound) for p in parts] == [(4, 1)] * 6
    assert partition_spec(parse_spec(SPEC), 0, 6).gateway.concurrency.gpu_floor == 0  # unset stays unset


def test_shared_buckets_are_exact_across_processes() -> None:
    """Four processes take from one bucket of 500 as fast as they can: exactly 500 are granted in all."""
    spec = parse_spec(SPEC.replace(f"rate: {RATE}, burst: {BURST}", "rate: 0.001, burst: 500"))
    buckets = SharedBuckets.create(spec.tenants)
    readers = []
    for _ in range(4):
        read_end, write_end = os.pipe()
        if os.fork() == 0:  # a child: take 300 times, write how many were granted
            granted = sum(buckets.take("capped") == 0.0 for _ in range(300))
            os.write(write_end, str(granted).encode())
            os._exit(0)
        os.close(write_end)
        readers.append(read_end)
    granted = []
    for read_end in readers:
        granted.append(int(os.read(read_end, 32)))
        os.close(read_end)
        os.wait()
    buckets.close()
    assert sum(granted) == 500, granted


def test_a_shared_bucket_takes_as_a_local_one_does() -> None:
    spec = parse_spec(SPEC)
    now = [100.0]
    shared, local = SharedBuckets.create(spec.tenants, lambda: now[0]), LocalBuckets(spec.tenants, lambda: now[0])
    for step in (0.0, 0.0, 0.1, 3.0, 0.01, 0.0, 10.0):
        now[0] += step
        for _ in range(5):
            assert shared.take("capped") == pytest.approx(local.take("capped"))
    shared.close()


def test_metrics_of_several_workers_add_up() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.requests["critical", "demo", "completed"] += 3
    two.requests["critical", "demo", "completed"] += 4
    one.latency["critical"].observe(0.003)
    two.latency["critical"].observe(0.003)
    two.latency["critical"].observe(2.0)
    two.retries = 2
    merged = GatewayMetrics()
    merged.absorb(json.loads(json.dumps(one.state())))  # as it travels between processes
    merged.absorb(json.loads(json.dumps(two.state())))
    overload = merge_overload([
        {"level": 0, "refused_below_level": None, "pressure": {"lag": 0.2, "cpu": 0.5}, "held_connections": 0,
         "connections": 3, "actions": [{"action": "connection_held", "class": "low", "count": 2}]},
        {"level": 1, "refused_below_level": 100, "pressure": {"lag": 0.9, "cpu": 0.4}, "held_connections": 4,
         "connections": 5, "actions": [{"action": "connection_held", "class": "low", "count": 3}]}, None])
    text = merged.render([], [], 0, overload, workers=[{"worker": 0, "responses": 5, "connections": 1},
                                                       {"worker": 1, "responses": 6, "connections": 0}]).decode()
    assert metric(text, "cp_requests_total", outcome="completed") == 7
    assert metric(text, "cp_latency_seconds_bucket", le="0.005") == 2
    assert metric(text, "cp_latency_seconds_count") == 3
    assert metric(text, "cp_latency_seconds_sum") == pytest.approx(2.006)
    assert metric(text, "cp_retries_total") == 2
    assert metric(text, "cp_worker_http_responses_total", worker="1") == 6
    # overload: each worker protects itself, so the view shows the worst worker and adds what they did
    assert metric(text, "cp_overload_level") == 1 and metric(text, "cp_overload_pressure", monitor="lag") == 0.9
    assert metric(text, "cp_overload_held_connections") == 4
    assert metric(text, "cp_overload_actions_total", action="connection_held") == 5
