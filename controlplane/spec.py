"""The cluster spec: pydantic models of cluster.yaml, loading and validation.

Every part of the project (gateway, shard runners, MIG planner, Ansible inventory, Pulumi program) reads
the cluster through `load_spec`, so the same names mean the same things everywhere. Each field is
documented where it is declared; these models are the reference for cluster.yaml.

Priority polarity: a class's `level` is "higher is more important" (like a Kubernetes PriorityClass
value). Triton's own `priority` is the opposite (1 is the highest); the gateway converts between them.

Errors from `load_spec` name the file, the line, the field path and what was expected, e.g.
`cluster.yaml:14: models[1].max_batch: Input should be a valid integer (got 'lots')`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from controlplane.gpu.catalog import GPU_MODELS

Name = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$",
        description="Lower-case letters, digits, '-', '_' or '.'; usable as a Kubernetes and Triton name.",
    ),
]


class StrictModel(BaseModel):
    """Base for every spec section: unknown fields are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The GPU models are the catalog's (one list, standard library only); a Literal keeps them in the schema.
GpuModelName = Literal[("none", *GPU_MODELS)]  # type: ignore[valid-type]


class GpuSpec(StrictModel):
    model: GpuModelName = Field(
        "none", description="GPU model of every node in the pool (a name of controlplane/gpu/catalog.py); "
        "'none' for CPU-only nodes."
    )
    per_node: int = Field(0, ge=0, le=16, description="GPUs per node.")


class MigSpec(StrictModel):
    """The MIG layout of every GPU in a pool: a mig-parted named layout, or explicit profiles per GPU."""

    layout: str | None = Field(
        None,
        description="A mig-parted named layout (e.g. 'all-disabled', 'all-1g.10gb', 'all-balanced'), or 'auto': "
        "the planner (`cpctl gpu plan`) chooses each GPU's layout from the shards' demand.",
    )
    profiles: list[str] | None = Field(
        None, description="Explicit MIG profiles for each GPU of the pool, e.g. ['4g.40gb', '3g.40gb']."
    )

    @model_validator(mode="after")
    def _one_of_layout_or_profiles(self) -> MigSpec:
        if (self.layout is None) == (self.profiles is None):
            raise ValueError("give exactly one of 'layout' (a mig-parted name) or 'profiles' (a list)")
        return self


class NodePool(StrictModel):
    name: Name = Field(description="Pool name, referenced by shards.")
    provider: Literal["aws", "azure", "existing"] = Field(description="Where the nodes come from.")
    instance_type: str = Field(
        description="Cloud instance type (e.g. p5.48xlarge, Standard_ND96isr_H100_v5), or a label for existing hosts."
    )
    count: int = Field(1, ge=0, le=1000, description="Number of nodes.")
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="GPUs of each node.")
    fabric: Literal["infiniband", "efa", "roce", "none"] = Field("none", description="The RDMA fabric between nodes.")
    mig: MigSpec | None = Field(None, description="MIG layout; absent means MIG disabled.")
    hosts: list[str] = Field(
        default_factory=list, description="Addresses of existing hosts (provider 'existing' only)."
    )


class Model(StrictModel):
    name: Name = Field(description="Model name as clients call it (the Triton model name).")
    path: str = Field(description="Directory of the model inside the model repository.")
    memory_mb: int = Field(ge=1, description="Device memory one instance of the model needs, in MiB.")
    instance_count: int = Field(1, ge=1, le=64, description="Triton model instances per shard.")
    max_batch: int = Field(0, ge=0, le=65536, description="Largest batch the model accepts (0: no batching).")
    cheaper_variant: Name | None = Field(
        None, description="Another model of this spec that may serve low classes of this model under backlog."
    )
    smaller_batch_variant: Name | None = Field(
        None, description="Another model of this spec: the same network with a smaller max batch, which serves the "
        "lowest class of this model on the ladder's last step (after `cheaper_variant`, if any, was taken)."
    )


