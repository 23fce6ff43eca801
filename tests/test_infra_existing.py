"""The existing-hosts pool under Pulumi mocks: no cloud resources, hosts from an Ansible inventory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_infra_support import inventory_addresses, k8s, required, run_stack, run_with


def test_existing_hosts_create_no_cloud_resources() -> None:
    types = {r.type for r in run_stack("existing").resources}
    cloud = {t for t in types if not t.startswith(("kubernetes:", "controlplane:", "pulumi:providers:kubernetes"))}
    assert cloud == set()
    assert types & {"kubernetes:apps/v1:Deployment"}  # the run did register the serving layer


def test_addresses_come_from_the_inventory() -> None:
    assert inventory_addresses(run_stack("existing")) == {"dgx-a": "192.0.2.11", "dgx-b": "192.0.2.12"}


def test_without_an_inventory_the_spec_hosts_are_the_addresses() -> None:
    run = run_with("existing", inventory="")
    assert inventory_addresses(run) == {"dgx-a": "dgx-a", "dgx-b": "dgx-b"}


def test_an_inventory_missing_a_planned_node_is_refused(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all:\n  children:\n    pool_dgx:\n      hosts:\n        dgx-a: {ansible_host: 192.0.2.11}\n")
    with pytest.raises(ValueError, match="lacks host.*dgx-b"):
        run_with("existing", inventory=str(inventory))


def test_mig_config_labels_name_the_existing_hosts() -> None:
    run = run_stack("existing")
    for host in ("dgx-a", "dgx-b"):
        labels = required(k8s(run, "Node", host), "metadata", "labels")
        assert labels["nvidia.com/mig.config"].startswith("dgx-")


def test_model_repository_claim_is_mounted_read_only() -> None:
    pod = required(k8s(run_stack("existing"), "Deployment", "main"), "spec", "template", "spec")
    source = next(v for v in required(pod, "volumes") if v["name"] == "model-source")
    assert source["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_hosts_are_read_from_the_cpctl_inventory_format(tmp_path: Path) -> None:
    # The one schema (controlplane/provision/inventory.py): gpu_nodes -> pool_<name>, hosts by node name.
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all:\n  children:\n    gpu_nodes:\n      children:\n        pool_dgx:\n"
                         "          hosts:\n            dgx-a: {ansible_host: 192.0.2.21}\n            dgx-b:\n")
    assert inventory_addresses(run_with("existing", inventory=str(inventory))) == {"dgx-a": "192.0.2.21",
                                                                                  "dgx-b": "dgx-b"}


def test_an_inventory_without_the_pools_group_names_the_group_it_needs(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all:\n  children:\n    dgx:\n      hosts:\n        dgx-a:\n")
    with pytest.raises(ValueError, match="no group 'pool_dgx'"):
        run_with("existing", inventory=str(inventory))


def test_a_malformed_inventory_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text("all: [not, a, mapping]\n")
    with pytest.raises(ValueError, match="no group 'pool_dgx'"):
        run_with("existing", inventory=str(inventory))
    inventory.write_text("all: {children: {pool_dgx: {hosts: [\n")
    with pytest.raises(ValueError, match="is not YAML"):
        run_with("existing", inventory=str(inventory))
