"""Role decisions that the SSH test hosts (all Debian 12, never joining Kubernetes) cannot show, checked with
Ansible's own templating (ansible.template.Templar) on the roles' real defaults and task files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

ROLES = Path(__file__).resolve().parent.parent / "playbooks" / "roles"

FACTS = {
    "ubuntu2204": {"distribution": "Ubuntu", "distribution_version": "22.04", "distribution_major_version": "22"},
    "ubuntu2404": {"distribution": "Ubuntu", "distribution_version": "24.04", "distribution_major_version": "24"},
    "debian12": {"distribution": "Debian", "distribution_version": "12.11", "distribution_major_version": "12"},
}


def render(expression: str, variables: dict) -> object:
    """`expression` templated as Ansible would, the variables' own templates trusted as role defaults are."""
    trusted = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in variables.items()}
    return Templar(loader=DataLoader(), variables=trusted).template(trust_as_template(expression))


def defaults(role: str) -> dict:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())


@pytest.mark.parametrize("distribution", sorted(FACTS))
def test_cuda_repository_is_the_hosts_distributions(distribution: str) -> None:
    facts = {"ansible_facts": FACTS[distribution]}
    driver = render("{{ nvidia_driver_repo_url }}", defaults("nvidia_driver") | facts)
    assert driver == f"https://developer.download.nvidia.com/compute/cuda/repos/{distribution}/x86_64/"
    # The toolkit role alone (no nvidia_driver variables) picks the same repository.
    assert render("{{ cuda_toolkit_repo_url }}", defaults("cuda_toolkit") | facts) == driver


def test_driver_branch_is_580_or_newer_and_fabric_manager_follows_it() -> None:
    values = defaults("nvidia_driver")
    assert int(values["nvidia_driver_branch"]) >= 580
    assert render("{{ nvidia_driver_fabric_manager_package }}", values) == "nvidia-fabricmanager-580"
    assert values["nvidia_driver_fabric_manager"] == "auto"


def test_node_labels_are_written_before_kubeadm_join_and_name_every_label() -> None:
    tasks = yaml.safe_load((ROLES / "k8s_node" / "tasks" / "main.yml").read_text())
    names = [task["name"] for task in tasks]
    labels = names.index("Set the node labels kubelet registers with")
    assert labels < names.index("Join the cluster"), "labels after the join are never registered by kubelet"
    content = tasks[labels]["ansible.builtin.copy"]["content"]
    node_labels = {"controlplane.io/pool": "h100", "nvidia.com/mig.config": "h100-1"}
    assert render(content, {"k8s_node_labels": node_labels}) == (
        "KUBELET_EXTRA_ARGS=--node-labels=controlplane.io/pool=h100,nvidia.com/mig.config=h100-1\n")


def test_containerd_cgroup_driver_is_the_container_toolkits_alone() -> None:
    # One writer of containerd's runtime configuration: the k8s_node role no longer edits config.toml.
    assert "containerd" not in (ROLES / "k8s_node" / "tasks" / "main.yml").read_text()
    assert defaults("container_toolkit")["container_toolkit_systemd_cgroup"] is True
