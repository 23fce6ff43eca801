"""`cpctl gpu list|plan|mig ...`: the GPU room's commands, one Typer app (`gpu_app`) that controlplane/cli.py
registers as `cpctl gpu` (`cpctl plan` and `cpctl mig` stay as hidden aliases).

Thin: each command parses, calls catalog/plan/render/reconcile/discover and renders with Rich (or JSON with --json).
Bad input (an unreadable or invalid spec, a plan that does not fit, an unknown node, a bad --current file)
prints one line and exits 2; a machine without a GPU prints one line and exits 1.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer
from rich.table import Table

from controlplane.clikit import FAILED, JSON_OPTION, SPEC_OPTION, area_app, console, err_console, fail, load, print_json
from controlplane.gpu.catalog import GpuModel
from controlplane.gpu.devices import GpuInfo, HostGpus, NoGpuError
from controlplane.gpu.discover import discover
from controlplane.gpu.nvidia_smi import parse_lci, parse_lgi
from controlplane.gpu.plan import Plan, PlanError, plan_cluster
from controlplane.gpu.reconcile import NodeReconcile, reconcile_node
from controlplane.gpu.render import extended_resources, mig_parted_config, node_labels, replica_resources

gpu_app = area_app("GPUs: this machine's GPUs, the MIG plan of a spec, and MIG layouts.")
mig_app = area_app("MIG layouts of the plan: mig-parted config, nvidia-smi steps, current vs desired.")
gpu_app.add_typer(mig_app, name="mig")


def _load_plan(spec_file: Path) -> Plan:
    try:
        return plan_cluster(load(spec_file))
    except PlanError as exc:
        fail(f"{spec_file}: {exc}")


@gpu_app.command("plan")
def plan(spec_file: Path = SPEC_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Show where every shard replica runs: node, GPU, MIG slot and profile, shard, models, class.

    Example: cpctl gpu plan -f examples/gpu/cluster.yaml
    """
    result = _load_plan(spec_file)
    if as_json:
        data = result.to_dict()
        data["node_labels"] = node_labels(result)
        data["extended_resources"] = extended_resources(result)
        data["replica_resources"] = [
            {"replica": r.replica.name, "node": r.node, "gpu": r.gpu, "resource": r.resource,
             "shared_with": list(r.shared_with)}
            for r in replica_resources(result)
        ]
        print_json(data)
        return
    table = Table(title=f"MIG plan of {result.cluster}")
    for column in ("pool", "node", "GPU", "slot", "profile", "shard", "models", "class"):
        table.add_column(column)
    previous = None
    for row in result.rows():
        key = (row.pool, row.node, row.gpu)
        if previous is not None and key != previous:
            table.add_section()
        previous = key
        shard = row.shard if not row.shard.startswith("(") else f"[dim]{row.shard}[/dim]"
        table.add_row(row.pool, row.node, row.gpu, row.slot, row.profile, shard, row.models, row.priority_class)
    console.print(table)
    for pool in result.pools:
        if pool.gpu_model is None:
            console.print(f"pool {pool.pool}: no GPUs; {len(pool.cpu_replicas)} replica(s) on the CPU")
        else:
            console.print(
                f"pool {pool.pool}: {pool.gpus_used} of {len(pool.gpus)} {pool.gpu_model} GPUs used "
                f"(MIG layout: {pool.layout_name or 'disabled'})"
            )


@gpu_app.command("list")
def gpu(as_json: bool = JSON_OPTION) -> None:
    """List this machine's GPUs (read-only): memory, utilization, MIG mode, profiles, existing instances.

    Reads NVML (nvidia-ml-py), else nvidia-smi output. Example: cpctl gpu --json
    """
    try:
        found = discover()
    except NoGpuError as exc:
        fail(str(exc), FAILED)
    if as_json:
        print_json(found.to_dict())
        return
    table = Table(title=f"GPUs (via {found.source}, driver {found.driver_version or '?'})")
    for column in ("GPU", "name", "catalog", "memory used/total MiB", "util", "MIG", "instances"):
        table.add_column(column)
    for g in found.gpus:
        mig = {None: "n/a", True: "Enabled", False: "Disabled"}
        mode = mig[g.mig_current] + (f" (pending {mig[g.mig_pending]})" if g.mig_pending != g.mig_current else "")
        instances = ", ".join(f"{gi.profile}@{gi.start}" for gi in g.gpu_instances) or "-"
        util = "n/a" if g.utilization_pct is None else f"{g.utilization_pct}%"
        table.add_row(str(g.index), g.name, g.catalog_model or "-", f"{g.memory_used_mib}/{g.memory_total_mib}",
                      util, mode, instances)
    console.print(table)
    for g in found.gpus:
        if not g.profiles:
            continue
        profiles = Table(title=f"GPU {g.index} MIG profiles")
        for column in ("profile", "ID", "free/total", "memory MiB", "SMs", "placements"):
            profiles.add_column(column)
        for p in g.profiles:
            starts = ",".join(str(s) for s, _ in p.placements)
            size = p.placements[0][1] if p.placements else "?"
            profiles.add_row(p.name, str(p.profile_id), f"{'?' if p.free is None else p.free}/{p.total}",
                             str(p.memory_mib), str(p.sms), f"{{{starts}}}:{size}")
        console.print(profiles)


