"""The AWS node pool under Pulumi mocks: every EFA interface, the EFA security group, one placement group."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controlplane.infra.offline import run_program, stack_config
from tests.test_infra_support import (
    fake_private_ip,
    inventory_addresses,
    inventory_of,
    only,
    required,
    run_stack,
    run_with,
)

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
    group = next(g.inputs for g in run_stack("aws").of_type("aws:ec2/securityGroup:SecurityGroup")
                 if g.name == "pool-efa-efa")
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
    assert {required(s.inputs, "availabilityZone") for s in run.of_type("aws:ec2/subnet:Subnet")} == {"us-east-1a"}


def test_image_comes_from_the_deep_learning_ami_lookup() -> None:
    run = run_stack("aws")
    lookups = [args for token, args in run.calls if token == "aws:ec2/getAmi:getAmi" and args["owners"] == ["amazon"]]
    assert len(lookups) == 1
    assert "Deep Learning" in lookups[0]["filters"][0]["values"][0]
    assert lookups[0]["owners"] == ["amazon"]
    assert required(only(run, LT).inputs, "imageId") == "ami-offline-lookup"


def test_instances_come_from_the_template_with_their_node_names() -> None:
    run = run_stack("aws")
    instances = [i for i in run.of_type("aws:ec2/instance:Instance") if "launchTemplate" in i.inputs]
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


# AWS: with instance tags in instance metadata, a tag key may hold only letters, digits and + - = . , _ : @
# (no '/' or space, 1-128 characters) and may not be '.', '..' or '_index'; other keys fail every launch.
METADATA_TAG_KEY = re.compile(r"[A-Za-z0-9+\-=.,_:@]{1,128}")


def tag_keys(inputs: dict) -> set[str]:
    """Every tag key of a resource's inputs, including the launch template's instance tag specifications."""
    keys = set(inputs.get("tags") or {})
    for spec in inputs.get("tagSpecifications") or []:
        keys |= set(spec.get("tags") or {})
    return keys


def test_every_tag_key_is_valid_where_instance_metadata_exposes_tags() -> None:
    run = run_stack("aws")
    assert required(only(run, LT).inputs, "metadataOptions", "instanceMetadataTags") == "enabled"
    aws_resources = [r for r in run.resources if r.type.startswith("aws:")]
    keys = set().union(*(tag_keys(r.inputs) for r in aws_resources))
    assert {"Name", "controlplane.io:cluster", "controlplane.io:pool"} <= keys
    bad = {k for k in keys if not METADATA_TAG_KEY.fullmatch(k) or k in (".", "..", "_index")}
    assert not bad, f"tag keys EC2 refuses with instance metadata tags: {bad}"


def test_nodes_are_private_behind_a_nat_gateway_and_ansible_jumps_through_the_bastion() -> None:
    run = run_stack("aws")
    ids = {r.name: f"{r.name}-offline-id" for r in run.resources}
    subnets = {r.name: r.inputs for r in run.of_type("aws:ec2/subnet:Subnet")}
    assert {n: s["cidrBlock"] for n, s in subnets.items()} == {"pool-efa-net-nodes": "10.42.0.0/17",
                                                               "pool-efa-net-public": "10.42.128.0/17"}
    # Which route table each subnet uses, and where its default route goes.
    tables = {r.name: r.inputs for r in run.of_type("aws:ec2/routeTable:RouteTable")}
    table_of = {a.inputs["subnetId"]: a.inputs["routeTableId"]
                for a in run.of_type("aws:ec2/routeTableAssociation:RouteTableAssociation")}

    def default_route(subnet: str) -> dict:
        table = next(t for name, t in tables.items() if ids[name] == table_of[ids[subnet]])
        return next(r for r in table["routes"] if r["cidrBlock"] == "0.0.0.0/0")

    nat = only(run, "aws:ec2/natGateway:NatGateway")
    gateway = only(run, "aws:ec2/internetGateway:InternetGateway")
    assert default_route("pool-efa-net-nodes")["natGatewayId"] == ids[nat.name]
    assert default_route("pool-efa-net-public")["gatewayId"] == ids[gateway.name]
    assert nat.inputs["subnetId"] == ids["pool-efa-net-public"]
    assert nat.inputs["allocationId"] == ids[only(run, "aws:ec2/eip:Eip").name]
    assert gateway.inputs["vpcId"] == ids["pool-efa-net-vpc"]
    # The nodes' interfaces are in the private subnet; the bastion is public, SSH only from the stack's CIDR.
    interfaces = required(only(run, LT).inputs, "networkInterfaces")
    assert {i["subnetId"] for i in interfaces} == {ids["pool-efa-net-nodes"]}
    bastion = next(i for i in run.of_type("aws:ec2/instance:Instance") if i.name == "pool-efa-net-bastion")
    assert bastion.inputs["associatePublicIpAddress"] is True
    assert bastion.inputs["subnetId"] == ids["pool-efa-net-public"]
    group = next(g for g in run.of_type("aws:ec2/securityGroup:SecurityGroup") if g.name == "pool-efa-net-bastion")
    assert [r["cidrBlocks"] for r in group.inputs["ingress"]] == [["198.51.100.0/24"]]
    assert bastion.inputs["vpcSecurityGroupIds"] == [ids[group.name]]
    # And the inventory sends Ansible through it.
    pool_vars = required(inventory_of(run), "all", "children", "gpu_nodes", "children", "pool_efa", "vars")
    bastion_address = "<address of pool-efa-net-bastion after pulumi up>"  # the mock's public address
    assert pool_vars["ansible_ssh_common_args"] == f"-o ProxyJump=ubuntu@{bastion_address}"


def test_without_an_ssh_ingress_cidr_the_bastion_admits_no_ssh() -> None:
    run = run_with("aws", aws='{"region": "us-east-1"}')
    group = next(g for g in run.of_type("aws:ec2/securityGroup:SecurityGroup") if g.name == "pool-efa-net-bastion")
    assert group.inputs.get("ingress", []) == []


def test_a_malformed_ssh_ingress_cidr_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"controlplane:aws.sshIngressCidr 'office'.*203.0.113.7/32"):
        run_with("aws", aws='{"sshIngressCidr": "office"}')
