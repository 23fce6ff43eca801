"""One gateway worker process: its own event loop, GatewayApp, Router and GatewayServer on the shared port.

Started by `workers.WorkerPool` as `python -m controlplane.gateway.worker --channel-fd N --buckets-fd M`:
N is its end of a socketpair to the supervisor, M the shared memory of the tenant buckets. The first
message on the channel is its setup (the spec, its index, the port, and the endpoint set, ladder step and
drained shards as they are now, applied before it listens); it applies its share of the spec's bounds
(`workers.partition_spec`), follows the endpoint sets and the ladder step the supervisor pushes, and
reports its backlog every tick. The routes whose answer must cover every worker (/metrics, GET
/admin/queues, POST /admin/shards/NAME/drain|undrain) are answered here through the supervisor; every other
request goes to this worker's GatewayApp as it would in a single process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import orjson

from controlplane.gateway.admission import Refused
from controlplane.gateway.app import ADMIN_SHARD_ROUTE, GatewayApp
from controlplane.gateway.channel import Channel, ChannelClosed, read_message
from controlplane.gateway.errors import send_error
from controlplane.gateway.ladder import LadderSteps
from controlplane.gateway.metrics import GatewayMetrics
from controlplane.gateway.routing import Router
from controlplane.gateway.server import Cancellable, ClientConnection, GatewayServer, Request, json_error
from controlplane.gateway.shared_buckets import SharedBuckets
from controlplane.gateway.workers import ASK_TIMEOUT_S, TICK_S, partition_spec
from controlplane.shards.base import Endpoint
from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

GATHER_TIMEOUT_S = 2 * ASK_TIMEOUT_S  # the supervisor waits up to ASK_TIMEOUT_S for each worker, in parallel
PROMETHEUS_TEXT = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]

Answered = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, body, headers of a view or admin action
Answer = Coroutine[Any, Any, Answered]


class FollowedLadder(LadderSteps):
    """The degradation ladder as this worker sees it: the step the supervisor decides on the global backlog."""

    def __init__(self) -> None:
        self.step = 0
        self.view: dict = {"step": 0, "name": "normal", "steps": [0], "history": []}

    def tick(self, queued_per_class: dict[str, int]) -> None:
        """The supervisor's ladder climbs; this worker's backlog reaches it in the tick reports."""

    def snapshot(self) -> dict:
        return self.view


class GatewayWorker:
    def __init__(self, spec: ClusterSpec, index: int, count: int, buckets: SharedBuckets) -> None:
        self.index = index
        self.spec = partition_spec(spec, index, count)
        gateway = self.spec.gateway
        self.router = Router(gateway.concurrency, gateway.ejection, gateway.retry_budget,
                             gateway.limits.upstream_connections_per_shard)
        self.app = GatewayApp(self.spec, self.router)
        if count > 1:  # a tenant's rate holds across all workers (one worker keeps its buckets in-process)
            self.app.admission.buckets = buckets
        self.ladder = FollowedLadder()
        self.app.ladder = self.ladder  # the supervisor's ladder decides; see workers.py
        self.app.other_routes = self.handle_views
        self.server = GatewayServer(self.app, gateway.limits)
        self.app.serve_on(self.server)  # admission right after the headers, and this worker's overload manager
        self.channel: Channel | None = None
        self.answering: set[asyncio.Task[None]] = set()

    # --- HTTP: the routes that speak for every worker ---------------------------------------------------------
    def handle_views(self, request: Request, conn: ClientConnection) -> Cancellable | None:
        """The paths that are not model routes (the app answers those itself): the views and admin actions of all
        workers here, the rest as in one process."""
        path, method = request.path, request.method
        if path == "/metrics":
            return self.answer(conn, self.metrics())
        if path == "/admin/queues" and method == b"GET":
            return self.answer(conn, self.queues(), request)
        match = ADMIN_SHARD_ROUTE.match(path)
        if match is not None and method == b"POST":
            return self.answer(conn, self.drain(match), request)
        self.app.server_route(request, conn)
        return None

    def answer(self, conn: ClientConnection, work: Answer, admin: Request | None = None) -> asyncio.Task[None]:
        """Answer with `work` (a coroutine giving status, body, headers) once the supervisor replied; an admin
        request's token is checked first. The task is what the server cancels if the client leaves."""
        task = asyncio.get_running_loop().create_task(self._answer(conn, work, admin))
        self.answering.add(task)
        task.add_done_callback(self.answering.discard)
        return task

    async def _answer(self, conn: ClientConnection, work: Answer, admin: Request | None) -> None:
        try:
            if admin is not None:
                self.app.admission.admin_ok(admin.headers, self.spec.gateway.admin_token_sha256)
            status, body, headers = await work
        except Refused as refused:
            send_error(conn, refused)
        except (ChannelClosed, TimeoutError):
            conn.send_json(503, json_error("the gateway's supervisor did not answer; retry"), [(b"retry-after", b"1")])
        except Exception:
            log.exception("%s failed", admin.path if admin else "/metrics")
            conn.fail()
        else:
            conn.send(status, body, headers)
        finally:
            work.close()  # never started when the token was refused

    async def gather(self) -> dict:
        return await self.channel.ask({"op": "gather"}, GATHER_TIMEOUT_S)

    async def metrics(self) -> Answered:
        gathered = await self.gather()
        states = gathered["workers"]
        merged = GatewayMetrics()
        for state in states:
            merged.absorb(state["metrics"])
        body = merged.render(merge_classes(states), merge_shards(states), gathered["ladder"]["step"],
                             merge_overload([s["overload"] for s in states]),
                             [{"worker": s["worker"], **s["counters"]} for s in states], gathered.get("gpu"))
        return 200, body, PROMETHEUS_TEXT

    async def queues(self) -> Answered:
        gathered = await self.gather()
        states = gathered["workers"]
        view = {"classes": merge_classes(states), "shards": merge_shards(states), "ladder": gathered["ladder"],
                "overload": merge_overload([s["overload"] for s in states]),
                "service_rate": round(sum(s["service_rate"] for s in states), 1), "answered_by": self.index,
                "workers": [{key: s[key] for key in ("worker", "pid", "classes", "shards", "overload",
                                                     "service_rate", "counters", "bounds")} for s in states]}
        return 200, orjson.dumps(view), [(b"content-type", b"application/json")]

    async def drain(self, match: re.Match[str]) -> Answered:
        result = await self.channel.ask({"op": "drain", "shard": match["shard"],
                                         "draining": match["action"] == "drain"}, GATHER_TIMEOUT_S)
        if not result["found"]:
            return 404, json_error(f"no ready shard named '{match['shard']}'"), [(b"content-type",
                                                                                  b"application/json")]
        body = {key: result[key] for key in ("shard", "draining", "in_flight", "workers")}
        return 200, orjson.dumps(body), [(b"content-type", b"application/json")]

    # --- the channel: what the supervisor sends ---------------------------------------------------------------
    async def on_message(self, message: dict) -> dict | None:
        op = message["op"]
        if op == "endpoints":
            self.router.update([Endpoint(e["name"], e["host"], e["port"], frozenset(e["models"]), e["standby"],
                                         e["gpu"]) for e in message["endpoints"]])
        elif op == "ladder":
            self.ladder.step, self.ladder.view = message["step"], message["view"]
        elif op == "drain":
            return self.apply_drain(message["shard"], message["draining"])
        elif op == "state":
            return self.state()
        return None

    def apply_drain(self, shard: str, draining: bool) -> dict:
        target = self.router.target_named(shard)
        if target is None:
            return {"found": False}
        target.draining = draining
        if not draining:
            self.app.scheduler.pump()
        return {"found": True, "in_flight": target.outstanding}

    def counters(self) -> dict:
        counters = self.server.counters
        return {"requests": counters.requests, "responses": sum(counters.by_status.values()),
                "in_flight": counters.in_flight,
                "connections": counters.connections, "by_status": counters.by_status}

    def state(self) -> dict:
        scheduler = self.app.scheduler
        return {"worker": self.index, "pid": os.getpid(), "metrics": self.app.metrics.state(),
                "classes": scheduler.snapshot(), "shards": self.router.snapshot(),
                "overload": self.app.overload.snapshot() if self.app.overload else None,
                "service_rate": scheduler.service_rate(), "counters": self.counters(),
                "bounds": {"max_queued_requests": scheduler.max_requests, "max_queued_bytes": scheduler.max_bytes,
                           "classes": {b.name: [b.max_requests, b.max_bytes] for b in scheduler.bands},
                           "concurrency": [self.spec.gateway.concurrency.initial, self.spec.gateway.concurrency.max]}}

    async def report(self) -> None:
        """Every tick: this worker's backlog (for the supervisor's ladder) and its connection counters."""
        while True:
            await asyncio.sleep(TICK_S)
            self.channel.send({"op": "tick", "queued": {b.name: b.count for b in self.app.scheduler.bands},
                               **self.counters()})


