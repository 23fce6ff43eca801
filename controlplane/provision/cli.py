"""`cpctl inventory` and `cpctl provision`: the provisioning room's commands, one Typer app (`provision_app`)
whose commands controlplane/cli.py puts at the top level.

Thin: they parse, call `inventory` / `runner`, and render with Rich (or JSON with --json). Bad input (an
unreadable spec, a plan that does not fit, a missing inventory, a malformed --extra-vars) prints one line and
exits 2; a run with any failed or unreachable host exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from controlplane.clikit import (
    FAILED,
    JSON_OPTION,
    SPEC_OPTION,
    area_app,
    console,
    err_console,
    fail,
    load,
    print_json,
)
from controlplane.gpu.plan import PlanError

provision_app = area_app("Provisioning of GPU nodes with Ansible: the inventory of a spec, and site.yml.")
OUTPUT_OPTION = typer.Option(
    None, "-o", "--output", help="Write the inventory to this file (e.g. inventories/gpu-demo/hosts.yml); "
    "default: print it."
)
JOIN_OPTION = typer.Option(False, "--join-kubernetes", help="Put every pool in k8s_nodes: site.yml then joins "
                           "the hosts to Kubernetes (k8s_node role), with their node labels.")
INVENTORY_OPTION = typer.Option(..., "-i", "--inventory", help="Inventory file or folder.")
CHECK_OPTION = typer.Option(False, "--check", help="Report what would change; change nothing.")
DIFF_OPTION = typer.Option(False, "--diff", help="Show the changes to files and MIG layouts.")
LIMIT_OPTION = typer.Option(None, "-l", "--limit", help="Only these hosts or groups (Ansible pattern).")
TAGS_OPTION = typer.Option(None, "-t", "--tags", help="Only these roles, by tag (e.g. mig, or mig,verify).")
EXTRA_VARS_OPTION = typer.Option(
    [], "-e", "--extra-vars", help="Extra variables: KEY=VALUE, a JSON/YAML mapping, or @FILE; repeatable."
)
DOCTOR_INVENTORY_OPTION = typer.Option(
    None, "-i", "--inventory", help="Check the hosts of this inventory over SSH (default: this machine)."
)


@provision_app.command("inventory")
def inventory(spec_file: Path = SPEC_OPTION, output: Path | None = OUTPUT_OPTION,
              join_kubernetes: bool = JOIN_OPTION) -> None:
    """Write the Ansible inventory of the spec's GPU pools: groups, GPU model and count, fabric, MIG layouts,
    node labels (the schema: controlplane/provision/inventory.py).

    Example: cpctl inventory -f examples/gpu/cluster.yaml -o inventories/gpu-demo/hosts.yml
    """
    from controlplane.provision.inventory import inventory_from_spec

    try:
        result = inventory_from_spec(load(spec_file), join_kubernetes=join_kubernetes)
    except PlanError as exc:
        fail(f"{spec_file}: {exc}")
    text = result.to_yaml(f"`cpctl inventory -f {spec_file}`")
    if output is None:
        print(text, end="")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    hosts = sum(len(g.get("hosts") or {}) for g in result.pool_groups().values())
    console.print(f"[green]wrote[/green] {output}: {hosts} host(s)" + "".join(f"\n  note: {n}" for n in result.notes),
                  highlight=False, soft_wrap=True)


def _extra_vars(values: list[str]) -> dict[str, Any]:
    """`-e` values: KEY=VALUE, a YAML/JSON mapping, or @FILE (YAML or JSON), merged left to right."""
    merged: dict[str, Any] = {}
    for value in values:
        try:
            if value.startswith("@"):
                data = yaml.safe_load(Path(value[1:]).read_text())
            elif value.lstrip().startswith("{"):
                data = yaml.safe_load(value)
            elif "=" in value:
                key, _, raw = value.partition("=")
                data = {key.strip(): yaml.safe_load(raw) if raw else ""}
            else:
                data = None
        except (OSError, yaml.YAMLError) as exc:
            fail(f"--extra-vars {value!r}: {exc}")
        if not isinstance(data, dict):
            fail(f"--extra-vars {value!r}: expected KEY=VALUE, a mapping, or @FILE holding a mapping")
        merged.update(data)
    return merged


@provision_app.command("provision")
def provision(
    inventory_path: Path = INVENTORY_OPTION,
    check: bool = CHECK_OPTION,
    diff: bool = DIFF_OPTION,
    limit: str | None = LIMIT_OPTION,
    tags: str | None = TAGS_OPTION,
    extra_vars: list[str] = EXTRA_VARS_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run playbooks/site.yml on an inventory with a live per-host view; exit 1 if any host failed or was unreachable.

    Example: cpctl provision -i inventories/example --check --limit gpu-a
    """
    from controlplane.provision.runner import run_site
    from controlplane.provision.view import LiveView, summary_table
    from controlplane.resources import ResourceMissing, project_file

    if not inventory_path.exists():
        fail(f"{inventory_path}: no such inventory (write one with `cpctl inventory -f cluster.yaml -o FILE`)")
    try:
        site = project_file("playbooks/site.yml")
    except ResourceMissing as exc:
        fail(str(exc), FAILED)
    variables = _extra_vars(extra_vars)
    mode = "check" if check else "provision"
    if as_json:
        result = run_site(inventory_path, check=check, diff=diff, limit=limit, tags=tags, extravars=variables,
                            playbook=site)
        print_json(result.to_dict())
    else:
        with LiveView(console, f"{mode} {inventory_path}") as view:
            result = run_site(inventory_path, check=check, diff=diff, limit=limit, tags=tags, extravars=variables,
                              on_event=view, playbook=site)
        console.print(summary_table(result, f"{mode}: {inventory_path}" + (f" (limit {limit})" if limit else "")))
        for failure in result.failures:
            kind = "unreachable" if failure.unreachable else "failed"
            console.print(f"[red]{kind}[/red] {failure.host}: {failure.task}: {failure.message}", highlight=False,
                          soft_wrap=True)
    if result.output_tail and not as_json:
        err_console.print(result.output_tail, highlight=False, markup=False, soft_wrap=True)
    if not result.hosts:
        fail(f"no host of {inventory_path} matched" + (f" --limit {limit}" if limit else ""), FAILED)
    if not result.succeeded:
        raise typer.Exit(FAILED)