class Pipeline(StrictModel):
    """A decoder split into pipeline stages (each a model of `models`, on its own shard), served by the gateway
    as one model: `/generate` and `/generate_stream` of `name`, the gateway driving the token loop."""

    name: Name = Field(description="The model name clients call; must not also be a name in `models`.")
    stages: list[Name] = Field(min_length=1, description="The stage models in order (examples/models/llm_stage "
                               "serves them as `<name>_<k>of<n>`).")
    max_sequences: int = Field(64, ge=1, le=4096, description="Sequences in flight at most: past it a new one is "
                               "refused (429) before its first token. At most the stages' KV cache capacity.")
    max_tokens: int = Field(256, ge=1, le=65536, description="The most tokens a request may ask for.")
    reserved_for_top_class: int = Field(0, ge=0, le=4096, description="Places of `max_sequences` only the highest "
                                        "class may take: a flood of lower classes never fills the pipeline for it.")
    max_steps_per_stage: int = Field(0, ge=0, le=4096, description="Steps in flight at one stage replica at most "
                                     "(0: no bound; the stage's batch is the natural bound): more wait at the "
                                     "gateway in class order, so a critical sequence's step takes the next place. "
                                     "Split among gateway workers like `max_sequences` (each keeps at least 1).")
    urgent_steps_per_stage: int | None = Field(
        None, ge=0, le=4096, description="While a sequence of the top class waits for its first token, steps of the "
        "other classes in flight at one stage replica at most (None: no such bound; 0: they pause); the top class's "
        "own steps are never held. Stages time-slicing one GPU slow each other down, so 0 also gives that GPU to "
        "the critical prefill. Each gateway worker acts on its own sequences.")
    one_batch_per_stage: bool = Field(
        False, description="Steps of the classes but the top one go to a stage replica only while it has no step in "
        "flight, then all that wait at once: the gateway forms the batch, the stage queues none behind the running "
        "one, so a critical step (never held) waits behind at most one batch in progress. Each gateway worker "
        "acts on its own steps; a stage never free of critical steps would hold the others until it is.")
    one_stage_at_a_time: bool = Field(
        False, description="While a sequence of the top class is in flight, the other classes' steps run at one stage "
        "replica of the pipeline at a time, a batch of them once the last has left, where the largest batch waits. "
        "For stages that time-slice one GPU (no MIG): side by side they slow each other down (a batch costs about "
        "the same at any size), so a critical step then finds at most one of them running, and running faster. "
        "Traffic of one class is not affected. Each gateway worker acts on its own steps.")


class Shard(StrictModel):
    """A group of identical Triton servers serving the same models."""

    name: Name = Field(description="Shard name; replicas are named NAME-0, NAME-1, ...")
    models: list[Name] = Field(min_length=1, description="Models this shard serves (names from `models`).")
    pool: Name | None = Field(None, description="Node pool to run on; may be omitted with a single pool.")
    gpu: int | str | None = Field(
        None,
        description="GPU index or MIG device UUID for CUDA_VISIBLE_DEVICES; ignored on a machine without GPUs.",
    )
    mig_profile: str | None = Field(None, description="MIG profile each replica needs, e.g. '1g.10gb'.")
    pinned_memory_mb: int = Field(
        256, ge=0, le=65536, description="Triton's pinned host memory pool (staging of host<->GPU copies), MiB; "
        "used only when the shard runs on a GPU (0 on the CPU).",
    )
    cuda_memory_pool_mb: int = Field(
        256, ge=0, le=262144, description="Triton's CUDA memory pool on the shard's GPU (tensors passed between "
        "Triton and the models on the GPU), MiB; used only when the shard runs on a GPU.",
    )
    priority_class: Name | None = Field(
        None, description="The class this shard mainly serves; placement gives dedicated classes their own GPU slices."
    )
    replicas: int = Field(1, ge=0, le=256, description="Servers always running.")
    standby: int = Field(0, ge=0, le=256, description="Extra servers started only under sustained backlog.")


