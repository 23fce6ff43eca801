"""Runs of the Pulumi program under mocks, shared by the infra tests, and the guards against vacuous mocks.

Pulumi mock tests pass silently when nothing is checked: an unmocked output becomes None and whatever
depends on it vanishes, a preview run never resolves outputs, nothing is recorded without
`pulumi.runtime.test`. Every helper here fails loudly instead, and the tests below prove that they do.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from controlplane.infra.offline import ProgramRun, Recorded, run_program, stack_config

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("aws", "azure", "existing")
SPECS = {stack: ROOT / "examples" / stack / "cluster.yaml" for stack in STACKS}


def fake_private_ip(name: str) -> str:
    """A distinct, recognisable address per instance, so that the inventory test can tell them apart."""
    return f"10.42.0.{10 + int(name.rsplit('-', 1)[1])}"


@functools.cache
def run_stack(stack: str) -> ProgramRun:
    """The example stack's program run (cached: the runs are deterministic and take ~1 s each)."""
    config, _ = stack_config(stack)
    return run_program(config, stack, address_of=fake_private_ip)


def run_with(stack: str, **overrides: str) -> ProgramRun:
    """A run of a stack with some config keys replaced (keys without namespace are `controlplane:`)."""
    config, _ = stack_config(stack)
    config.update({k if ":" in k else f"controlplane:{k}": v for k, v in overrides.items()})
    return run_program(config, stack, address_of=fake_private_ip)


def only(run: ProgramRun, type_token: str) -> Recorded:
    found = run.of_type(type_token)
    assert len(found) == 1, f"expected one {type_token}, the program registered {len(found)}"
    return found[0]


def k8s(run: ProgramRun, kind: str, name: str) -> dict:
    """The Kubernetes object of that kind and metadata.name; fails naming what exists instead."""
    found = [r.inputs for r in run.resources
             if r.inputs.get("kind") == kind and (r.inputs.get("metadata") or {}).get("name") == name]
    names = sorted((r.inputs.get("metadata") or {}).get("name", "?") for r in run.resources
                   if r.inputs.get("kind") == kind)
    assert len(found) == 1, f"expected one {kind} '{name}', found {len(found)} (the {kind}s: {names})"
    return found[0]


def required(data: object, *path: str | int) -> object:
    """data[path...], failing with the path when any step is missing: a vanished input fails, never passes."""
    for i, part in enumerate(path):
        try:
            data = data[part]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            raise AssertionError(f"missing {'/'.join(map(str, path[:i + 1]))}") from None
        if data is None:
            raise AssertionError(f"{'/'.join(map(str, path[:i + 1]))} is None (an unmocked output?)")
    return data


def inventory_of(run: ProgramRun) -> dict:
    """The run's `ansibleInventory` output, parsed."""
    import yaml

    return yaml.safe_load(required(run.outputs, "ansibleInventory"))


def inventory_addresses(run: ProgramRun) -> dict[str, str]:
    """host -> ansible_host of the run's inventory output (gpu_nodes -> pool groups); fails when an address
    is missing."""
    out = {}
    for group, body in required(inventory_of(run), "all", "children", "gpu_nodes", "children").items():
        for host, hostvars in required(body, "hosts").items():
            address = required(hostvars, "ansible_host")
            assert isinstance(address, str) and address, f"{group}/{host}: empty address"
            out[host] = address
    assert out, "the inventory names no host"
    return out


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_registers_its_pool_and_serving_layer(stack: str) -> None:
    run = run_stack(stack)
    types = {r.type for r in run.resources}
    component = {"aws": "AwsGpuNodePool", "azure": "AzureGpuNodePool", "existing": "ExistingNodePool"}[stack]
    assert f"controlplane:infra:{component}" in types
    assert "controlplane:infra:ServingCluster" in types
    assert len(run.of_type("kubernetes:apps/v1:Deployment")) >= 5  # 4 shards + the gateway, at least


def test_runs_resolve_outputs_instead_of_previewing() -> None:
    # A preview run leaves outputs unknown, and `apply` checks never run: the runs here must resolve them.
    run = run_stack("aws")
    assert set(run.outputs) >= {"ansibleInventory", "nodeAddresses", "gatewayService"}
    assert all(value is not None for value in run.outputs.values())


def test_a_missing_mocked_output_fails_the_inventory_check() -> None:
    # The trap: had the mock not returned `privateIp`, the addresses would be None. The check must catch it.
    config, _ = stack_config("aws")
    run = run_program(config, "aws", address_of=lambda name: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(AssertionError, match="ansible_host"):
        inventory_addresses(run)


def test_required_fails_on_a_vanished_input() -> None:
    with pytest.raises(AssertionError, match="missing spec/template"):
        required({"spec": {}}, "spec", "template")


def test_an_unmocked_call_fails_the_run_loudly() -> None:
    from controlplane.infra.offline import _make_mocks

    class Args:
        token = "aws:ec2/getVpc:getVpc"
        args: dict = {}

    with pytest.raises(NotImplementedError, match="getVpc"):
        _make_mocks(str).call(Args())


def test_numbers_come_back_as_integers() -> None:
    # Mocks receive every number as a float; the recording turns whole numbers back, or strict schema
    # validation of `replicas: 2.0` and the interface counts below would compare floats.
    deployment = k8s(run_stack("aws"), "Deployment", "main")
    assert type(required(deployment, "spec", "replicas")) is int


def test_stack_settings_take_camel_case_keys_and_name_a_wrong_one() -> None:
    import pulumi

    from infra.settings import read_settings

    spec = str(ROOT / "examples" / "aws" / "cluster.yaml")
    pulumi.runtime.set_all_config({"controlplane:spec": spec,
                                   "controlplane:aws": '{"region": "eu-west-1", "sshIngressCidr": "203.0.113.0/24"}',
                                   "controlplane:kubernetes": '{"gateway": {"maxReplicas": 4}}'})
    settings = read_settings()
    assert (settings.aws.region, settings.aws.ssh_ingress_cidr) == ("eu-west-1", "203.0.113.0/24")
    assert settings.kubernetes.gateway.max_replicas == 4 and settings.kubernetes.gateway.min_replicas == 2
    pulumi.runtime.set_all_config({"controlplane:spec": spec, "controlplane:aws": '{"regoin": "eu-west-1"}'})
    with pytest.raises(ValueError, match=r"controlplane:aws\.regoin: Extra inputs are not permitted"):
        read_settings()
