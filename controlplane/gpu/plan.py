"""The MIG planner: from the spec's shards and node pools, per-GPU layouts and which shard runs where.

Model of the problem:
- A *replica* is one Triton server of a shard (its `replicas` plus its `standby`: standby capacity is
  reserved, so waking a standby never waits for a GPU). It needs the memory of every model it serves
  (`memory_mb x instance_count`) plus `SERVER_OVERHEAD_MIB` for the CUDA context and Triton itself.
- An *instance* is what replicas run on: a MIG GPU instance, or a whole GPU in a pool without MIG.
- Replicas of a shard whose priority class is `dedicated` get an instance of their own. Other replicas may
  share an instance (time-slicing its compute) when their memory fits in it.
- Two replicas of the same shard never share an instance (a replica exists to survive the loss of another),
  and go to different GPUs, on different nodes, where that costs no extra GPU: fewest GPUs comes first.

Per pool, `mig.layout: auto` lets the planner choose each GPU's layout: every group of replicas gets the
smallest profile that holds it (fewest memory slices, then fewest compute slices; `+me` profiles are left
for media work), and instances are packed onto as few GPUs as possible, largest first, each GPU checked by
the placement search of `controlplane.gpu.layout`. A named layout or an explicit profile list is applied
to every GPU of the pool and replicas are assigned to its instances. A pool without `mig` gives replicas
whole GPUs; a pool without GPUs runs them on the CPU. Demand that does not fit raises PlanError saying
what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from controlplane.gpu.catalog import GpuModel, MigProfile, gpu_model
from controlplane.gpu.layout import LayoutError, Placement, fits, place, resolve_layout
from controlplane.spec import ClusterSpec, NodePool

# CUDA context (~500 MiB on Hopper) plus Triton's own allocations (pinned memory pool, backends): what a
# server holds on its device before any model is loaded.
SERVER_OVERHEAD_MIB = 1024

AUTO_LAYOUT = "auto"


class PlanError(ValueError):
    """Demand that does not fit the pools, or a spec the planner cannot act on; the message says which."""


@dataclass(frozen=True)
class Replica:
    """One Triton server of a shard."""

    shard: str
    index: int
    standby: bool
    models: tuple[str, ...]
    need_mib: int
    priority_class: str | None
    dedicated: bool
    mig_profile: str | None

    @property
    def name(self) -> str:
        return f"{self.shard}-{self.index}"


@dataclass
class Instance:
    """A MIG GPU instance (profile set; start set once placed on a GPU) or a whole GPU (profile None), and
    the replicas it runs."""

    profile: MigProfile | None
    start: int | None
    capacity_mib: int
    replicas: list[Replica] = field(default_factory=list)

    @property
    def placement(self) -> Placement | None:
        if self.profile is None or self.start is None:
            return None
        return Placement(self.profile, self.start)

    @property
    def used_mib(self) -> int:
        return sum(r.need_mib for r in self.replicas)

    @property
    def exclusive(self) -> bool:
        return any(r.dedicated for r in self.replicas)

    def can_take(self, replica: Replica) -> bool:
        """Whether `replica` may join: room left, no dedicated tenant, no replica of the same shard."""
        if not self.replicas:
            return replica.need_mib <= self.capacity_mib
        return (
            not replica.dedicated
            and not self.exclusive
            and all(r.shard != replica.shard for r in self.replicas)
            and self.used_mib + replica.need_mib <= self.capacity_mib
        )


@dataclass
class GpuPlan:
    """One GPU: its layout (None: MIG disabled) and instances."""

    node: str
    index: int
    model: GpuModel
    layout: tuple[str, ...] | None
    instances: list[Instance] = field(default_factory=list)

    @property
    def used(self) -> bool:
        return any(i.replicas for i in self.instances)

    def shards(self) -> set[str]:
        return {r.shard for i in self.instances for r in i.replicas}


@dataclass
class PoolPlan:
    pool: str
    gpu_model: str | None
    layout_name: str | None
    nodes: list[str]
    gpus: list[GpuPlan]
    cpu_replicas: list[tuple[str, Replica]]

    def gpus_of(self, node: str) -> list[GpuPlan]:
        return [g for g in self.gpus if g.node == node]

    @property
    def gpus_used(self) -> int:
        return sum(g.used for g in self.gpus)


@dataclass(frozen=True)
class PlanRow:
    """One line of `cpctl plan`: a replica on an instance, a free instance, or free GPUs."""

    pool: str
    node: str
    gpu: str
    slot: str
    profile: str
    shard: str
    models: str
    priority_class: str


@dataclass
class Plan:
    cluster: str
    pools: list[PoolPlan]

    def pool(self, name: str) -> PoolPlan:
        return next(p for p in self.pools if p.pool == name)

    def node(self, name: str) -> tuple[PoolPlan, list[GpuPlan]]:
        """The pool and GPUs of a node; KeyError naming the known nodes."""
        for pool in self.pools:
            if name in pool.nodes:
                return pool, pool.gpus_of(name)
        known = [n for p in self.pools for n in p.nodes]
        raise KeyError(f"no node '{name}' in the plan (nodes: {', '.join(known)})")

    def rows(self) -> Iterator[PlanRow]:
        for pool in self.pools:
            for node, replica in pool.cpu_replicas:
                yield _replica_row(pool.pool, node, "-", "-", "cpu", replica)
            for node in pool.nodes:
                free: list[int] = []
                for gpu in pool.gpus_of(node):
                    if not gpu.used:
                        free.append(gpu.index)
                        continue
                    for inst in gpu.instances:
                        slot = _slots(inst.placement)
                        profile = inst.placement.profile.name if inst.placement else "whole GPU"
                        if not inst.replicas:
                            yield PlanRow(pool.pool, node, str(gpu.index), slot, profile, "(free)", "", "")
                        for replica in inst.replicas:
                            yield _replica_row(pool.pool, node, str(gpu.index), slot, profile, replica)
                if free:
                    yield PlanRow(pool.pool, node, _ranges(free), "", "", "(free GPU)", "", "")

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (`cpctl plan --json`)."""
        return {
            "cluster": self.cluster,
            "pools": [
                {
                    "pool": pool.pool,
                    "gpu_model": pool.gpu_model,
                    "layout": pool.layout_name,
                    "gpus_used": pool.gpus_used,
                    "gpus_total": len(pool.gpus),
                    "cpu_replicas": [{"node": n, **_replica_dict(r)} for n, r in pool.cpu_replicas],
                    "gpus": [
                        {
                            "node": gpu.node,
                            "index": gpu.index,
                            "mig_enabled": gpu.layout is not None,
                            "instances": [
                                {
                                    "profile": inst.placement.profile.name if inst.placement else None,
                                    "start": inst.placement.start if inst.placement else None,
                                    "size": inst.placement.profile.size if inst.placement else None,
                                    "capacity_mib": inst.capacity_mib,
                                    "replicas": [_replica_dict(r) for r in inst.replicas],
                                }
                                for inst in gpu.instances
                            ],
                        }
                        for gpu in pool.gpus
                    ],
                }
                for pool in self.pools
            ],
        }