class PriorityClass(StrictModel):
    name: Name = Field(description="Class name, sent by clients in `x-priority`.")
    level: int = Field(
        ge=0, le=1000, description="Importance: HIGHER is more important. Levels must be distinct."
    )
    default_deadline_ms: int = Field(ge=1, description="Deadline of a request that sends no `x-deadline-ms`.")
    share: float = Field(
        gt=0, le=1, description="Guaranteed minimum share of dispatch when every class is backlogged."
    )
    dedicated: bool = Field(False, description="Placement gives shards of this class MIG instances of their own.")
    max_queue: int = Field(1024, ge=0, description="Requests of this class waiting in the gateway at most.")
    max_queue_bytes: int = Field(64 * 1024 * 1024, ge=0, description="Bytes of request bodies of this class "
                                 "waiting in the gateway at most.")


class Tenant(StrictModel):
    name: Name = Field(description="Tenant name, shown in logs and metrics.")
    api_key_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Hex SHA-256 of the tenant's API key; the key itself is never stored. "
        "Make one with `cpctl hash-key KEY`. None: the tenant has no key (only useful as the anonymous tenant).",
    )
    default_class: Name = Field(description="Class of requests that send no `x-priority`.")
    allowed_classes: list[Name] = Field(
        default_factory=list, description="Classes the tenant may ask for; the default class is always allowed."
    )
    rate: float = Field(gt=0, description="Sustained requests per second.")
    burst: int = Field(ge=1, description="Token bucket size: requests allowed at once above the rate.")


class GatewayLimits(StrictModel):
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body (413 above).")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="Largest request line plus headers (431 above).")
    max_connections: int = Field(4096, ge=1, description="Client connections held at once; more are refused.")
    upstream_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a shard's response when a request carries no deadline."
    )
    idle_timeout_s: float = Field(75.0, gt=0, description="Keep-alive client connections idle this long are closed.")
    upstream_connections_per_shard: int = Field(
        256, ge=1, description="Idle keep-alive connections kept open to each shard."
    )
    max_queued_requests: int = Field(
        4096, ge=0, description="Requests waiting in the gateway, all classes together; when full, an arriving "
        "request displaces a queued one of a lower class, or is shed."
    )
    max_queued_bytes: int = Field(256 * 1024 * 1024, ge=0, description="Body bytes waiting, all classes together.")
    max_deadline_ms: int = Field(600_000, ge=1, description="Largest `x-deadline-ms` a client may ask for.")


