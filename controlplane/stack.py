"""The runtime that serves: a spec's shard backend behind the gateway (`cpctl up` and `cpctl gateway`).

The gateway runs as worker processes on one port that this process supervises (`gateway/workers.py`), one
or more: this process owns the shard backend and never serves requests itself. Nothing here writes to disk:
the run state of `cpctl up` (controlplane/runstate.py) is its caller's business, told through `on_change`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from controlplane.gateway.workers import WorkerPool
from controlplane.shards.base import Endpoint, ShardBackend
from controlplane.spec import ClusterSpec


class ServingStack:
    """The gateway in front of a shard backend (local processes, static endpoints, ...)."""

    def __init__(self, spec: ClusterSpec, shards: ShardBackend, port: int | None = None, *,
                 worker_log_dir: Path | None = None, on_change: Callable[[], None] | None = None) -> None:
        """`worker_log_dir`: where gateway workers log (`cpctl up`); None: to this process's stderr (in-cluster).
        `on_change`: called when the endpoint set changes once the gateway serves."""
        self.spec = spec
        self.port = spec.gateway.port if port is None else port
        self.shards = shards
        self.gateway = WorkerPool(spec, spec.gateway.worker_count(), self._set_standby, log_dir=worker_log_dir,
                                  drain_elsewhere=shards.set_draining, read_gpu=self.gpu_telemetry)
        self.on_change = on_change
        self.url = ""
        self._standby_changes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.shards.start()
        self.shards.subscribe(self._on_endpoints)
        try:
            port = await self.gateway.start(self.spec.gateway.listen, self.port)
        except OSError as exc:
            await self.shards.stop()
            raise OSError(f"gateway cannot listen on {self.spec.gateway.listen}:{self.port}: "
                          f"{exc.strerror or exc}") from None
        self.url = f"http://{self.spec.gateway.listen}:{port}"

    async def stop(self) -> None:
        await self.gateway.stop()
        for change in list(self._standby_changes):
            change.cancel()
        await self.shards.stop()

    def _set_standby(self, active: bool) -> None:
        """The ladder's step 1: run (or release) every shard's standby replicas."""
        for shard in self.spec.shards:
            if shard.standby:
                change = asyncio.get_running_loop().create_task(
                    self.shards.set_standby_active(shard.name, shard.standby if active else 0))
                self._standby_changes.add(change)
                change.add_done_callback(self._standby_changes.discard)

    def _on_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.gateway.update(endpoints)
        if self.url and self.on_change is not None:
            self.on_change()

    async def gpu_telemetry(self) -> dict:
        """The GPUs of this machine (NVML) and what each running shard's Triton and models report of theirs
        (a stopped standby replica is not scraped: it is not down, it is not running)."""
        from controlplane.gpu.telemetry import read_telemetry

        running = [(s.name, s.metrics_url) for s in self.shards.status() if s.metrics_url]
        telemetry = await read_telemetry(running)
        return telemetry.to_dict()

    def snapshot(self) -> dict:
        gateway = self.gateway.snapshot()
        gateway["by_status"] = dict(sorted(gateway["by_status"].items()))
        return {
            "cluster": self.spec.cluster,
            "pid": os.getpid(),
            "gateway": self.url,
            **gateway,
            "shards": [dataclasses.asdict(s) for s in self.shards.status()],
        }
