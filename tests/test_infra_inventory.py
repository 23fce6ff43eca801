"""The inventory the Pulumi program exports (stack output `ansibleInventory`) under the offline mocks:
real `ansible-playbook --list-hosts` finds every node in both plays of site.yml, the hosts are the names
the join registers and the label patches target, and it is the same inventory `cpctl inventory` writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane.provision.inventory import inventory_from_spec
from controlplane.spec import load_spec
from tests.test_infra_support import ROOT, STACKS, inventory_of, required, run_stack, run_with
from tests.test_provision_inventory import YAML_TYPES, role_options

SITE = ROOT / "playbooks" / "site.yml"


def listed_hosts(inventory: str, tmp_path: Path) -> dict[str, set[str]]:
    """play pattern -> the hosts `ansible-playbook --list-hosts` reports for it."""
    path = tmp_path / "hosts.yml"
    path.write_text(inventory)
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(path), str(SITE),
                             "--list-hosts"], capture_output=True, text=True, timeout=120, cwd=SITE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    plays: dict[str, set[str]] = {}
    for play in result.stdout.split("play #")[1:]:
        pattern = re.search(r"pattern: \['([^']+)'\]", play)
        assert pattern, play
        block = play.split("hosts (", 1)[1].splitlines()[1:]
        plays[pattern.group(1)] = {line.strip() for line in block if line.strip()}
    return plays


def node_patch_labels(stack: str) -> dict[str, dict[str, str]]:
    return {r.inputs["metadata"]["name"]: r.inputs["metadata"]["labels"]
            for r in run_stack(stack).resources if r.inputs.get("kind") == "Node"}


@pytest.mark.parametrize("stack", STACKS)
def test_ansible_matches_every_node_in_both_plays(stack: str, tmp_path: Path) -> None:
    run = run_stack(stack)
    nodes = set(node_patch_labels(stack))  # the Kubernetes nodes the serving layer labels
    assert len(nodes) == sum(len(addresses) for addresses in required(run.outputs, "nodeAddresses").values())
    plays = listed_hosts(required(run.outputs, "ansibleInventory"), tmp_path)
    assert plays == {"gpu_nodes": nodes, "k8s_nodes": nodes}


@pytest.mark.parametrize("stack", STACKS)
def test_hosts_join_under_the_names_the_label_patches_target_with_the_same_labels(stack: str) -> None:
    inventory = inventory_of(run_stack(stack))
    hosts = {name: host_vars for group in inventory["all"]["children"]["gpu_nodes"]["children"].values()
             for name, host_vars in group["hosts"].items()}
    assert {name: host_vars["k8s_node_labels"] for name, host_vars in hosts.items()} == node_patch_labels(stack)


def test_pulumi_and_cpctl_write_the_same_inventory_for_the_test_hosts() -> None:
    spec = ROOT / "tests" / "hosts" / "cluster.yaml"
    run = run_with("existing", spec=str(spec), inventory="", kubernetes=json.dumps({"enabled": False}))
    exported = yaml.safe_load(required(run.outputs, "ansibleInventory"))
    written = inventory_from_spec(load_spec(spec), join_kubernetes=True).data
    for group in exported["all"]["children"]["gpu_nodes"]["children"].values():
        for name, host_vars in group["hosts"].items():
            # Without controlplane:inventory, an existing pool's spec hosts are the addresses.
            assert host_vars.pop("ansible_host") == name
    assert exported == written


@pytest.mark.parametrize("stack", STACKS)
def test_every_exported_host_carries_what_the_roles_read_as_they_declare_it(stack: str, tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(required(run_stack(stack).outputs, "ansibleInventory"))
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(path), "--list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    hostvars = json.loads(result.stdout)["_meta"]["hostvars"]
    options = role_options()
    assert hostvars
    for host, variables in hostvars.items():
        has_layout = {"mig_layout", "mig_profiles", "mig_gpus"} & set(variables)
        missing = {"gpu_model", "gpu_count", "rdma_fabric", "k8s_node_labels", "ansible_host"} - set(variables)
        assert has_layout and not missing, f"{stack}/{host} lacks {missing or 'a MIG layout'}"
        for name in set(variables) & set(options):
            for role, option in options[name].items():
                assert isinstance(variables[name], YAML_TYPES[option["type"]]), f"{host}: {name} for role {role}"