class Concurrency(StrictModel):
    """Adaptive concurrency per shard: AIMD on latency against the shard's unloaded latency."""

    initial: int = Field(16, ge=1, description="Requests in flight a new or returning shard starts with.")
    min: int = Field(1, ge=1, description="The limit never goes below this.")
    max: int = Field(256, ge=1, description="The limit never goes above this.")
    tolerance: float = Field(
        2.0, gt=1, description="Latency above this multiple of the unloaded latency (plus `slack_ms`) is overload."
    )
    slack_ms: float = Field(
        50.0, ge=0, description="Absolute latency allowance added to the tolerance: the queueing a shard may add "
        "so that dynamic batching can fill batches. Triton's own priority queue lets higher classes skip it."
    )
    backoff: float = Field(0.9, gt=0, lt=1, description="Multiplicative decrease on overload.")
    gpu_floor: int = Field(
        0, ge=0, description="A shard on a GPU (`gpu` set) may always have this many requests in flight, "
        "whatever its latency says (0: no floor): Triton's dynamic batcher forms batches only out of what is at "
        "the shard, and batching itself raises latency, which the adaptive limit reads as overload. Size it to "
        "fill the preferred batches: instances x preferred batch / images per request (+ one batch queued), "
        "e.g. 3 x 256 / 64 + 4 = 16. For throughput; `urgent_bound` wins over it while the top class is active.")
    urgent_bound: int = Field(
        0, ge=0, description="While requests of the top priority class have been sent within the last second, "
        "requests of the other classes may have at most this many in flight at any one shard (0: no bound), "
        "whatever the limit or floor allow; the top class itself keeps the whole limit. A top-class request then "
        "waits behind at most about this many requests in the shard's queue (on a GPU about one batch: size it to "
        "one preferred batch, e.g. 256 / 16 images a request = 16), not behind every batch the limit lets in, and "
        "the shards' CPU is not spent on a flood of lower classes beyond it. Lower classes give up throughput while "
        "the top class is active. For latency.")
    urgent_tolerance: float = Field(
        0.0, ge=0, description="The other classes' room at a shard also adapts to the top class's latency there "
        "(AIMD, while the top class is active): a top-class answer slower than this multiple of the shard's "
        "unloaded latency (plus `urgent_slack_ms`) cuts that room by `backoff` (at most once a round trip), a "
        "faster one adds one. What the top class waits behind at a shard, in its queue or for its CPU, is then "
        "held near what it waits alone, whatever the bottleneck. It costs the other classes throughput while the "
        "top class is active. 0 (the default): off, only `urgent_bound` and the limit; e.g. 2.0.")
    urgent_slack_ms: float = Field(
        2.0, ge=0, description="Absolute latency allowance for the top class added to `urgent_tolerance`.")
    coalesce_writes: bool = Field(
        True, description="Hold what one turn of the gateway's event loop writes (requests to the shards, whole "
        "responses to clients that keep their connection) until the turn's end, then write it all together: Triton's "
        "dynamic batcher sees the turn's requests at once and runs them as one batch rather than several small ones, "
        "and the processes woken by the writes take the gateway's core once a turn rather than once a request. A "
        "write waits at most the rest of its turn. A request of the top class, where `urgent_bound` or "
        "`urgent_tolerance` protects its latency, is written at once both ways (a flood makes turns long). false: "
        "each is written at once.")
    turn_affinity: bool = Field(
        True, description="With `coalesce_writes`: the requests dispatched during one turn of the event loop go to "
        "the shard the turn's first one took, while it has a free slot, instead of each to the least loaded shard: "
        "they reach one shard together and Triton runs them as one batch. The next turn picks the least loaded "
        "shard again, so the load still evens out over turns. A protected top-class request (see `coalesce_writes`) "
        "takes the least loaded shard.")


class Ejection(StrictModel):
    """A shard that fails or stalls repeatedly leaves the pool for a back-off, then is probed before returning."""

    consecutive_failures: int = Field(3, ge=1, description="Failures in a row that eject a shard.")
    base_s: float = Field(1.0, gt=0, description="First ejection time; doubles on each ejection in a row.")
    max_s: float = Field(30.0, gt=0, description="Longest ejection.")


class Ladder(StrictModel):
    """The degradation ladder: 1) wake standby shards, 2) send the lowest class to cheaper model variants,
    3) and on to smaller-batch variants."""

    backlog_high: int = Field(32, ge=1, description="Queued requests of a class that count as sustained backlog.")
    backlog_low: int = Field(4, ge=0, description="Every class at or below this counts as cleared.")
    up_after_s: float = Field(2.0, gt=0, description="Backlog this long climbs one step.")
    down_after_s: float = Field(10.0, gt=0, description="Cleared this long steps one down.")


