"""The gateway on many cores: N worker processes on one port, run by the supervising process.

The supervising process (`cpctl up` / `cpctl gateway`, which owns the shard backend) reserves the port
(a bound SO_REUSEPORT socket, so port 0 becomes a fixed free port before any worker starts), then starts N
workers (`python -m controlplane.gateway.worker`) through `procs.ManagedProcess`. Each worker binds the same
host:port with SO_REUSEPORT and runs its own uvloop event loop with its own GatewayApp, Router and
GatewayServer; the kernel spreads connections over them by a hash of the connection's addresses. A
socketpair per worker carries length-prefixed orjson messages (`channel.py`); nothing is written to disk.

What is global, and how (N = the number of workers):
- Tenant token buckets: GLOBAL and exact. One shared memory region (memfd + mmap, passed to every worker)
  holds each tenant's (tokens, updated) under a per-tenant fcntl record lock (`shared_buckets.py`): a
  tenant gets at most burst + rate x t requests in t seconds across all workers, like nginx's limit_req
  shared zone. Cost 1.4 us a take (3.7 us contended) against 0.3 us in one process.
- Queue bounds: PARTITIONED, so they hold in total. Worker i gets its share of `max_queued_requests`,
  `max_queued_bytes` and every class's `max_queue` / `max_queue_bytes` (total // N, the remainder to the first
  workers): the shares add up to the spec's bounds exactly, so the sum of the queues can never exceed them.
  The price: one worker may shed while another has room (connections are not spread perfectly evenly).
- Shard concurrency: PARTITIONED. Each worker runs its own adaptive (AIMD) limit per shard, starting from
  `concurrency.initial` // N and capped at `concurrency.max` // N (at least 1 each), so the limits add up to
  at most the spec's (or N, when `max` is below N). Strict priority at the shard holds across workers
  through Triton's own `priority` parameter, which every worker sets per request from the class. Client
  and upstream connection bounds (`max_connections`, `upstream_connections_per_shard`) are split the same way.
- Shard endpoints: the supervisor subscribes to the shard backend and pushes every new set to every worker.
- Degradation ladder: runs HERE, on the sum of the queue depths every worker reports each tick (0.1 s), so
  it sees the global backlog, and the standby action happens where the shards are; workers follow its step.
- Admin actions: POST /admin/shards/NAME/drain|undrain on any worker is sent to every worker and answered
  after every live worker applied it, and handed to the shard backend (in Kubernetes it takes the pod out
  of its Service, for every gateway replica); the drained set is replayed to a worker that restarts.
- Views: /metrics and GET /admin/queues on any worker ask the supervisor to gather a fresh snapshot from
  every worker, then merge them (counters add, histograms add bucket-wise, queue depths and in-flight
  requests add; per-worker facts carry a `worker` label, and /admin/queues lists each worker's own view).
- The overload manager is per worker: each protects its own event loop, CPU, memory and connections
  (`overload.connection_budget` is per worker), and refuses a class only while it saw a higher class itself
  (`protect_window_s`); the merged views show the worst worker's level and pressures.
- Retry budgets, the scheduler's rate estimates, ejections and the cache of model signatures are per worker.

A worker that exits (or stops reporting for WORKER_SILENT_S) is killed with its process group and started
again after a back-off; connections it had accepted are lost, new ones go to the others meanwhile. Stopping
stops every worker; each also dies with the supervisor (PR_SET_PDEATHSIG) or when its channel closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.gateway.channel import Channel
from controlplane.gateway.ladder import DegradationLadder
from controlplane.gateway.shared_buckets import SharedBuckets
from controlplane.procs import ManagedProcess
from controlplane.shards.base import Endpoint
from controlplane.spec import ClusterSpec

log = logging.getLogger(__name__)

TICK_S = 0.1  # how often workers report their backlog and the ladder looks at the sum
START_TIMEOUT_S = 30.0
ASK_TIMEOUT_S = 3.0  # one worker's answer to a gather or an admin action
WORKER_SILENT_S = 10.0  # a worker that has not reported for this long is taken as hung, and restarted
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
STABLE_AFTER_S = 30.0


def share_of(total: int, index: int, count: int) -> int:
    """Worker `index`'s part of `total` split between `count` workers; the parts add up to `total`."""
    return total // count + (1 if index < total % count else 0)


