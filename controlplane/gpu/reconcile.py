"""The MIG reconcile: from what a node's GPUs have (discovered) and what they should have (wanted), the GPU
instances to keep, destroy and create, and the nvidia-smi commands that get there.

It is the one place this is decided. Its two callers only read state and print or run the result:
`cpctl mig diff|steps` (wanted: the plan of the spec; current: this machine or a saved listing) and the
Ansible mig role's action `mig_plan` (wanted: the inventory's `mig_gpus`/`mig_profiles`/`mig_layout`;
current: the host's nvidia-smi listings over SSH). Same change, same commands.

Rules:
- The wanted instances sit where `layout.place` puts them: the placements the planner assigns shards to.
- An instance is kept when the wanted layout has the same profile at the same start and the instance has its
  compute instance (one without is the leftover of an interrupted run, and is recreated). Running workloads
  on kept instances are not disturbed.
- Order: enable MIG; destroy what is not kept (compute instance, then GPU instance); create everything
  missing in one `-cgi` with explicit placements, largest first, each with its compute instance (`-C`);
  disable MIG last when the GPU should have none. Explicit placements matter: without them the driver takes
  the first free slot, which can strand a later, larger profile.
- Every GPU is checked (known model, the expected model, a valid layout, present on the node) before any
  command is returned: a caller never starts destroying for a change that cannot finish.

Enabling MIG may leave the mode pending until the GPU is reset; that, and draining the node, are the
caller's. Standard library only (with `catalog` and `layout`): the mig role imports it on the controller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.gpu.catalog import model_for_product
from controlplane.gpu.devices import GpuInfo
from controlplane.gpu.layout import LayoutError, Placement, place, resolve_layout

# What a GPU should have: a mig-parted named layout ('all-balanced'), explicit profiles, or None (MIG off).
Wanted = str | Sequence[str] | None


@dataclass(frozen=True)
class GpuReconcile:
    """What one GPU needs. `problem` set: the GPU cannot be reconciled and has no commands."""

    index: int
    model: str = ""
    layout: tuple[str, ...] | None = None  # the wanted profiles; None: MIG disabled
    mig_mode: str = "keep"  # keep, enable or disable
    keep: tuple[str, ...] = ()  # instances as PROFILE@START
    destroy: tuple[str, ...] = ()
    create: tuple[str, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()  # argv lists, in order
    problem: str = ""


@dataclass(frozen=True)
class NodeReconcile:
    """Every wanted GPU of a node; commands only when no GPU has a problem."""

    gpus: tuple[GpuReconcile, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def commands(self) -> list[list[str]]:
        return [] if self.problems else [list(c) for g in self.gpus for c in g.commands]


def reconcile_node(current: Sequence[GpuInfo], wanted: Mapping[int, Wanted],
                   expected_model: str | None = None) -> NodeReconcile:
    """The reconcile of each GPU index in `wanted` against the node's discovered GPUs `current`.

    `expected_model` (a catalog name, e.g. H100-80GB) is what the plan or inventory was made for; a node
    with another GPU is a problem. Without it the GPU's own catalog model is used.
    """
    by_index = {gpu.index: gpu for gpu in current}
    results = []
    for index in sorted(wanted):
        if index not in by_index:
            problem = f"GPU {index}: not found on the node (it has {len(current)} GPU(s))"
            results.append(GpuReconcile(index, problem=problem))
        else:
            results.append(reconcile_gpu(by_index[index], wanted[index], expected_model))
    return NodeReconcile(tuple(results), tuple(r.problem for r in results if r.problem))


def reconcile_gpu(gpu: GpuInfo, wanted: Wanted, expected_model: str | None = None) -> GpuReconcile:
    """What `gpu` needs to have `wanted`; a GpuReconcile with `problem` set when it cannot be done."""
    model = model_for_product(gpu.name)
    if model is None:
        return GpuReconcile(gpu.index, problem=f"GPU {gpu.index}: a '{gpu.name}', which the GPU catalog does not "
                                               "know: its MIG layouts cannot be validated")
    if expected_model is not None and model.name != expected_model:
        return GpuReconcile(gpu.index, model.name, problem=f"GPU {gpu.index}: the node has a '{gpu.name}' "
                                                           f"({model.name}), the layout was made for {expected_model}")
    try:
        if isinstance(wanted, str):
            layout = resolve_layout(model, wanted, None)
        else:
            layout = None if wanted is None else resolve_layout(model, None, list(wanted))
        placements = [] if layout is None else place(model, layout)
    except LayoutError as exc:
        return GpuReconcile(gpu.index, model.name, problem=f"GPU {gpu.index}: invalid MIG layout: {exc}")

    want: dict[str, Placement] = {str(p): p for p in placements}
    have = {f"{gi.profile}@{gi.start}": gi for gi in gpu.gpu_instances}
    with_compute = {ci.gi_id for ci in gpu.compute_instances}
    keep = sorted(k for k in have if k in want and have[k].gi_id in with_compute)
    destroy = sorted(k for k in have if k not in keep)
    create = sorted((k for k in want if k not in keep), key=lambda k: (-want[k].profile.size, want[k].start))

    i = str(gpu.index)
    mig_on = bool(gpu.mig_current)
    mode = "keep" if mig_on == (layout is not None) else ("enable" if layout is not None else "disable")
    commands: list[tuple[str, ...]] = []
    if mode == "enable":
        commands.append(("nvidia-smi", "-i", i, "-mig", "1"))
    for key in destroy:
        gi = str(have[key].gi_id)
        if have[key].gi_id in with_compute:
            commands.append(("nvidia-smi", "mig", "-i", i, "-gi", gi, "-dci"))
        commands.append(("nvidia-smi", "mig", "-i", i, "-gi", gi, "-dgi"))
    if create:
        pairs = ",".join(f"{want[k].profile.profile_id}:{want[k].start}" for k in create)
        commands.append(("nvidia-smi", "mig", "-i", i, "-cgi", pairs, "-C"))
    if mode == "disable":
        commands.append(("nvidia-smi", "-i", i, "-mig", "0"))
    return GpuReconcile(gpu.index, model.name, layout, mode, tuple(keep), tuple(destroy), tuple(create),
                        tuple(commands))
