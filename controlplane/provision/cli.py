"""`cpctl inventory` and `cpctl provision`: the provisioning room's commands, registered by controlplane/cli.py.

Thin: they parse, call `inventory` / `runner`, and render with Rich (or JSON with --json). Bad input (an
unreadable spec, a plan that does not fit, a missing inventory, a malformed --extra-vars) prints one line and
exits 2; a run with any failed or unreachable host exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
import yaml
from rich.console import Console

from controlplane.gpu.plan import PlanError
from controlplane.spec import SpecError, load_spec

console = Console()
errors = Console(stderr=True)

SPEC_OPTION = typer.Option(..., "-f", "--file", help="The cluster spec (cluster.yaml).")
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
JSON_OPTION = typer.Option(False, "--json", help="Print the per-host result as JSON (no live view).")


def _fail(message: str, code: int = 2) -> NoReturn:
    errors.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def inventory(spec_file: Path = SPEC_OPTION, output: Path | None = OUTPUT_OPTION,
              join_kubernetes: bool = JOIN_OPTION) -> None:
    """Write the Ansible inventory of the spec's GPU pools: groups, GPU model and count, fabric, MIG layouts,
    node labels (the schema: controlplane/provision/inventory.py).

    Example: cpctl inventory -f examples/gpu/cluster.yaml -o inventories/gpu-demo/hosts.yml
    """
    from controlplane.provision.inventory import inventory_from_spec

    try:
        result = inventory_from_spec(load_spec(spec_file), join_kubernetes=join_kubernetes)
    except SpecError as exc:
        _fail("; ".join(exc.lines))
    except PlanError as exc:
        _fail(f"{spec_file}: {exc}")
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
            _fail(f"--extra-vars {value!r}: {exc}")
        if not isinstance(data, dict):
            _fail(f"--extra-vars {value!r}: expected KEY=VALUE, a mapping, or @FILE holding a mapping")
        merged.update(data)
    return merged


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

    if not inventory_path.exists():
        _fail(f"{inventory_path}: no such inventory (write one with `cpctl inventory -f cluster.yaml -o FILE`)")
    variables = _extra_vars(extra_vars)
    mode = "check" if check else "provision"
    if as_json:
        result = run_site(inventory_path, check=check, diff=diff, limit=limit, tags=tags, extravars=variables)
        print(json.dumps(result.to_dict(), indent=2))
    else:
        with LiveView(console, f"{mode} {inventory_path}") as view:
            result = run_site(inventory_path, check=check, diff=diff, limit=limit, tags=tags, extravars=variables,
                              on_event=view)
        console.print(summary_table(result, f"{mode}: {inventory_path}" + (f" (limit {limit})" if limit else "")))
        for failure in result.failures:
            kind = "unreachable" if failure.unreachable else "failed"
            console.print(f"[red]{kind}[/red] {failure.host}: {failure.task}: {failure.message}", highlight=False,
                          soft_wrap=True)
    if result.output_tail and not as_json:
        errors.print(result.output_tail, highlight=False, markup=False, soft_wrap=True)
    if not result.hosts:
        _fail(f"no host of {inventory_path} matched" + (f" --limit {limit}" if limit else ""), 1)
    if not result.succeeded:
        raise typer.Exit(1)