class Overload(StrictModel):
    """The gateway's protection of itself when it, not a shard, is the bottleneck
    (controlplane/gateway/overload.py has the model). Pressures are 0..1; the highest monitor counts."""

    enabled: bool = Field(True, description="Watch the gateway's own saturation and act by class.")
    refresh_s: float = Field(0.25, gt=0, description="How often CPU, memory and connections are read.")
    lag_saturated_ms: float = Field(
        1.0, gt=0, description="Event-loop lag that is pressure 1: what any new request waits before the gateway "
        "looks at it, so what the top class may be delayed by the gateway's own load. Measured in the loop's own "
        "clock (uvloop's: whole milliseconds), so 1.0 acts on any lag the loop can see. At 2 ms a gateway-bound flood "
        "raised the top class's P99 5-8x on 2 shared cores; at 1 ms, with `cool_down_s` 6, 1.06x (bench/results/"
        "gateway-limits-2026-12-01-run3.md to -run7.md, overload-2026-12-01-run10.md)."
    )
    max_rss_mb: float = Field(1024.0, gt=0, description="Resident memory of one gateway process that is pressure 1.")
    shed_lowest_at: float = Field(
        0.80, gt=0, le=1, description="Pressure from which the lowest class is refused right after its headers."
    )
    shed_all_but_top_at: float = Field(
        0.95, gt=0, le=1, description="Pressure from which every class but the highest is refused, with keep-alive "
        "withdrawn, and new connections past `connection_budget` are refused."
    )
    hysteresis: float = Field(0.1, ge=0, lt=1, description="A level is left only this far below its threshold...")
    cool_down_s: float = Field(
        6.0, ge=0, description="...and after the pressure stayed there this long. Armed at a level with the pressure "
        "low, nothing more is refused (the refusal quota is 0), but a flood that comes back is refused at the next "
        "refresh instead of after climbing from level 0 again: under a gateway-bound flood the top class's P99 "
        "read x4.0 at 1 s, x2.9 at 3 s, x1.9 at 6 s its P99 alone (bench/results/gateway-limits-2026-12-01-run7.md).")
    protect_window_s: float = Field(
        5.0, gt=0, description="A class is refused only if a higher class was seen this recently (else shedding "
        "would protect nothing)."
    )
    hold_max_s: float = Field(1.5, gt=0, description="A connection not read for overload this long is read again "
                              "(its waiting request is answered, refused if the overload lasts): how long a "
                              "client can wait unanswered. Held connections that come back once the overload has "
                              "passed bring their traffic back with them: at 1 s, often enough to be the top "
                              "class's tail under a flood.")
    connection_budget: int = Field(1024, ge=1, description="Connections per gateway process beyond which new ones "
                                   "are refused at the highest overload level.")
    lowest_class_read: int = Field(
        32, ge=1, description="Connections of the lowest class a gateway process reads at a time while overloaded "
        "with no higher class to protect; the others are held and take turns (one answered is held, the one held "
        "longest read in its place), so the loop's turns stay short and a higher class that arrives is read at "
        "once, not after turns of the whole flood (bench/diagnose/flood_first.py).")


class Gateway(StrictModel):
    listen: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway listens on; 0 picks a free one.")
    allow_anonymous: bool = Field(False, description="Serve requests without an API key as `anonymous_tenant`.")
    anonymous_tenant: Name | None = Field(None, description="Tenant of requests without a key, when allowed.")
    limits: GatewayLimits = Field(default_factory=GatewayLimits, description="Bounds on what clients may send.")
    admin_token_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the token `/admin/...` requires; none: no admin."
    )
    concurrency: Concurrency = Field(default_factory=Concurrency, description="Per-shard adaptive concurrency.")
    ejection: Ejection = Field(default_factory=Ejection, description="Taking failing shards out of the pool.")
    retry_budget: float = Field(
        0.1, ge=0, le=1, description="Retries allowed, as a fraction of requests (a failed request is retried "
        "once, on another shard, only before any response byte)."
    )
    ladder: Ladder = Field(default_factory=Ladder, description="Automatic, reversible degradation under backlog.")
    overload: Overload = Field(default_factory=Overload, description="The gateway's protection of itself.")
    workers: int | None = Field(
        None, ge=1, le=256, description="Gateway processes sharing the port (SO_REUSEPORT), each with its own event "
        "loop. None: one per core this process may run on (its CPU affinity; a container's CPU quota is not "
        "seen, so set it there). The supervising process never serves requests itself. Tenant buckets "
        "are shared exactly; queue bounds and shard concurrency are split between the workers (README, "
        "'The gateway on many cores')."
    )

    def worker_count(self) -> int:
        """How many gateway processes to run: `workers`, or the cores this process may use."""
        return self.workers if self.workers is not None else len(os.sched_getaffinity(0))


