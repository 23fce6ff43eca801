"""The `static` shard backend: Triton servers that something else runs (existing hosts, a cluster without
the `kubernetes` backend).

A JSON file lists them (`[{"name", "host", "port", "models"}]`). Each is probed for readiness every
`probe_interval_s`; the ready ones are the endpoint set. The file is read again when it changes, so a
rolled ConfigMap takes effect without a restart.
Nothing is started or stopped here: standby capacity is the orchestrator's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

from controlplane.shards.base import Endpoint, ShardBackend, ShardStatus, probe_ready

log = logging.getLogger(__name__)


class EndpointsFileError(ValueError):
    pass


def read_endpoints(path: Path) -> list[Endpoint]:
    """Parse an endpoints file; errors name the file and the entry."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EndpointsFileError(f"{path}: cannot read a JSON list of endpoints: {exc}") from None
    if not isinstance(entries, list):
        raise EndpointsFileError(f"{path}: expected a JSON list of endpoints")
    endpoints = []
    for i, entry in enumerate(entries):
        try:
            endpoints.append(Endpoint(str(entry["name"]), str(entry["host"]), int(entry["port"]),
                                      frozenset(str(m) for m in entry["models"]), gpu=bool(entry.get("gpu"))))
        except (KeyError, TypeError, ValueError) as exc:
            raise EndpointsFileError(f"{path}: entry {i} needs name, host, port and models ({exc})") from None
    return endpoints


class StaticShards(ShardBackend):
    def __init__(self, path: Path, probe_interval_s: float = 1.0) -> None:
        super().__init__()
        self.path = path
        self.probe_interval_s = probe_interval_s
        self.known: list[Endpoint] = read_endpoints(path)
        self.mtime = path.stat().st_mtime
        self.ready: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._probe_all()
        self.task = asyncio.get_running_loop().create_task(self._watch(), name="static-shards")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            with contextlib.suppress(OSError):
                mtime = self.path.stat().st_mtime
                if mtime != self.mtime:
                    try:
                        self.known = read_endpoints(self.path)
                        log.info("endpoints file changed: %d endpoints", len(self.known))
                    except EndpointsFileError as exc:
                        log.error("%s (keeping the previous endpoints)", exc)
                    self.mtime = mtime
            await self._probe_all()

    async def _probe_all(self) -> None:
        results = await asyncio.gather(*(self._probe(e) for e in self.known))
        ready = {e.name for e, ok in zip(self.known, results, strict=True) if ok}
        if ready != self.ready:
            self.ready = ready
            self._notify()

    async def _probe(self, endpoint: Endpoint) -> bool:
        return await probe_ready(endpoint.host, endpoint.port, timeout_s=self.probe_interval_s)

    async def set_standby_active(self, shard: str, count: int) -> None:
        log.info("standby of %s asked for (%d): the orchestrator scales static endpoints", shard, count)

    def status(self) -> list[ShardStatus]:
        return [ShardStatus(name=e.name, shard=e.name, url=e.url, models=sorted(e.models),
                            state="ready" if e.name in self.ready else "unready") for e in self.known]

    def endpoints(self) -> list[Endpoint]:
        return [e for e in self.known if e.name in self.ready]
