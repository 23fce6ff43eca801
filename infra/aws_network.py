"""`AwsPoolNetwork`: the way in and out of an AWS pool: its VPC, a private subnet for the GPU nodes, a public
subnet with the internet gateway, a NAT gateway, and a bastion that Ansible jumps through.

Why this shape:
- an instance with several network interfaces (every EFA instance: one per network card) cannot get an
  automatic public address, so the nodes stay private and reach packages and images through the NAT
  gateway (their route table's default route);
- Ansible reaches them through a small bastion with a public address in the public subnet (its route
  table's default route is the internet gateway); SSH to the bastion is open only to `sshIngressCidr`
  (closed when the stack sets none).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.pools import checked_ingress, split_range
from infra.settings import AwsSettings

# Canonical's Ubuntu 22.04 for the bastion (it only forwards SSH); the user its image logs in as.
BASTION_AMI_OWNER = "099720109477"
BASTION_AMI_NAME = "ubuntu/images/hvm-ssd*/ubuntu-jammy-22.04-amd64-server-*"
BASTION_USER = "ubuntu"
ANYWHERE = "0.0.0.0/0"


@dataclass(frozen=True)
class AwsNetworkArgs:
    settings: AwsSettings
    tags: dict[str, str]
    name_tag: str


class AwsPoolNetwork(pulumi.ComponentResource):
    """VPC, subnets, internet and NAT gateways, route tables and the bastion of one pool."""

    def __init__(self, name: str, args: AwsNetworkArgs, opts: pulumi.ResourceOptions) -> None:
        super().__init__("controlplane:infra:AwsPoolNetwork", name, None, opts)
        settings, tags = args.settings, args.tags
        if not settings.ssh_ingress_cidr:
            pulumi.log.warn("controlplane:aws.sshIngressCidr is not set: the bastion admits no SSH, so Ansible "
                            "cannot reach the nodes; set it to the addresses Ansible connects from (a.b.c.d/32)", self)
        child = pulumi.ResourceOptions(parent=self)
        nodes_cidr, public_cidr = split_range(settings.vpc_cidr, "aws.vpcCidr")
        ingress_cidr = checked_ingress(settings.ssh_ingress_cidr, "aws.sshIngressCidr")

        self.vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=settings.vpc_cidr, enable_dns_hostnames=True,
                               enable_dns_support=True, tags={**tags, "Name": args.name_tag}, opts=child)
        gateway = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=tags, opts=child)
        public = aws.ec2.Subnet(f"{name}-public", vpc_id=self.vpc.id, cidr_block=public_cidr,
                                availability_zone=settings.availability_zone, tags=tags, opts=child)
        self._route_all(f"{name}-public", public, {"gateway_id": gateway.id}, tags, child)

        nat_address = aws.ec2.Eip(f"{name}-nat-ip", domain="vpc", tags=tags, opts=child)
        nat = aws.ec2.NatGateway(f"{name}-nat", allocation_id=nat_address.id, subnet_id=public.id, tags=tags,
                                 opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway]))
        self.node_subnet = aws.ec2.Subnet(f"{name}-nodes", vpc_id=self.vpc.id, cidr_block=nodes_cidr,
                                          availability_zone=settings.availability_zone, tags=tags, opts=child)
        self._route_all(f"{name}-nodes", self.node_subnet, {"nat_gateway_id": nat.id}, tags, child)

        self.bastion = self._bastion(f"{name}-bastion", settings, ingress_cidr, public, tags, child)
        self.bastion_address: pulumi.Output[str] = self.bastion.public_ip
        self.register_outputs({"bastionAddress": self.bastion_address})

    def _route_all(self, name: str, subnet: aws.ec2.Subnet, target: dict[str, pulumi.Input[str]],
                   tags: dict[str, str], opts: pulumi.ResourceOptions) -> None:
        """A route table for `subnet` whose default route goes to `target` (a gateway)."""
        table = aws.ec2.RouteTable(f"{name}-routes", vpc_id=self.vpc.id,
                                   routes=[{"cidr_block": ANYWHERE, **target}], tags=tags, opts=opts)
        aws.ec2.RouteTableAssociation(f"{name}-routes", subnet_id=subnet.id, route_table_id=table.id, opts=opts)

    def _bastion(self, name: str, settings: AwsSettings, ingress_cidr: str | None, subnet: aws.ec2.Subnet,
                 tags: dict[str, str], opts: pulumi.ResourceOptions) -> aws.ec2.Instance:
        # Closed unless the stack names who may connect: never SSH from anywhere by default.
        ingress = [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr_blocks": [ingress_cidr],
                    "description": "SSH (Ansible) from sshIngressCidr"}] if ingress_cidr else []
        group = aws.ec2.SecurityGroup(
            name, vpc_id=self.vpc.id, description="Bastion: SSH from the operators only", ingress=ingress,
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": [ANYWHERE],
                     "description": "SSH on to the nodes"}],
            tags=tags, opts=opts)
        ami = aws.ec2.get_ami_output(
            most_recent=True, owners=[BASTION_AMI_OWNER],
            filters=[{"name": "name", "values": [BASTION_AMI_NAME]}, {"name": "architecture", "values": ["x86_64"]}],
            opts=pulumi.InvokeOptions(parent=self))
        return aws.ec2.Instance(
            name, ami=ami.id, instance_type=settings.bastion_instance_type, subnet_id=subnet.id,
            associate_public_ip_address=True, vpc_security_group_ids=[group.id], key_name=settings.ssh_key_name,
            metadata_options={"http_tokens": "required"}, tags={**tags, "Name": name}, opts=opts)
