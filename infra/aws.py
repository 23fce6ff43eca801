"""`AwsGpuNodePool`: GPU nodes on EC2 with every EFA interface of the instance type, in one placement group,
in a private subnet of the pool's network (`infra.aws_network`: NAT out, a bastion in).

What EFA needs, and where each need is met:
- every network card gets an EFA interface (`interface_type: efa`, one per `network_card_index`): fewer
  interfaces means less of the instance's fabric bandwidth (p5.48xlarge: 32 x 100 Gbps);
- the security group admits ALL traffic from and to itself: EFA's SRD transport is not TCP/UDP, so port
  rules do not cover it;
- one subnet, one availability zone and a `cluster` placement group: EFA does not cross AZs, and the
  placement group keeps nodes on the same network spine.
Nodes are individual instances from one launch template (not an Auto Scaling group) so that each has a
stable name and an address Pulumi can hand to the Ansible inventory.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from controlplane.names import dns_label
from infra.aws_network import BASTION_USER, AwsNetworkArgs, AwsPoolNetwork
from infra.pools import GpuNodePool, NodePoolArgs, b64, cloud_init, proxy_jump_vars

# Network cards (= EFA interfaces at full bandwidth) per instance type.
EFA_INTERFACES: dict[str, int] = {
    "p4d.24xlarge": 4,
    "p4de.24xlarge": 4,
    "p5.48xlarge": 32,
    "p5e.48xlarge": 32,
    "p5en.48xlarge": 16,
}

# Ubuntu with the NVIDIA driver, the EFA installer and the AWS OFI NCCL plugin: the host stack EFA needs.
GPU_AMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
AMAZON_OWNER = "amazon"

# Tag keys: instance tags are readable from instance metadata (below), and EC2 then refuses any instance
# tag key holding `/` or a space, so the Kubernetes-style `controlplane.io/cluster` cannot be a tag key.
CLUSTER_TAG = "controlplane.io:cluster"
POOL_TAG = "controlplane.io:pool"

# The instance tag named `Name` becomes the host name (via instance metadata tags), hence the node name.
HOSTNAME_FROM_TAG = (
    'TOKEN=$(curl -sX PUT http://169.254.169.254/latest/api/token -H "X-aws-ec2-metadata-token-ttl-seconds: 60")\n'
    'hostnamectl set-hostname "$(curl -s -H "X-aws-ec2-metadata-token: $TOKEN" '
    'http://169.254.169.254/latest/meta-data/tags/instance/Name)"'
)


def efa_interface_count(instance_type: str, override: int | None = None) -> int:
    """EFA interfaces to attach; ValueError naming the known types when the instance type is unknown."""
    if override is not None:
        return override
    try:
        return EFA_INTERFACES[instance_type]
    except KeyError:
        raise ValueError(
            f"no EFA interface count known for {instance_type} (known: {', '.join(sorted(EFA_INTERFACES))}); "
            "set controlplane:aws.efaInterfaces to its number of network cards"
        ) from None


def efa_interfaces(count: int, security_group_id: pulumi.Input[str], subnet_id: pulumi.Input[str]) -> list[dict]:
    """Launch-template interfaces, one EFA per network card. Card 0 carries the primary interface (device 0);
    on the other cards the EFA is device 1, as EC2 requires for multi-card instances."""
    return [
        {
            "network_card_index": card,
            "device_index": 0 if card == 0 else 1,
            "interface_type": "efa",
            "subnet_id": subnet_id,
            "security_groups": [security_group_id],
            "delete_on_termination": "true",
        }
        for card in range(count)
    ]


class AwsGpuNodePool(GpuNodePool):
    """Network (VPC, subnets, gateways, bastion), EFA security group, cluster placement group, launch template
    and the pool's instances."""

    def __init__(self, name: str, args: NodePoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("controlplane:infra:AwsGpuNodePool", name, None, opts)
        pool, aws_settings = args.pool, args.settings.aws
        efa = args.pool.fabric == "efa"
        interfaces = efa_interface_count(pool.instance_type, aws_settings.efa_interfaces) if efa else 1
        tags = {CLUSTER_TAG: args.cluster, POOL_TAG: pool.name}

        provider = aws.Provider(f"{name}-aws", region=aws_settings.region, profile=aws_settings.profile,
                                opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)

        network = AwsPoolNetwork(f"{name}-net", AwsNetworkArgs(aws_settings, tags, f"{args.cluster}-{pool.name}"),
                                 pulumi.ResourceOptions(parent=self, providers=[provider]))
        vpc, subnet = network.vpc, network.node_subnet
        security_group = aws.ec2.SecurityGroup(
            f"{name}-efa",
            vpc_id=vpc.id,
            description="EFA: all traffic within the group; SSH from the VPC",
            ingress=[
                {"protocol": "-1", "from_port": 0, "to_port": 0, "self": True, "description": "EFA all traffic in"},
                {"protocol": "tcp", "from_port": 22, "to_port": 22, "cidr_blocks": [aws_settings.vpc_cidr],
                 "description": "SSH (Ansible) from inside the VPC"},
            ],
            egress=[
                {"protocol": "-1", "from_port": 0, "to_port": 0, "self": True, "description": "EFA all traffic out"},
                {"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"],
                 "description": "packages and images"},
            ],
            tags=tags,
            opts=child,
        )
        placement = aws.ec2.PlacementGroup(f"{name}-placement", strategy="cluster", tags=tags, opts=child)

        image_id: pulumi.Input[str]
        if aws_settings.ami_id:
            image_id = aws_settings.ami_id
        else:
            ami = aws.ec2.get_ami_output(
                most_recent=True,
                owners=[AMAZON_OWNER],
                filters=[{"name": "name", "values": [GPU_AMI_NAME]}, {"name": "architecture", "values": ["x86_64"]}],
                opts=pulumi.InvokeOptions(parent=self, provider=provider),
            )
            image_id = ami.id

        template = aws.ec2.LaunchTemplate(
            f"{name}-template",
            instance_type=pool.instance_type,
            image_id=image_id,
            key_name=aws_settings.ssh_key_name,
            placement={"group_name": placement.name},
            network_interfaces=efa_interfaces(interfaces, security_group.id, subnet.id) if efa else [
                {"device_index": 0, "subnet_id": subnet.id, "security_groups": [security_group.id]}
            ],
            # IMDSv2 only; instance tags readable from metadata, so the Name tag can become the host name.
            metadata_options={"http_tokens": "required", "http_endpoint": "enabled",
                              "instance_metadata_tags": "enabled"},
            block_device_mappings=[{"device_name": "/dev/sda1",
                                    "ebs": {"volume_size": aws_settings.root_volume_gib, "volume_type": "gp3",
                                            "delete_on_termination": "true"}}],
            user_data=b64(cloud_init(args, HOSTNAME_FROM_TAG)),
            tag_specifications=[{"resource_type": "instance", "tags": tags}],
            tags=tags,
            opts=child,
        )

        names = [dns_label(node) for node in args.plan_nodes]
        instances = [
            aws.ec2.Instance(
                f"{name}-{i}",
                launch_template={"id": template.id, "version": template.latest_version.apply(str)},
                tags={**tags, "Name": node},
                opts=child,
            )
            for i, node in enumerate(names)
        ]
        self.security_group = security_group
        self.placement_group = placement
        self.launch_template = template
        self.network = network
        self._finish(args, names, pulumi.Output.all(*[inst.private_ip for inst in instances]),
                     proxy_jump_vars(BASTION_USER, network.bastion_address))