def merge_classes(states: list[dict]) -> list[dict]:
    """The class queues of all workers as one: depths, bytes and per-tenant counts add."""
    merged: dict[str, dict] = {}
    for state in states:
        for band in state["classes"]:
            into = merged.setdefault(band["class"], {"class": band["class"], "level": band["level"], "queued": 0,
                                                     "bytes": 0, "tenants": {}})
            into["queued"] += band["queued"]
            into["bytes"] += band["bytes"]
            for tenant, count in band["tenants"].items():
                into["tenants"][tenant] = into["tenants"].get(tenant, 0) + count
    return list(merged.values())


def merge_shards(states: list[dict]) -> list[dict]:
    """Each shard as all workers see it together: in flight, limits (each worker's part) and counts add."""
    merged: dict[str, dict] = {}
    for state in states:
        for shard in state["shards"]:
            into = merged.get(shard["name"])
            if into is None:
                merged[shard["name"]] = dict(shard)
                continue
            for key in ("in_flight", "served", "failures", "ejections"):
                into[key] += shard[key]
            for key in ("limit", "urgent_room"):
                into[key] = round(into[key] + shard[key], 2)
            into["baseline_ms"] = min(into["baseline_ms"], shard["baseline_ms"]) or max(into["baseline_ms"],
                                                                                       shard["baseline_ms"])
            into["draining"] = into["draining"] and shard["draining"]
            into["probing"] = into["probing"] or shard["probing"]
            into["ejected_for_s"] = max(into["ejected_for_s"], shard["ejected_for_s"])
    return list(merged.values())