@provision_app.command("doctor")
def doctor(
    inventory_path: Path | None = DOCTOR_INVENTORY_OPTION,
    limit: str | None = LIMIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Preflight a GPU node: GPU model and MIG, driver, CUDA >= 12.0, container runtime, Kubernetes >= 1.24,
    RDMA links, Fabric Manager; each check passes, warns or fails with its fix. Exit 1 on any failure.

    Example: cpctl doctor -i inventories/gpu-demo --limit gpu-a
    """
    from concurrent.futures import ThreadPoolExecutor

    from controlplane.provision.doctor import Expected, LocalHost, Status, inventory_hosts, run_checks

    if inventory_path is None:
        if limit:
            fail("--limit needs --inventory")
        targets = [(LocalHost(), Expected())]
    elif not inventory_path.exists():
        fail(f"{inventory_path}: no such inventory (write one with `cpctl inventory -f cluster.yaml -o FILE`)")
    else:
        try:
            targets = inventory_hosts(str(inventory_path), limit)
        except ValueError as exc:
            fail(str(exc))
    # Hosts in parallel (each check waits on its host's SSH round trips), at most 16 at a time.
    try:
        with ThreadPoolExecutor(min(16, len(targets))) as pool:
            results = dict(zip([host.name for host, _ in targets],
                               pool.map(lambda target: run_checks(*target), targets), strict=True))
    finally:
        for host, _ in targets:
            host.close()
    failed = any(r.status is Status.FAIL for checks in results.values() for r in checks)
    if as_json:
        print_json({"hosts": {h: [r.to_dict() for r in checks] for h, checks in results.items()},
                    "failed": failed})
    else:
        from rich.table import Table

        table = Table(title="cpctl doctor" + (f": {inventory_path}" if inventory_path else ": this machine"))
        for column in ("host", "check", "status", "found", "fix"):
            table.add_column(column, overflow="fold")
        colour = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "red"}
        for name, checks in results.items():
            for i, r in enumerate(checks):
                table.add_row(name if i == 0 else "", r.check, f"[{colour[r.status]}]{r.status.value}[/]", r.found,
                              r.fix)
            table.add_section()
        console.print(table)
    if failed:
        raise typer.Exit(FAILED)
