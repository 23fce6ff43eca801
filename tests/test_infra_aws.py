"""The AWS node pool under Pulumi mocks: every EFA interface, the EFA security group, one placement group."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.infra.offline import run_program, stack_config
from tests.test_infra_support import fake_private_ip, inventory_addresses, only, required, run_stack

LT = "aws:ec2/launchTemplate:LaunchTemplate"


def test_p5_launch_template_attaches_all_32_efa_interfaces_one_per_network_card() -> None:
    template = only(run_stack("aws"), LT).inputs
    interfaces = required(template, "networkInterfaces")
    assert required(template, "instanceType") == "p5.48xlarge"
    assert len(interfaces) == 32
    assert [i["networkCardIndex"] for i in interfaces] == list(range(32))
    assert {i["interfaceType"] for i in interfaces} == {"efa"}
    # The primary interface is device 0 on card 0; the EFA on every other card is device 1.
    assert [i["deviceIndex"] for i in interfaces] == [0] + [1] * 31
    assert all(required(i, "subnetId") and required(i, "securityGroups") for i in interfaces)


def test_p4d_gets_its_4_efa_interfaces(tmp_path: Path) -> None:
    spec = (Path(__file__).parent.parent / "examples/aws/cluster.yaml").read_text()
    changed = tmp_path / "cluster.yaml"
    changed.write_text(spec.replace("p5.48xlarge", "p4d.24xlarge").replace("H100-80GB", "A100-40GB")
                       .replace("model_repository: ../models", "model_repository: /models"))
    config, _ = stack_config("aws", changed)
    template = only(run_program(config, "aws", address_of=fake_private_ip), LT).inputs
    assert required(template, "instanceType") == "p4d.24xlarge"
    assert [i["networkCardIndex"] for i in required(template, "networkInterfaces")] == [0, 1, 2, 3]


def test_an_efa_pool_of_unknown_instance_type_is_refused_with_the_fix(tmp_path: Path) -> None:
    spec = (Path(__file__).parent.parent / "examples/aws/cluster.yaml").read_text()
    changed = tmp_path / "cluster.yaml"
    changed.write_text(spec.replace("p5.48xlarge", "g6.48xlarge").replace("model_repository: ../models",
                                                                           "model_repository: /models"))
    config, _ = stack_config("aws", changed)
    with pytest.raises(ValueError, match="efaInterfaces"):
        run_program(config, "aws")


def test_security_group_admits_all_traffic_from_and_to_itself() -> None:
    group = only(run_stack("aws"), "aws:ec2/securityGroup:SecurityGroup").inputs
    for direction in ("ingress", "egress"):
        rules = [r for r in required(group, direction) if r.get("self")]
        assert rules, f"no self-referencing {direction} rule"
        assert rules[0]["protocol"] == "-1" and rules[0]["fromPort"] == 0 and rules[0]["toPort"] == 0


def test_nodes_share_one_cluster_placement_group_in_one_zone() -> None:
    run = run_stack("aws")
    placement = only(run, "aws:ec2/placementGroup:PlacementGroup")
    assert required(placement.inputs, "strategy") == "cluster"
    # The template names the group the mock created (its `name` output): the dependency is wired.
    assert required(only(run, LT).inputs, "placement", "groupName") == placement.name
    assert required(only(run, "aws:ec2/subnet:Subnet").inputs, "availabilityZone") == "us-east-1a"


def test_image_comes_from_the_deep_learning_ami_lookup() -> None:
    run = run_stack("aws")
    lookups = [args for token, args in run.calls if token == "aws:ec2/getAmi:getAmi"]
    assert len(lookups) == 1
    assert "Deep Learning" in lookups[0]["filters"][0]["values"][0]
    assert lookups[0]["owners"] == ["amazon"]
    assert required(only(run, LT).inputs, "imageId") == "ami-offline-lookup"


def test_instances_come_from_the_template_with_their_node_names() -> None:
    run = run_stack("aws")
    instances = run.of_type("aws:ec2/instance:Instance")
    assert len(instances) == 2
    assert sorted(required(i.inputs, "tags", "Name") for i in instances) == ["efa-0", "efa-1"]
    for instance in instances:
        assert required(instance.inputs, "launchTemplate", "id") == "pool-efa-template-offline-id"
        assert required(instance.inputs, "launchTemplate", "version") == "1"


def test_user_data_names_the_host_after_its_tag_and_imdsv2_is_required() -> None:
    import base64

    template = only(run_stack("aws"), LT).inputs
    script = base64.b64decode(required(template, "userData")).decode()
    assert "hostnamectl set-hostname" in script and "tags/instance/Name" in script
    assert required(template, "metadataOptions", "httpTokens") == "required"
    assert required(template, "metadataOptions", "instanceMetadataTags") == "enabled"


def test_provider_takes_region_and_profile_from_the_stack() -> None:
    provider = only(run_stack("aws"), "pulumi:providers:aws").inputs
    assert required(provider, "region") == "us-east-1"
    assert required(provider, "profile") == "gpu-admin"


def test_inventory_lists_each_instance_at_its_private_address() -> None:
    assert inventory_addresses(run_stack("aws")) == {"efa-0": "10.42.0.10", "efa-1": "10.42.0.11"}