def merge_overload(snapshots: list[dict | None]) -> dict | None:
    """The overload managers of all workers as one: the worst level and pressures (each worker protects
    itself), held connections and actions added."""
    present = [s for s in snapshots if s]
    if not present:
        return None
    worst = max(present, key=lambda s: s["level"])
    pressure: dict[str, float] = {}
    actions: dict[tuple[str, str], int] = {}
    for snapshot in present:
        for monitor, value in snapshot["pressure"].items():
            pressure[monitor] = max(pressure.get(monitor, 0.0), value)
        for action in snapshot["actions"]:
            key = (action["action"], action["class"])
            actions[key] = actions.get(key, 0) + action["count"]
    return {"level": worst["level"], "refused_below_level": worst["refused_below_level"], "pressure": pressure,
            "held_connections": sum(s["held_connections"] for s in present),
            "connections": sum(s["connections"] for s in present),
            "actions": [{"action": a, "class": c, "count": n} for (a, c), n in sorted(actions.items())]}


async def serve(channel_fd: int, buckets_fd: int) -> None:
    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    setup = await read_message(reader)
    logging.basicConfig(level=setup["log_level"], format=f"%(asctime)s %(levelname)s worker {setup['index']}: "
                        "%(message)s")
    spec = ClusterSpec.model_validate(setup["spec"])
    worker = GatewayWorker(spec, setup["index"], setup["count"], SharedBuckets(buckets_fd, spec.tenants))
    channel = Channel(reader, writer, worker.on_message)
    worker.channel = channel
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listening = channel_task = reporting = None
    try:
        for message in setup["state"]:  # the shards, the ladder's step, drained shards: before listening
            await worker.on_message(message)
        await worker.server.start(setup["host"], setup["port"], reuse_port=True)
        gc.collect()  # what exists now lives as long as the process: out of the collector's full passes
        gc.freeze()
        worker.app.start()
        channel.send({"op": "ready", "pid": os.getpid()})
        channel_task = loop.create_task(channel.serve())  # ends when the supervisor goes away
        reporting = loop.create_task(worker.report())
        listening = loop.create_task(stop.wait())
        await asyncio.wait([channel_task, listening], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (listening, channel_task, reporting):
            if task is not None:
                task.cancel()
        await worker.app.stop()
        await worker.server.stop()
        worker.router.close()
        channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="One gateway worker (started by the gateway's supervisor).")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--buckets-fd", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    asyncio.run(serve(args.channel_fd, args.buckets_fd))


if __name__ == "__main__":
    main()