def partition_spec(spec: ClusterSpec, index: int, count: int) -> ClusterSpec:
    """The spec as worker `index` of `count` applies it: its share of every queue, connection and
    concurrency bound (see the module docstring)."""
    if count == 1:
        return spec
    gateway, limits, concurrency = spec.gateway, spec.gateway.limits, spec.gateway.concurrency
    limits = limits.model_copy(update={
        "max_queued_requests": share_of(limits.max_queued_requests, index, count),
        "max_queued_bytes": share_of(limits.max_queued_bytes, index, count),
        "max_connections": max(1, share_of(limits.max_connections, index, count)),
        "upstream_connections_per_shard": max(1, share_of(limits.upstream_connections_per_shard, index, count)),
    })
    most = max(1, concurrency.max // count)
    concurrency = concurrency.model_copy(update={
        "initial": min(most, max(1, concurrency.initial // count)), "max": most,
        "min": min(concurrency.min, most),
        # the GPU floor and urgent bound are totals too; a worker keeps at least 1 of one that is set
        "gpu_floor": concurrency.gpu_floor and max(1, concurrency.gpu_floor // count),
        "urgent_bound": concurrency.urgent_bound and max(1, concurrency.urgent_bound // count),
    })
    classes = [c.model_copy(update={"max_queue": share_of(c.max_queue, index, count),
                                    "max_queue_bytes": share_of(c.max_queue_bytes, index, count)})
               for c in spec.priority_classes]
    pipelines = []
    for pipeline in spec.pipelines:  # the stages' KV cache places, split like the queues
        places = share_of(pipeline.max_sequences, index, count)
        reserved = min(share_of(pipeline.reserved_for_top_class, index, count), max(0, places - 1))
        steps = pipeline.max_steps_per_stage and max(1, share_of(pipeline.max_steps_per_stage, index, count))
        urgent = pipeline.urgent_steps_per_stage  # None (off) and 0 (pause) stay as they are
        urgent = urgent and max(1, share_of(urgent, index, count))
        pipelines.append(pipeline.model_copy(update={"max_sequences": places, "reserved_for_top_class": reserved,
                                                     "max_steps_per_stage": steps, "urgent_steps_per_stage": urgent}))
    return spec.model_copy(update={"priority_classes": classes, "pipelines": pipelines, "gateway": gateway.model_copy(
        update={"limits": limits, "concurrency": concurrency})})


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT but not listening: it holds the port (port 0: picks
    one) for the workers, and takes no connections itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def endpoint_message(endpoints: list[Endpoint]) -> dict:
    return {"op": "endpoints", "endpoints": [
        {"name": e.name, "host": e.host, "port": e.port, "models": sorted(e.models), "standby": e.standby,
         "gpu": e.gpu}
        for e in endpoints]}


@dataclass(eq=False)
class WorkerSlot:
    """Worker `index` and its current process (a new one after each restart)."""

    index: int
    process: ManagedProcess | None = None
    channel: Channel | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    report: dict = field(default_factory=dict)  # the latest tick: backlog and connection counters
    reported_at: float = 0.0
    task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.ready.is_set()


async def _nothing() -> None:
    return None


class WorkerPool:
    """N gateway worker processes on one port, and everything that must be global between them."""

    def __init__(self, spec: ClusterSpec, count: int, set_standby: Callable[[bool], None] | None = None,
                 log_dir: Path | None = None,
                 drain_elsewhere: Callable[[str, bool], Awaitable[bool]] | None = None,
                 read_gpu: Callable[[], Awaitable[dict]] | None = None) -> None:
        """`log_dir`: where each worker's log goes (`cpctl up`); None: to this process's stderr.
        `drain_elsewhere`: the shard backend's side of an admin drain (True if it took the endpoint).
        `read_gpu`: the GPU telemetry /metrics shows (a `controlplane.gpu.telemetry.Telemetry.to_dict()`)."""
        self.spec = spec
        self.read_gpu = read_gpu
        self.drain_elsewhere = drain_elsewhere
        self.count = count
        self.log_dir = log_dir
        self.ladder = DegradationLadder(spec, time.monotonic, set_standby)
        self.buckets = SharedBuckets.create(spec.tenants)
        self.slots = [WorkerSlot(i) for i in range(count)]
        self.endpoints: list[Endpoint] = []
        self.drained: set[str] = set()
        self.reservation: socket.socket | None = None
        self.host = spec.gateway.listen
        self.port = 0
        self._ticker: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Reserve the port, start every worker, return once all serve (the bound port)."""
        self.reservation = reserve_port(host, port)
        self.host, self.port = host, self.reservation.getsockname()[1]
        for slot in self.slots:
            slot.task = asyncio.get_running_loop().create_task(self._supervise(slot), name=f"worker-{slot.index}")
        try:
            await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in self.slots)), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise OSError(f"gateway workers did not start within {START_TIMEOUT_S:.0f} s") from None
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="worker-ticks")
        return self.port

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *(s.task for s in self.slots)) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(asyncio.to_thread(s.process.stop, 5.0) for s in self.slots if s.process))
        for slot in self.slots:
            if slot.channel is not None:
                slot.channel.close()
        if self.reservation is not None:
            self.reservation.close()
            self.reservation = None
        self.buckets.close()

    async def _supervise(self, slot: WorkerSlot) -> None:
        """Run worker `slot` until cancelled: start it, serve its channel, restart it when it dies."""
        backoff = BACKOFF_FIRST_S
        while True:
            started = time.monotonic()
            try:
                await self._run(slot)
            except OSError as exc:
                log.error("gateway worker %d could not start: %s", slot.index, exc)
            finally:
                slot.ready.clear()
            if slot.process is not None:  # its channel closed: it exited, or must go
                await asyncio.to_thread(slot.process.kill)
                log.warning("gateway worker %d (pid %d) exited with %s; restarting in %.1f s", slot.index,
                            slot.process.pid, slot.process.poll(), backoff)
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = BACKOFF_FIRST_S
            slot.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _run(self, slot: WorkerSlot) -> None:
        """One life of a worker: spawn it, hand it its setup, serve its messages until it closes."""
        ours, theirs = socket.socketpair()
        try:
            # Spawned from the event loop's thread: PR_SET_PDEATHSIG follows the thread that forked.
            slot.process = ManagedProcess(
                [sys.executable, "-m", "controlplane.gateway.worker", "--channel-fd", str(theirs.fileno()),
                 "--buckets-fd", str(self.buckets.fd)],
                env=os.environ, pass_fds=(theirs.fileno(), self.buckets.fd), inherit_output=self.log_dir is None,
                log_path=self.log_dir / f"gateway-worker-{slot.index}.log" if self.log_dir else None,
            )
        finally:
            theirs.close()
        slot.channel = await Channel.open(ours, lambda message: self._on_message(slot, message))
        slot.reported_at = time.monotonic()
        # What the worker applies before it listens, so that its first request already sees the shards.
        state = [endpoint_message(self.endpoints), self._ladder_message(),
                 *({"op": "drain", "shard": shard, "draining": True} for shard in sorted(self.drained))]
        slot.channel.send({"op": "init", "spec": self.spec.model_dump(mode="json"), "index": slot.index,
                           "count": self.count, "host": self.host, "port": self.port, "state": state,
                           "log_level": logging.getLogger().getEffectiveLevel()})
        await slot.channel.serve()

    # --- messages from workers ----------------------------------------------------------------------------
    async def _on_message(self, slot: WorkerSlot, message: dict) -> dict | None:
        op = message["op"]
        if op == "ready":
            log.info("gateway worker %d serves (pid %d)", slot.index, message["pid"])
            slot.ready.set()
        elif op == "tick":
            slot.report, slot.reported_at = message, time.monotonic()
        elif op == "gather":
            workers, gpu = await asyncio.gather(self.gather(), self.read_gpu() if self.read_gpu else _nothing())
            return {"workers": workers, "ladder": self.ladder.snapshot(), "gpu": gpu}
        elif op == "drain":
            return await self.drain(message["shard"], message["draining"])
        return None

    async def gather(self) -> list[dict]:
        """A fresh state of every live worker (those that do not answer in time are left out)."""
        live = [s for s in self.slots if s.ready.is_set() and s.channel is not None]
        answers = await asyncio.gather(*(s.channel.ask({"op": "state"}, ASK_TIMEOUT_S) for s in live),
                                       return_exceptions=True)
        return [a for a in answers if isinstance(a, dict)]

    async def drain(self, shard: str, draining: bool) -> dict:
        """Drain (or undrain) a shard in every live worker; answer once all applied it."""
        live = [s for s in self.slots if s.ready.is_set() and s.channel is not None]
        answers = await asyncio.gather(
            *(s.channel.ask({"op": "drain", "shard": shard, "draining": draining}, ASK_TIMEOUT_S) for s in live),
            return_exceptions=True)
        applied = [a for a in answers if isinstance(a, dict) and a.get("found")]
        # The backend may know an endpoint the workers no longer route to (a drained pod left its Service).
        elsewhere = await self.drain_elsewhere(shard, draining) if self.drain_elsewhere is not None else False
        if applied or elsewhere:
            (self.drained.add if draining else self.drained.discard)(shard)
        return {"shard": shard, "draining": draining, "found": bool(applied) or elsewhere, "workers": len(applied),
                "in_flight": sum(a["in_flight"] for a in applied)}

    # --- what the supervisor pushes ---------------------------------------------------------------------------
    def update(self, endpoints: list[Endpoint]) -> None:
        """The shard backend's new endpoint set, to every worker (and to each one that starts later)."""
        self.endpoints = endpoints
        self._broadcast(endpoint_message(endpoints))

    def _ladder_message(self) -> dict:
        return {"op": "ladder", "step": self.ladder.step, "view": self.ladder.snapshot()}

    def _broadcast(self, message: dict) -> None:
        for slot in self.slots:
            if slot.channel is not None and not slot.channel.closed:
                slot.channel.send(message)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            queued: dict[str, int] = {c.name: 0 for c in self.spec.priority_classes}
            for slot in self.slots:
                if slot.ready.is_set() and now - slot.reported_at > WORKER_SILENT_S and slot.process is not None:
                    log.error("gateway worker %d has not reported for %.0f s: restarting it", slot.index,
                              now - slot.reported_at)
                    slot.process.signal_group(signal.SIGKILL)
                for name, count in slot.report.get("queued", {}).items():
                    queued[name] = queued.get(name, 0) + count
            step = self.ladder.step
            self.ladder.tick(queued)
            if self.ladder.step != step:
                self._broadcast(self._ladder_message())

    # --- what `cpctl status` shows -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The workers' latest reports added up (as of the last tick), and each worker's process."""
        reports = [s.report for s in self.slots if s.alive and s.report]
        by_status: dict[int, int] = {}
        queued = {c.name: 0 for c in self.spec.priority_classes}
        for report in reports:
            for code, count in report["by_status"].items():
                by_status[int(code)] = by_status.get(int(code), 0) + count
            for name, count in report["queued"].items():
                queued[name] += count
        return {
            "requests": sum(r["requests"] for r in reports),
            "in_flight": sum(r["in_flight"] for r in reports),
            "connections": sum(r["connections"] for r in reports),
            "by_status": by_status,
            "queued": queued,
            "ladder_step": self.ladder.step,
            "workers": [{"index": s.index, "pid": s.process.pid if s.process else None, "alive": s.alive,
                         "restarts": s.restarts} for s in self.slots],
        }