def _current_from_file(path: Path, indexes: list[int], model: GpuModel) -> list[GpuInfo]:
    """GPUs from a `cpctl gpu list --json` file, or from `nvidia-smi mig -lgi` and `nvidia-smi mig -lci` output
    saved together (GPUs it does not list are taken as MIG disabled; a listing names no GPU model, so the
    plan's is assumed)."""
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror}")
    if text.lstrip().startswith("{"):
        try:
            return HostGpus.from_dict(json.loads(text)).gpus
        except (ValueError, KeyError, TypeError) as exc:
            fail(f"{path}: not `cpctl gpu list --json` output ({exc})")
    if "GPU instances:" not in text and "No MIG-enabled devices found" not in text:
        fail(f"{path}: expected `cpctl gpu list --json` output or `nvidia-smi mig -lgi` output")
    instances, computes = parse_lgi(text), parse_lci(text)
    if instances and "Compute instances:" not in text and "No compute instances found" not in text:
        fail(f"{path}: has GPU instances but no compute instances: save `nvidia-smi mig -lci` output with "
              "`nvidia-smi mig -lgi` (an instance without its compute instance is recreated)")
    return [
        GpuInfo(i, model.product_names[0], "?", 0, 0, None, i in instances, i in instances, model.name,
                gpu_instances=instances.get(i, []), compute_instances=computes.get(i, []))
        for i in indexes
    ]


CURRENT_OPTION = typer.Option(
    "live", "--current",
    help="'live' (discover this machine) or a saved file: `cpctl gpu list --json` output, or `nvidia-smi mig -lgi` "
         "and `nvidia-smi mig -lci` output together.",
)


def _reconcile(spec_file: Path, node: str | None, current: str) -> tuple[str, NodeReconcile]:
    """The planned node's name and the reconcile of its discovered GPUs (live or saved) with the plan."""
    result = _load_plan(spec_file)
    gpu_nodes = [n for p in result.pools if p.gpu_model for n in p.nodes]
    if not gpu_nodes:
        fail(f"{spec_file}: the plan has no GPU nodes")
    name = node or gpu_nodes[0]
    try:
        _, desired = result.node(name)
    except KeyError as exc:
        fail(exc.args[0])
    if not desired:
        fail(f"node '{name}' has no GPUs in the plan (GPU nodes: {', '.join(gpu_nodes)})")
    model = desired[0].model
    if current == "live":
        try:
            have = discover().gpus
        except NoGpuError as exc:
            fail(f"{exc}; pass --current FILE to compare a saved state", FAILED)
    else:
        have = _current_from_file(Path(current), [g.index for g in desired], model)
    return name, reconcile_node(have, {g.index: g.layout for g in desired}, model.name)


@mig_app.command("diff")
def diff(
    spec_file: Path = SPEC_OPTION,
    node: str | None = typer.Option(None, "--node", help="Planned node to compare (default: the first GPU node)."),
    current: str = CURRENT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Compare a node's current MIG state with the plan: MIG mode, instances to keep, destroy and create.

    The same reconcile as the Ansible mig role's; `cpctl gpu mig steps` prints its commands.
    Example: cpctl gpu mig diff -f examples/gpu/cluster.yaml --node gpu-a --current gpu-a.json
    """
    name, reconciled = _reconcile(spec_file, node, current)
    if as_json:
        print_json([
            {"gpu": g.index, "mig_mode": g.mig_mode, "keep": g.keep, "destroy": g.destroy, "create": g.create,
             "commands": [shlex.join(c) for c in g.commands], "problem": g.problem}
            for g in reconciled.gpus
        ])
        return
    table = Table(title=f"MIG diff of {name} (current: {current})")
    for column in ("GPU", "MIG mode", "keep", "destroy", "create", "problem"):
        table.add_column(column)
    for g in reconciled.gpus:
        mode = "-" if g.problem else g.mig_mode if g.mig_mode == "keep" else f"[yellow]{g.mig_mode}[/yellow]"
        table.add_row(str(g.index), mode, ", ".join(g.keep) or "-", ", ".join(g.destroy) or "-",
                      ", ".join(g.create) or "-", f"[red]{g.problem}[/red]" if g.problem else "")
    console.print(table)
    changed = sum(bool(g.commands) for g in reconciled.gpus)
    if reconciled.problems:
        console.print(f"{name}: cannot be reconciled ({len(reconciled.problems)} problem(s)); nothing would run")
    else:
        console.print(f"{name}: {changed} of {len(reconciled.gpus)} GPU(s) to change" if changed
                      else f"{name}: up to date")


@mig_app.command("config")
def config(spec_file: Path = SPEC_OPTION) -> None:
    """Print the mig-parted config (`version: v1`, `mig-configs`) of the plan, and the node labels choosing it.

    Example: cpctl gpu mig config -f examples/gpu/cluster.yaml > mig-parted.yaml
    """
    result = _load_plan(spec_file)
    labels = "\n".join(f"#   {n}: {k}={v}" for n, lbls in node_labels(result).items() for k, v in lbls.items())
    print(f"# Node labels:\n{labels}" if labels else "# No GPU nodes.")
    print(mig_parted_config(result), end="")


@mig_app.command("steps")
def steps(
    spec_file: Path = SPEC_OPTION,
    node: str = typer.Option(..., "--node", help="Planned node whose commands to print."),
    current: str = CURRENT_OPTION,
) -> None:
    """Print the nvidia-smi commands that take a node from its current MIG state to the plan; runs nothing.

    The same commands the Ansible mig role runs for the same change: instances already where the plan
    puts them are kept. Example: cpctl gpu mig steps -f examples/gpu/cluster.yaml --node gpu-a --current gpu-a.json
    """
    name, reconciled = _reconcile(spec_file, node, current)
    if reconciled.problems:
        fail(f"{name}: " + "; ".join(reconciled.problems))
    if not reconciled.commands:
        err_console.print(f"{name}: up to date, nothing to run", highlight=False)
    for command in reconciled.commands:
        print(shlex.join(command))