class ShardsBackend(StrictModel):
    """How `cpctl gateway` finds Triton shards that something else runs (`cpctl up` always runs its own)."""

    kind: Literal["static", "kubernetes"] = Field(
        "static", description="`static`: a JSON file of shard addresses (`cpctl gateway --endpoints FILE`), probed "
        "for readiness. `kubernetes`: the gateway watches the EndpointSlices of the shard Services (one endpoint "
        "per pod), scales the standby Deployments for the degradation ladder, and maps an admin drain to the "
        "pod's `controlplane.io/serving` label."
    )
    namespace: str = Field(
        "serving", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
        description="`kubernetes`: the namespace of the shard Services, Deployments and pods.",
    )


class ClusterSpec(StrictModel):
    cluster: Name = Field(description="Cluster name.")
    model_repository: str = Field(
        description="Triton model repository; a relative path is relative to the spec file."
    )
    node_pools: list[NodePool] = Field(min_length=1, description="Groups of identical nodes.")
    models: list[Model] = Field(min_length=1, description="Models served.")
    shards: list[Shard] = Field(min_length=1, description="Triton servers and the models each serves.")
    priority_classes: list[PriorityClass] = Field(min_length=1, description="Request classes.")
    tenants: list[Tenant] = Field(default_factory=list, description="Who may call the gateway.")
    gateway: Gateway = Field(default_factory=Gateway, description="The HTTP endpoint clients call.")
    pipelines: list[Pipeline] = Field(default_factory=list, description="Models split into pipeline stages.")
    shards_backend: ShardsBackend = Field(default_factory=ShardsBackend,
                                          description="How `cpctl gateway` finds shards run elsewhere.")

    @model_validator(mode="after")
    def _check_references(self) -> ClusterSpec:
        problems: list[SpecProblem] = []
        for section in ("node_pools", "models", "shards", "priority_classes", "tenants", "pipelines"):
            problems += _duplicate_names(section, getattr(self, section))
        keys: dict[str, str] = {}
        for i, tenant in enumerate(self.tenants):
            if tenant.api_key_sha256 is not None and tenant.api_key_sha256 in keys:
                problems.append(SpecProblem(("tenants", i, "api_key_sha256"),
                                            f"the same key as tenant '{keys[tenant.api_key_sha256]}'"))
            keys.setdefault(tenant.api_key_sha256 or "", tenant.name)

        levels: dict[int, str] = {}
        for i, cls in enumerate(self.priority_classes):
            if cls.level in levels:
                problems.append(
                    SpecProblem(("priority_classes", i, "level"),
                                f"level {cls.level} is also used by class '{levels[cls.level]}'; levels must differ")
                )
            levels[cls.level] = cls.name

        model_names = {m.name for m in self.models}
        pool_names = {p.name for p in self.node_pools}
        class_names = {c.name for c in self.priority_classes}
        tenant_names = {t.name for t in self.tenants}
        for i, model in enumerate(self.models):
            for field in ("cheaper_variant", "smaller_batch_variant"):
                variant = getattr(model, field)
                if variant is not None and variant not in model_names - {model.name}:
                    problems.append(_unknown(("models", i, field), "model", variant, model_names))
        for i, pipeline in enumerate(self.pipelines):
            if pipeline.reserved_for_top_class >= pipeline.max_sequences:
                problems.append(SpecProblem(("pipelines", i, "reserved_for_top_class"),
                                            "must be below max_sequences (other classes need a place)"))
            if pipeline.name in model_names:
                problems.append(SpecProblem(("pipelines", i, "name"), f"'{pipeline.name}' is also a model's name"))
            for j, name in enumerate(pipeline.stages):
                if name not in model_names:
                    problems.append(_unknown(("pipelines", i, "stages", j), "model", name, model_names))
        for i, shard in enumerate(self.shards):
            for j, name in enumerate(shard.models):
                if name not in model_names:
                    problems.append(_unknown(("shards", i, "models", j), "model", name, model_names))
            if shard.pool is None and len(pool_names) > 1:
                problems.append(SpecProblem(("shards", i, "pool"), "name a pool: the spec has several"))
            if shard.pool is not None and shard.pool not in pool_names:
                problems.append(_unknown(("shards", i, "pool"), "node pool", shard.pool, pool_names))
            if shard.priority_class is not None and shard.priority_class not in class_names:
                problems.append(_unknown(("shards", i, "priority_class"), "class", shard.priority_class, class_names))
        for i, tenant in enumerate(self.tenants):
            if tenant.default_class not in class_names:
                problems.append(_unknown(("tenants", i, "default_class"), "class", tenant.default_class, class_names))
            for j, name in enumerate(tenant.allowed_classes):
                if name not in class_names:
                    problems.append(_unknown(("tenants", i, "allowed_classes", j), "class", name, class_names))
        if self.gateway.allow_anonymous and self.gateway.anonymous_tenant is None:
            problems.append(SpecProblem(("gateway", "anonymous_tenant"), "required when allow_anonymous is true"))
        if self.gateway.anonymous_tenant is not None and self.gateway.anonymous_tenant not in tenant_names:
            problems.append(
                _unknown(("gateway", "anonymous_tenant"), "tenant", self.gateway.anonymous_tenant, tenant_names)
            )
        if problems:
            raise SpecReferenceError(problems)
        return self

    # Lookups used across the project.
    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def priority_class(self, name: str) -> PriorityClass:
        return next(c for c in self.priority_classes if c.name == name)

    def pool_of(self, shard: Shard) -> NodePool:
        name = shard.pool or self.node_pools[0].name
        return next(p for p in self.node_pools if p.name == name)


