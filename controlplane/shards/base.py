"""One interface for running Triton shards; the gateway only ever sees the live set of endpoints.

A backend (`local`: processes on this machine; `static`: a file of addresses; `kubernetes`: EndpointSlices
of the shard Services and the standby Deployments) starts
the shard replicas a spec asks for, keeps them running, and tells subscribers whenever the set of ready
endpoints changes. Subscribers get the whole set each time (not deltas), so a missed call loses nothing.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """One Triton server the gateway may send requests to."""

    name: str  # replica name, e.g. "main-0"
    host: str
    port: int
    models: frozenset[str]
    standby: bool = False
    gpu: bool = False  # it serves on a GPU: the gateway's concurrency floor and urgent bound apply (spec.Concurrency)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 pod address
        return f"http://{host}:{self.port}"


async def probe_ready(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """The one shard health probe (backends, the gateway's ejection probe, `cpctl status`): True when the
    Triton server at host:port answers 200 to GET /v2/health/ready within the timeout, on a fresh connection."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: triton\r\nConnection: close\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), timeout_s)
        return status_line.split(b" ", 2)[1:2] == [b"200"]
    except (TimeoutError, OSError, IndexError):
        return False
    finally:
        if writer is not None:
            writer.close()


@dataclass
class ShardStatus:
    """What `status()` reports about one replica."""

    name: str
    shard: str
    url: str | None
    state: str  # starting | ready | unready | restarting | stopping | stopped | failed
    models: list[str]
    pid: int | None = None
    restarts: int = 0
    standby: bool = False
    last_error: str | None = None
    metrics_url: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"


EndpointListener = Callable[[list[Endpoint]], None]


class ShardBackend(abc.ABC):
    """Starts, supervises and stops the Triton shards of one spec."""

    def __init__(self) -> None:
        self._listeners: list[EndpointListener] = []

    def subscribe(self, listener: EndpointListener) -> None:
        """Call `listener(endpoints)` now and after every change of the ready set."""
        self._listeners.append(listener)
        listener(self.endpoints())

    def _notify(self) -> None:
        endpoints = self.endpoints()
        for listener in self._listeners:
            listener(endpoints)

    @abc.abstractmethod
    async def start(self) -> None:
        """Start every replica and return once all are ready (raise if one cannot start)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every replica; nothing the backend started is left running."""

    @abc.abstractmethod
    def status(self) -> list[ShardStatus]:
        """The state of every replica, standby ones included."""

    @abc.abstractmethod
    def endpoints(self) -> list[Endpoint]:
        """The replicas that are ready to take requests now."""

    @abc.abstractmethod
    async def set_standby_active(self, shard: str, count: int) -> None:
        """Run `count` of a shard's standby replicas (0 releases them all)."""

    async def set_draining(self, name: str, draining: bool) -> bool:
        """Tell the orchestrator that endpoint `name` is drained (or no longer); True if it took it. The
        gateway drains the endpoint itself either way; only an orchestrator that other gateways also follow
        (Kubernetes) has something to do here."""
        return False
