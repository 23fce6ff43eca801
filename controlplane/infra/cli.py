"""`cpctl infra preview`: what `pulumi up` would create for a spec and a stack, listed offline.

For users without cloud credentials or the Pulumi CLI: the real program of infra/ runs under Pulumi mocks
(controlplane/infra/offline.py); nothing is created, nothing is contacted, and addresses are placeholders.
controlplane/cli.py registers `infra_app` as `cpctl infra`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from controlplane.clikit import JSON_OPTION, SPEC_OPTION, area_app, console, fail, load, print_json

infra_app = area_app("The Pulumi program of infra/: offline preview of what `pulumi up` creates.")


def _get(data: Any, *path: str | int) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def describe(type_token: str, inputs: dict[str, Any]) -> str:
    """The few properties of a resource that say what it is (never secret values)."""
    kind = type_token.rsplit(":", 1)[-1]
    meta = inputs.get("metadata") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}" if meta.get("namespace") else meta.get("name", "")
    if kind == "LaunchTemplate":
        interfaces = inputs.get("networkInterfaces") or []
        efa = sum(1 for i in interfaces if i.get("interfaceType") == "efa")
        return (f"{inputs.get('instanceType')}, {efa} EFA interfaces, image {inputs.get('imageId')}, "
                f"placement group {_get(inputs, 'placement', 'groupName')}")
    if kind == "PlacementGroup":
        return f"strategy {inputs.get('strategy')}"
    if kind == "SecurityGroup":
        self_rules = [r for r in (inputs.get("ingress") or []) + (inputs.get("egress") or []) if r.get("self")]
        return f"{len(self_rules)} all-traffic self rules (EFA)"
    if kind in ("Vpc", "Subnet"):
        cidr = inputs.get("cidrBlock") or inputs.get("addressPrefix")
        return f"{cidr} {inputs.get('availabilityZone') or ''}".strip()
    if kind == "Instance":
        return f"Name={_get(inputs, 'tags', 'Name')} from launch template"
    if kind == "VirtualMachineScaleSet":
        image = _get(inputs, "virtualMachineProfile", "storageProfile", "imageReference") or {}
        nic = _get(inputs, "virtualMachineProfile", "networkProfile", "networkInterfaceConfigurations", 0) or {}
        return (f"{_get(inputs, 'sku', 'name')} x {_get(inputs, 'sku', 'capacity')}, image "
                f"{image.get('publisher')}:{image.get('offer')}:{image.get('sku')}, accelerated networking "
                f"{nic.get('enableAcceleratedNetworking')}")
    if kind == "ProximityPlacementGroup":
        return f"{inputs.get('proximityPlacementGroupType')} for {', '.join(_get(inputs, 'intent', 'vmSizes') or [])}"
    if kind in ("ResourceGroup", "VirtualNetwork"):
        return str(inputs.get("location") or _get(inputs, "addressSpace", "addressPrefixes") or "")
    if kind == "Release":
        return f"{inputs.get('chart')} {inputs.get('version')} in {inputs.get('namespace')}"
    if kind == "Deployment":
        container = _get(inputs, "spec", "template", "spec", "containers", 0) or {}
        limits = _get(container, "resources", "limits") or {}
        extra = ", ".join(f"{k}={v}" for k, v in limits.items() if "/" in k)
        return f"{where}: {_get(inputs, 'spec', 'replicas')} replicas, {container.get('image')}" + (
            f", {extra}" if extra else "")
    if kind == "NodePatch":
        return f"{where}: " + ", ".join(f"{k}={v}" for k, v in (meta.get("labels") or {}).items())
    if kind == "HorizontalPodAutoscaler":
        return f"{where}: {_get(inputs, 'spec', 'minReplicas')}-{_get(inputs, 'spec', 'maxReplicas')} replicas"
    if kind == "Secret":
        return f"{where}: {inputs.get('type')} (value is a Pulumi secret)"
    return where


STACK_OPTION = typer.Option(..., "--stack", help="Stack name: its config is infra/stacks/Pulumi.STACK.yaml.")


@infra_app.command("preview")
def preview(spec_file: Path = SPEC_OPTION, stack: str = STACK_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List, OFFLINE, the resources `pulumi up` would create: type, name and key properties.

    Runs the real Pulumi program under mocks: no cloud credentials, no Pulumi CLI, nothing created.

    Example: cpctl infra preview -f examples/aws/cluster.yaml --stack aws
    """
    from controlplane.infra.offline import InfraUnavailable, redact_secrets, run_program, stack_config, stack_file

    load(spec_file)
    try:
        config, secrets = stack_config(stack, spec_file)
        run = run_program(config, stack)
    except InfraUnavailable as exc:
        fail(str(exc))
    except ValueError as exc:  # the plan or the stack config cannot be used; the message says which
        fail(f"{spec_file} with stack '{stack}': {exc}")
    # Cloud resources first, then the Kubernetes layer; components are only groupings, not resources.
    resources = sorted((r for r in run.resources if not r.type.startswith("controlplane:")),
                       key=lambda r: (r.type.startswith("kubernetes:"), r.type, r.name))
    source = stack_file(stack)
    note = f"stack config {source.relative_to(source.parents[2])}" if source.exists() else \
        f"no {source.name}: default stack settings"

    if as_json:
        print_json({
            "offline": True,
            "stack": stack,
            "spec": str(spec_file),
            "secrets_as_placeholders": secrets,
            "resources": [{"type": r.type, "name": r.name, "summary": describe(r.type, r.inputs),
                           "inputs": redact_secrets(r.inputs)} for r in resources],
            "outputs": redact_secrets(run.outputs),
        })
        return

    console.print(f"[bold yellow]OFFLINE preview[/bold yellow] of stack '{stack}' ({note}), spec {spec_file}: "
                  "the Pulumi program ran under mocks; nothing was created or contacted, addresses and ids are "
                  "placeholders.", highlight=False)
    table = Table(title=f"{len(resources)} resources `pulumi up` would create")
    for column in ("type", "name", "key properties"):
        table.add_column(column, overflow="fold")
    for r in resources:
        table.add_row(r.type, r.name, describe(r.type, r.inputs))
    console.print(table)
    if secrets:
        console.print(f"secrets (placeholders here): {', '.join(secrets)}", highlight=False)
    console.print("[bold]ansibleInventory[/bold] output:", highlight=False)
    console.print(run.outputs.get("ansibleInventory", ""), highlight=False, markup=False)
    console.print("For the real thing: pulumi login; pulumi stack select --create "
                  f"{stack}; pulumi up  (infra/README.md).", highlight=False)
