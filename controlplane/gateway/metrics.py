"""Prometheus metrics of the gateway, served at /metrics.

Per class and tenant: requests by outcome, sheds by reason; per class: queue depth, queue wait and
end-to-end latency; per shard: in flight, concurrency limit, ejections; the degradation ladder's step.
Each gateway has its own registry (several can run in one process, e.g. in tests). Gauges that mirror
scheduler or router state are set when scraped, so the request path pays only for counters and histograms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cp_requests", "Requests by class, tenant and outcome "
                                "(admitted, completed, failed, shed).", ["class", "tenant", "outcome"], registry=r)
        self.shed = Counter("cp_shed", "Requests shed by flow control, by reason "
                            "(rate, queue_full, displaced, deadline, no_shard).", ["class", "tenant", "reason"],
                            registry=r)
        self.queue_wait = Histogram("cp_queue_wait_seconds", "Time admitted requests waited in the gateway queue.",
                                    ["class"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("cp_latency_seconds", "End-to-end latency of completed requests.", ["class"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("cp_retries", "Requests retried on another shard after a failure.", registry=r)
        self.queue_depth = Gauge("cp_queue_depth", "Requests waiting, by class.", ["class"], registry=r)
        self.shard_in_flight = Gauge("cp_shard_in_flight", "Requests in flight per shard.", ["shard"], registry=r)
        self.shard_limit = Gauge("cp_shard_concurrency_limit", "Adaptive concurrency limit per shard.", ["shard"],
                                 registry=r)
        self.shard_ejections = Gauge("cp_shard_ejections", "Times a shard was ejected since it joined.", ["shard"],
                                     registry=r)
        self.ladder_step = Gauge("cp_ladder_step", "Degradation ladder step: 0 normal, 1 standby shards awake, "
                                 "2 lowest class on cheaper variants.", registry=r)
        self._children: dict[tuple, object] = {}

    def count(self, metric: Counter, *labels: str) -> None:
        """Increment a labelled counter through a cached child (labels() costs more than inc())."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        child.inc()

    def observe(self, metric: Histogram, label: str, value: float) -> None:
        key = (id(metric), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        child.observe(value)

    def render(self, bands: list[dict], shards: list[dict], ladder_step: int) -> bytes:
        for band in bands:
            self.queue_depth.labels(band["class"]).set(band["queued"])
        self.shard_in_flight.clear()
        self.shard_limit.clear()
        self.shard_ejections.clear()
        for shard in shards:
            self.shard_in_flight.labels(shard["name"]).set(shard["in_flight"])
            self.shard_limit.labels(shard["name"]).set(shard["limit"])
            self.shard_ejections.labels(shard["name"]).set(shard["ejections"])
        self.ladder_step.set(ladder_step)
        return generate_latest(self.registry)
