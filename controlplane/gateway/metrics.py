"""Prometheus metrics of the gateway, served at /metrics.

Per class and tenant: requests by outcome, sheds by reason; per class: queue depth, queue wait and
end-to-end latency; per shard: in flight, concurrency limit, ejections, served; the degradation ladder's step; GPU
telemetry (per GPU or MIG instance, per shard, the models' CUDA allocators: controlplane/gpu/telemetry.py)
when the supervisor reads it.

The request path only bumps plain integers (prometheus-client's own Counter and Histogram take a lock per
call, a measurable share of the gateway's time per request); a collector turns them into metric families
when /metrics is scraped. Each gateway has its own registry, so several can run in one process.

Several worker processes: each exports its numbers (`state`, plain JSON) when /metrics is asked for, and the
worker that answers adds them up (`absorb`): counters add, histograms add bucket by bucket, queue depths and
shards' in-flight requests and limits add; per-worker facts carry a `worker` label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Bucket counts and a sum, updated without locks (the gateway runs on one event loop)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative, out = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (class, tenant, outcome)
        self.shed: dict[tuple[str, str, str], int] = defaultdict(int)  # (class, tenant, reason)
        self.queue_wait: dict[str, Histogram] = defaultdict(Histogram)  # by class
        self.latency: dict[str, Histogram] = defaultdict(Histogram)  # by class
        self.retries = 0
        # pipeline steps by (pipeline, class): [sent, held at the step gate, seconds waited there]
        self.pipeline_steps: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0.0])
        self._state: tuple[list[dict], list[dict], int, dict | None, list[dict], dict | None] = (
            [], [], 0, None, [], None)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def state(self) -> dict:
        """The counters and histograms as JSON-able data, for another process to `absorb`."""
        return {"requests": [[*labels, value] for labels, value in self.requests.items()],
                "shed": [[*labels, value] for labels, value in self.shed.items()],
                "queue_wait": {label: [h.counts, h.total] for label, h in self.queue_wait.items()},
                "latency": {label: [h.counts, h.total] for label, h in self.latency.items()},
                "retries": self.retries,
                "pipeline_steps": [[*labels, *values] for labels, values in self.pipeline_steps.items()]}

    def absorb(self, state: dict) -> None:
        """Add another gateway's `state` to these numbers."""
        for *labels, value in state["requests"]:
            self.requests[tuple(labels)] += value
        for *labels, value in state["shed"]:
            self.shed[tuple(labels)] += value
        for mine, theirs in ((self.queue_wait, state["queue_wait"]), (self.latency, state["latency"])):
            for label, (counts, total) in theirs.items():
                histogram = mine[label]
                histogram.counts = [a + b for a, b in zip(histogram.counts, counts, strict=True)]
                histogram.total += total
        self.retries += state["retries"]
        for pipeline, cls, *values in state["pipeline_steps"]:
            counts = self.pipeline_steps[(pipeline, cls)]
            counts[:] = [a + b for a, b in zip(counts, values, strict=True)]

    def count_step(self, pipeline: str, cls: str, held: bool, waited_s: float) -> None:
        """A pipeline step sent to its stage, after `waited_s` at the step gate (`held`: it had to wait there)."""
        counts = self.pipeline_steps[(pipeline, cls)]
        counts[0] += 1
        if held:
            counts[1] += 1
            counts[2] += waited_s

    def render(self, bands: list[dict], shards: list[dict], ladder_step: int, overload: dict | None = None,
               workers: Sequence[dict] = (), gpu: dict | None = None) -> bytes:
        """The exposition text; `workers` (several processes): [{"worker", "responses", "connections"}];
        `gpu`: a `Telemetry.to_dict()`."""
        self._state = (bands, shards, ladder_step, overload, list(workers), gpu)
        return generate_latest(self.registry)

    def collect(self):  # noqa: ANN201 - the prometheus-client collector protocol
        bands, shards, ladder_step, overload, workers, gpu = self._state
        requests = CounterMetricFamily("cp_requests", "Requests by class, tenant and outcome (admitted, completed, "
                                       "failed, shed).", labels=["class", "tenant", "outcome"])
        for labels, value in self.requests.items():
            requests.add_metric(labels, value)
        yield requests
        shed = CounterMetricFamily("cp_shed", "Requests shed, by reason (rate, queue_full, displaced, deadline, "
                                   "overload).", labels=["class", "tenant", "reason"])
        for labels, value in self.shed.items():
            shed.add_metric(labels, value)
        yield shed
        for name, documentation, histograms in (
            ("cp_queue_wait_seconds", "Time admitted requests waited in the gateway before dispatch: its queue, and "
             "unread in a connection held while the gateway was overloaded.", self.queue_wait),
            ("cp_latency_seconds", "End-to-end latency of completed requests.", self.latency),
        ):
            family = HistogramMetricFamily(name, documentation, labels=["class"])
            for label, histogram in histograms.items():
                family.add_metric([label], histogram.buckets(), histogram.total)
            yield family
        for index, (name, documentation) in enumerate((
            ("cp_pipeline_steps", "Pipeline steps sent to a stage, by pipeline and class."),
            ("cp_pipeline_steps_held", "Pipeline steps held at the step gate (max_steps_per_stage, "
             "urgent_steps_per_stage, one_batch_per_stage) before they were sent."),
            ("cp_pipeline_gate_wait_seconds", "Time pipeline steps waited at the step gate."),
        )):
            family = CounterMetricFamily(name, documentation, labels=["pipeline", "class"])
            for labels, values in self.pipeline_steps.items():
                family.add_metric(labels, values[index])
            yield family
        yield CounterMetricFamily("cp_retries", "Requests retried on another shard after a failure.",
                                  value=self.retries)
        depth = GaugeMetricFamily("cp_queue_depth", "Requests waiting, by class.", labels=["class"])
        for band in bands:
            depth.add_metric([band["class"]], band["queued"])
        yield depth
        for name, key, documentation in (
            ("cp_shard_in_flight", "in_flight", "Requests in flight per shard."),
            ("cp_shard_concurrency_limit", "limit", "Adaptive concurrency limit per shard."),
            ("cp_shard_urgent_room", "urgent_room", "Requests the classes below the top one may have in flight per "
             "shard while the top class is active (adapted to the top class's latency there)."),
            ("cp_shard_ejections", "ejections", "Times a shard was ejected since it joined."),
            ("cp_shard_served", "served", "Requests (pipeline steps included) a shard answered since it joined."),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["shard"])
            for shard in shards:
                family.add_metric([shard["name"]], shard[key])
            yield family
        yield GaugeMetricFamily("cp_ladder_step", "Degradation ladder step: 0 normal, 1 standby shards awake, "
                                "2 lowest class on cheaper variants.", value=ladder_step)
        if overload is not None:
            yield from overload_families(overload)
        if workers:
            yield GaugeMetricFamily("cp_gateway_workers", "Gateway worker processes that answered this scrape.",
                                    value=len(workers))
            served = CounterMetricFamily("cp_worker_http_responses", "HTTP responses each gateway worker sent "
                                         "(refusals included).", labels=["worker"])
            connections = GaugeMetricFamily("cp_worker_connections", "Client connections open per gateway worker.",
                                            labels=["worker"])
            for worker in workers:
                served.add_metric([str(worker["worker"])], worker["responses"])
                connections.add_metric([str(worker["worker"])], worker["connections"])
            yield served
            yield connections
        if gpu is not None:
            yield from gpu_families(gpu)