def _replica_row(pool: str, node: str, gpu: str, slot: str, profile: str, replica: Replica) -> PlanRow:
    shard = replica.name + (" (standby)" if replica.standby else "")
    return PlanRow(pool, node, gpu, slot, profile, shard, ",".join(replica.models), replica.priority_class or "-")


def _replica_dict(replica: Replica) -> dict[str, Any]:
    return {
        "replica": replica.name,
        "shard": replica.shard,
        "standby": replica.standby,
        "models": list(replica.models),
        "need_mib": replica.need_mib,
        "priority_class": replica.priority_class,
        "dedicated": replica.dedicated,
    }


def _slots(placement: Placement | None) -> str:
    if placement is None:
        return "-"
    last = placement.slots[-1]
    return str(placement.start) if last == placement.start else f"{placement.start}-{last}"


def _ranges(indexes: list[int]) -> str:
    """'0,3-7' for [0, 3, 4, 5, 6, 7]."""
    parts: list[str] = []
    start = prev = indexes[0]
    for i in [*indexes[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def node_names(pool: NodePool) -> list[str]:
    """Host names of an existing pool when given for every node, else POOL-0, POOL-1, ..."""
    if pool.hosts and len(pool.hosts) == pool.count:
        return list(pool.hosts)
    return [f"{pool.name}-{i}" for i in range(pool.count)]


def replicas_of(spec: ClusterSpec, pool: NodePool) -> list[Replica]:
    """Every replica (standby included) of the shards that run on `pool`."""
    out: list[Replica] = []
    for shard in spec.shards:
        if spec.pool_of(shard).name != pool.name:
            continue
        need = SERVER_OVERHEAD_MIB + sum(spec.model(m).memory_mb * spec.model(m).instance_count for m in shard.models)
        dedicated = shard.priority_class is not None and spec.priority_class(shard.priority_class).dedicated
        for i in range(shard.replicas + shard.standby):
            out.append(
                Replica(shard.name, i, i >= shard.replicas, tuple(shard.models), need, shard.priority_class,
                        dedicated, shard.mig_profile)
            )
    return out


def plan_cluster(spec: ClusterSpec) -> Plan:
    """Plan every pool of the spec; PlanError on the first pool whose demand does not fit."""
    return Plan(spec.cluster, [plan_pool(spec, pool) for pool in spec.node_pools])


def plan_pool(spec: ClusterSpec, pool: NodePool) -> PoolPlan:
    nodes = node_names(pool)
    replicas = replicas_of(spec, pool)
    if pool.gpu.model == "none" or pool.gpu.per_node == 0:
        wanting = sorted({r.shard for r in replicas if r.mig_profile})
        if wanting:
            raise PlanError(f"pool '{pool.name}' has no GPUs, but shard(s) {', '.join(wanting)} ask for a MIG profile")
        if replicas and not nodes:
            raise PlanError(f"pool '{pool.name}' has no nodes for {len(replicas)} replica(s)")
        cpu = [(nodes[i % len(nodes)], r) for i, r in enumerate(replicas)]
        return PoolPlan(pool.name, None, None, nodes, [], cpu)

    model = gpu_model(pool.gpu.model)
    # GPU k goes to node k % nodes: the first GPUs filled are on different nodes, which spreads replicas.
    slots = [(nodes[k % len(nodes)], k // len(nodes)) for k in range(len(nodes) * pool.gpu.per_node)]
    where = f"pool '{pool.name}' ({len(nodes)} node(s) x {pool.gpu.per_node} {model.name})"
    for r in replicas:
        if r.mig_profile is not None:
            if pool.mig is None:
                raise PlanError(
                    f"shard '{r.shard}' asks for MIG profile {r.mig_profile} but {where} has MIG disabled "
                    "(set `mig: {layout: auto}` on the pool, or drop the shard's mig_profile)"
                )
            try:
                profile = model.profile(r.mig_profile)
            except KeyError as exc:
                raise PlanError(f"shard '{r.shard}': {exc.args[0]}") from None
            if profile.memory_mib < r.need_mib:
                raise PlanError(
                    f"shard '{r.shard}' needs {r.need_mib} MiB per replica ({_need_text(r)}), more than its "
                    f"mig_profile {profile.name} holds ({profile.memory_mib} MiB)"
                )

    if pool.mig is None:
        gpus = _plan_whole_gpus(model, replicas, slots, where)
        layout_name = None
    elif pool.mig.layout == AUTO_LAYOUT:
        gpus = _plan_auto(model, replicas, slots, where)
        layout_name = AUTO_LAYOUT
    else:
        try:
            layout = resolve_layout(model, pool.mig.layout, pool.mig.profiles)
        except LayoutError as exc:
            raise PlanError(f"pool '{pool.name}': {exc}") from None
        gpus = _plan_fixed(model, layout, replicas, slots, where)
        layout_name = pool.mig.layout or "custom"
    return PoolPlan(pool.name, model.name, layout_name, nodes, gpus, [])


def _need_text(replica: Replica) -> str:
    return f"models {', '.join(replica.models)} + {SERVER_OVERHEAD_MIB} MiB server overhead"


def _largest_first(replicas: list[Replica]) -> list[Replica]:
    # Dedicated first (they cannot share, so they shape the layout), then by memory: first-fit decreasing.
    return sorted(replicas, key=lambda r: (not r.dedicated, -r.need_mib, r.shard, r.index))


def smallest_profile(model: GpuModel, need_mib: int) -> MigProfile | None:
    """The cheapest profile holding `need_mib`: fewest memory slices, then fewest compute slices."""
    candidates = [p for p in model.profiles if p.memory_mib >= need_mib and not p.has_media_extensions]
    return min(candidates, key=lambda p: (p.memory_slices, p.compute_slices, p.profile_id), default=None)


def _plan_auto(model: GpuModel, replicas: list[Replica], slots: list[tuple[str, int]], where: str) -> list[GpuPlan]:
    # 1. Group replicas into instances: each group gets the smallest profile holding its first (largest)
    #    replica; later replicas join a group only if they fit in what that profile leaves.
    groups: list[Instance] = []
    for replica in _largest_first(replicas):
        for group in groups:
            same_profile = replica.mig_profile is None or replica.mig_profile == _profile_of(group).name
            if same_profile and group.can_take(replica):
                group.replicas.append(replica)
                break
        else:
            profile = model.profile(replica.mig_profile) if replica.mig_profile else smallest_profile(
                model, replica.need_mib
            )
            if profile is None:
                largest = max(model.profiles, key=lambda p: p.memory_mib)
                raise PlanError(
                    f"shard '{replica.shard}' needs {replica.need_mib} MiB per replica ({_need_text(replica)}); "
                    f"the largest {model.name} MIG profile, {largest.name}, holds {largest.memory_mib} MiB"
                )
            groups.append(Instance(profile, None, profile.memory_mib, [replica]))

    # 2. Pack instances onto GPUs, largest first; a GPU takes an instance when the placement search still
    #    finds room. GPUs without a replica of the same shard are preferred, then any GPU, then a new one.
    groups.sort(key=lambda g: (-_profile_of(g).size, -_profile_of(g).compute_slices))
    packed: list[list[Instance]] = []
    for group in groups:
        shards = {r.shard for r in group.replicas}
        candidates = [
            gpu for gpu in packed if fits(model, [_profile_of(i).name for i in gpu] + [_profile_of(group).name])
        ]
        apart = [gpu for gpu in candidates if not shards & {r.shard for i in gpu for r in i.replicas}]
        if apart or candidates:
            (apart or candidates)[0].append(group)
        else:
            packed.append([group])
    if len(packed) > len(slots):
        slices = sum(_profile_of(g).size for g in groups)
        raise PlanError(
            f"{where}: the {len(replicas)} replica(s) need {len(groups)} MIG instance(s) ({slices} memory "
            f"slices) on {len(packed)} GPUs, but the pool has {len(slots)} GPUs; add nodes or reduce replicas"
        )

    # 3. Fix each GPU's placements; instances of a profile take that profile's placements in order.
    gpus: list[GpuPlan] = []
    for k, (node, index) in enumerate(slots):
        if k >= len(packed):
            gpus.append(GpuPlan(node, index, model, None))
            continue
        placements = place(model, [_profile_of(i).name for i in packed[k]])
        pending = list(packed[k])
        instances = []
        for placement in placements:
            group = next(g for g in pending if _profile_of(g) == placement.profile)
            pending.remove(group)
            group.start = placement.start
            instances.append(group)
        instances.sort(key=lambda i: i.start or 0)
        gpus.append(GpuPlan(node, index, model, tuple(_profile_of(i).name for i in instances), instances))
    return _by_node(gpus)


def _profile_of(instance: Instance) -> MigProfile:
    assert instance.profile is not None  # only called on MIG instances
    return instance.profile


def _plan_fixed(
    model: GpuModel,
    layout: tuple[str, ...] | None,
    replicas: list[Replica],
    slots: list[tuple[str, int]],
    where: str,
) -> list[GpuPlan]:
    if layout is None:
        return _plan_whole_gpus(model, replicas, slots, where)
    gpus = [
        GpuPlan(node, index, model, layout, [Instance(p.profile, p.start, p.profile.memory_mib)
                                             for p in sorted(place(model, layout), key=lambda p: p.start)])
        for node, index in slots
    ]
    for replica in _largest_first(replicas):
        # Share before opening an instance, smallest instance first, GPUs already in use (fewest GPUs),
        # then apart from the same shard, in GPU order.
        choices = [
            ((not inst.replicas, inst.profile.size if inst.profile else 0, not gpu.used,
              replica.shard in gpu.shards(), k, n), inst)
            for k, gpu in enumerate(gpus)
            for n, inst in enumerate(gpu.instances)
            if inst.can_take(replica)
            and (replica.mig_profile is None or inst.profile is not None and inst.profile.name == replica.mig_profile)
        ]
        if not choices:
            wanted = replica.mig_profile or f"{replica.need_mib} MiB"
            raise PlanError(
                f"{where}: no instance of layout {'+'.join(layout) or '(none)'} left for replica "
                f"{replica.name} of shard '{replica.shard}' (needs {wanted}); choose a larger layout or "
                "`mig: {layout: auto}`, or add nodes"
            )
        min(choices, key=lambda choice: choice[0])[1].replicas.append(replica)
    return _by_node(gpus)


def _plan_whole_gpus(
    model: GpuModel, replicas: list[Replica], slots: list[tuple[str, int]], where: str
) -> list[GpuPlan]:
    gpus = [GpuPlan(node, index, model, None, [Instance(None, None, model.memory_mib)]) for node, index in slots]
    for replica in _largest_first(replicas):
        if replica.need_mib > model.memory_mib:
            raise PlanError(
                f"shard '{replica.shard}' needs {replica.need_mib} MiB per replica ({_need_text(replica)}); "
                f"a {model.name} has {model.memory_mib} MiB"
            )
        free = [g for g in gpus if g.instances[0].can_take(replica)]
        if not free:
            raise PlanError(
                f"{where}: no GPU left for replica {replica.name} of shard '{replica.shard}' "
                f"({replica.need_mib} MiB{', dedicated' if replica.dedicated else ''}); add nodes or enable MIG"
            )
        # Share a GPU already in use before taking a new one.
        min(free, key=lambda g: (not g.used, gpus.index(g))).instances[0].replicas.append(replica)
    return _by_node(gpus)


def _by_node(gpus: list[GpuPlan]) -> list[GpuPlan]:
    """GPUs node by node, in the pool's node order (a node ranks by its first GPU in slot order)."""
    node_order = {g.node: k for k, g in reversed(list(enumerate(gpus)))}
    return sorted(gpus, key=lambda g: (node_order[g.node], g.index))