class SpecProblem:
    """One problem found in a spec: where (a field path) and what."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        self.loc = loc
        self.message = message


class SpecReferenceError(ValueError):
    """Cross-field problems (dangling references, duplicates), each with its own field path."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("; ".join(f"{format_loc(p.loc)}: {p.message}" for p in problems))
        self.problems = problems


class SpecError(Exception):
    """A spec file that cannot be used. `str()` gives one line per problem: file:line: path: message."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _duplicate_names(section: str, items: list[Any]) -> list[SpecProblem]:
    seen: set[str] = set()
    problems = []
    for i, item in enumerate(items):
        if item.name in seen:
            problems.append(SpecProblem((section, i, "name"), f"duplicate name '{item.name}'"))
        seen.add(item.name)
    return problems


def _unknown(loc: tuple[str | int, ...], kind: str, name: str, known: set[str]) -> SpecProblem:
    return SpecProblem(loc, f"unknown {kind} '{name}' (expected one of: {', '.join(sorted(known)) or 'none'})")


def format_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def hash_api_key(key: str) -> str:
    """The form in which a tenant's API key is stored in the spec."""
    return hashlib.sha256(key.encode()).hexdigest()


class _LineLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line_of(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """The 1-based line of the YAML node at a field path, or of its closest existing parent."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:  # an unknown or missing key: point at the key itself when present
                key = next((k for k, _ in node.value if k.value == part), None)
                child = key
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _describe(error: dict[str, Any]) -> str:
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown field (check its spelling; see controlplane/spec.py for the fields allowed here)"
    if error["type"] == "missing":
        return "required field is missing"
    value = error.get("input")
    if not isinstance(value, dict | list) and value is not None:
        message += f" (got {value!r})"
    return message


def parse_spec(text: str, source: str = "<spec>") -> ClusterSpec:
    """Parse and validate spec text; raise SpecError naming source, line, field path and problem."""
    try:
        root = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise SpecError([f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}:1: expected a mapping of spec sections at the top level"])
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, SpecReferenceError):
                problems = [(p.loc, p.message) for p in cause.problems]
            else:
                problems = [(tuple(error["loc"]), _describe(error))]
            for loc, message in problems:
                line = _line_of(root, loc)
                where = f"{source}:{line}" if line else source
                lines.append(f"{where}: {format_loc(loc)}: {message}")
        raise SpecError(lines) from None


def load_spec(path: str | Path) -> ClusterSpec:
    """Load a cluster.yaml; relative `model_repository` paths are resolved against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the spec: {exc.strerror}"]) from None
    spec = parse_spec(text, str(path))
    repo = Path(spec.model_repository)
    if not repo.is_absolute():
        repo = (path.parent / repo).resolve()
    return spec.model_copy(update={"model_repository": str(repo)})