def overload_families(overload: dict):  # noqa: ANN201 - metric families
    """The overload manager's state and every action it took (controlplane/gateway/overload.py)."""
    yield GaugeMetricFamily("cp_overload_level", "Gateway overload level: 0 normal, 1 lowest class refused, 2 all "
                            "classes but the highest refused.", value=overload["level"])
    pressure = GaugeMetricFamily("cp_overload_pressure", "Gateway saturation by monitor (0..1).", labels=["monitor"])
    for monitor, value in overload["pressure"].items():
        pressure.add_metric([monitor], value)
    yield pressure
    yield GaugeMetricFamily("cp_overload_held_connections", "Client connections not read while overloaded.",
                            value=overload["held_connections"])
    actions = CounterMetricFamily("cp_overload_actions", "Overload actions: refused_after_headers, "
                                  "connection_held, connection_released, keepalive_withdrawn, connection_refused, "
                                  "held_connection_closed.", labels=["action", "class"])
    for action in overload["actions"]:
        actions.add_metric([action["action"], action["class"]], action["count"])
    yield actions


DEVICE_LABELS = ["gpu", "device", "kind", "name"]


def gpu_families(telemetry: dict):  # noqa: ANN201 - metric families
    """GPU telemetry (a `controlplane.gpu.telemetry.Telemetry.to_dict()`): NVML per GPU or MIG instance, and per
    shard what its Triton and its models report."""
    yield GaugeMetricFamily("cp_gpu_available", "1 when NVML read GPUs on the gateway's machine, 0 when it found "
                            "none (no driver, no GPU, no nvidia-ml-py).", value=0 if telemetry["no_gpu"] else 1)
    utilization = GaugeMetricFamily("cp_gpu_utilization_ratio", "GPU utilization (0..1) per GPU, from NVML; none "
                                    "for a MIG instance (NVML has no per-instance utilization).", labels=DEVICE_LABELS)
    used = GaugeMetricFamily("cp_gpu_memory_used_bytes", "GPU memory used per GPU or MIG instance, from NVML.",
                             labels=DEVICE_LABELS)
    total = GaugeMetricFamily("cp_gpu_memory_total_bytes", "GPU memory per GPU or MIG instance, from NVML.",
                              labels=DEVICE_LABELS)
    for device in telemetry["devices"]:
        labels = [str(device["gpu"]), device["uuid"], device["kind"], device["name"]]
        if device["utilization"] is not None:
            utilization.add_metric(labels, device["utilization"])
        used.add_metric(labels, device["memory_used_bytes"])
        total.add_metric(labels, device["memory_total_bytes"])
    yield from (utilization, used, total)
    up = GaugeMetricFamily("cp_shard_metrics_up", "1 when the shard's Triton metrics port answered this scrape.",
                           labels=["shard"])
    shard_gauges = {key: GaugeMetricFamily(name, documentation, labels=["shard", "device"]) for key, name, documentation
                    in (("utilization", "cp_shard_gpu_utilization_ratio", "GPU utilization (0..1) as the shard's "
                         "Triton reports it (nv_gpu_utilization)."),
                        ("memory_used_bytes", "cp_shard_gpu_memory_used_bytes", "GPU memory used as the shard's "
                         "Triton reports it (nv_gpu_memory_used_bytes)."),
                        ("memory_total_bytes", "cp_shard_gpu_memory_total_bytes", "GPU memory as the shard's "
                         "Triton reports it (nv_gpu_memory_total_bytes)."))}
    allocator_labels = ["shard", "model", "device"]
    reserved = GaugeMetricFamily("cp_shard_cuda_reserved_bytes", "Bytes the CUDA caching allocator holds in a "
                                 "model's process (torch.cuda.memory_reserved).", labels=allocator_labels)
    allocated = GaugeMetricFamily("cp_shard_cuda_allocated_bytes", "Bytes of live tensors in a model's process "
                                  "(torch.cuda.memory_allocated).", labels=allocator_labels)
    fragmentation = GaugeMetricFamily("cp_shard_cuda_fragmentation_ratio", "CUDA allocator fragmentation of a "
                                      "model's process: reserved but unallocated over reserved.",
                                      labels=allocator_labels)
    for shard in telemetry["shards"]:
        up.add_metric([shard["shard"]], 1 if shard["up"] else 0)
        for gpu in shard["gpus"]:
            for key, family in shard_gauges.items():
                if key in gpu:
                    family.add_metric([shard["shard"], gpu["uuid"]], gpu[key])
        for allocator in shard["allocators"]:
            labels = [shard["shard"], allocator["model"], allocator["device"]]
            reserved.add_metric(labels, allocator["reserved_bytes"])
            allocated.add_metric(labels, allocator["allocated_bytes"])
            fragmentation.add_metric(labels, allocator["fragmentation"])
    yield up
    yield from shard_gauges.values()
    yield from (reserved, allocated, fragmentation)
