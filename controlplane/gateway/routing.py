"""Which shard takes a request: the live endpoint set, per-model candidates, least outstanding requests.

The shard backend pushes the full set of ready endpoints on every change (`update`). Between those pushes
the gateway also learns from its own traffic: a shard that refused a connection or dropped one before
answering is avoided for `SUSPECT_S` while other candidates exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from controlplane.gateway.upstream import UpstreamPool
from controlplane.shards.base import Endpoint

SUSPECT_S = 1.0


@dataclass(eq=False)
class Target:
    """A ready endpoint as the gateway tracks it."""

    endpoint: Endpoint
    pool: UpstreamPool
    outstanding: int = 0
    suspect_until: float = 0.0
    served: int = 0
    failures: int = 0

    @property
    def name(self) -> str:
        return self.endpoint.name


class Router:
    def __init__(self, max_idle_per_shard: int = 256) -> None:
        self.max_idle_per_shard = max_idle_per_shard
        self.targets: dict[tuple[str, int], Target] = {}
        self.by_model: dict[str, list[Target]] = {}
        self._turn = 0

    def update(self, endpoints: list[Endpoint]) -> None:
        """Replace the endpoint set; connections to endpoints that stay are kept."""
        fresh: dict[tuple[str, int], Target] = {}
        for endpoint in endpoints:
            key = (endpoint.host, endpoint.port)
            target = self.targets.pop(key, None)
            if target is None or target.endpoint.models != endpoint.models:
                target = Target(endpoint, UpstreamPool(endpoint.host, endpoint.port, self.max_idle_per_shard))
            target.endpoint = endpoint
            fresh[key] = target
        for gone in self.targets.values():
            gone.pool.close()
        self.targets = fresh
        by_model: dict[str, list[Target]] = {}
        for target in fresh.values():
            for model in target.endpoint.models:
                by_model.setdefault(model, []).append(target)
        self.by_model = by_model

    def has_ready(self, model: str) -> bool:
        return bool(self.by_model.get(model))

    def pick(self, model: str, exclude: Target | None = None) -> Target | None:
        """The candidate with the fewest requests in flight, healthy ones first; ties rotate."""
        candidates = [t for t in self.by_model.get(model, ()) if t is not exclude]
        if not candidates:
            return None
        now = time.monotonic()
        healthy = [t for t in candidates if t.suspect_until <= now] or candidates
        self._turn += 1
        start = self._turn % len(healthy)
        best = None
        for i in range(len(healthy)):
            target = healthy[(start + i) % len(healthy)]
            if best is None or target.outstanding < best.outstanding:
                best = target
        return best

    def mark_failed(self, target: Target) -> None:
        target.failures += 1
        target.suspect_until = time.monotonic() + SUSPECT_S

    def close(self) -> None:
        for target in self.targets.values():
            target.pool.close()
        self.targets = {}
        self.by_model = {}
