"""`AzurePoolNetwork`: the way in and out of an Azure pool: its virtual network, the node subnet behind a NAT
gateway, and a bastion VM with a public address that Ansible jumps through.

Why this shape:
- Azure's default outbound access for VMs without a public address is being retired, and a scale set in
  a subnet without a NAT gateway may get none: the nodes fetch packages and images through the NAT
  gateway's static address;
- the nodes have no public address; Ansible reaches them by their host names, which resolve inside the
  virtual network, through the bastion (SSH only from `sshIngressCidr`; closed when the stack sets none).
  A plain VM rather than the Azure Bastion service: Ansible needs an SSH jump host, not a portal tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_azure_native as azure

from infra.pools import checked_ingress, split_range
from infra.settings import AzureSettings

BASTION_IMAGE = {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts-gen2",
                 "version": "latest"}


@dataclass(frozen=True)
class AzureNetworkArgs:
    settings: AzureSettings
    resource_group: pulumi.Input[str]
    tags: dict[str, str]


class AzurePoolNetwork(pulumi.ComponentResource):
    """Virtual network, NAT gateway, node and bastion subnets, and the bastion VM of one pool."""

    def __init__(self, name: str, args: AzureNetworkArgs, opts: pulumi.ResourceOptions) -> None:
        super().__init__("controlplane:infra:AzurePoolNetwork", name, None, opts)
        settings, tags, group = args.settings, args.tags, args.resource_group
        if not settings.ssh_ingress_cidr:
            pulumi.log.warn("controlplane:azure.sshIngressCidr is not set: the bastion admits no SSH, so Ansible "
                            "cannot reach the nodes; set it to the addresses Ansible connects from (a.b.c.d/32)", self)
        child = pulumi.ResourceOptions(parent=self)
        located = {"resource_group_name": group, "location": settings.location}
        nodes_cidr, bastion_cidr = split_range(settings.vnet_cidr, "azure.vnetCidr")
        ingress_cidr = checked_ingress(settings.ssh_ingress_cidr, "azure.sshIngressCidr")

        vnet = azure.network.VirtualNetwork(f"{name}-vnet", **located,
                                            address_space={"address_prefixes": [settings.vnet_cidr]}, tags=tags,
                                            opts=child)
        nat_address = self._public_ip(f"{name}-nat-ip", located, tags, child)
        nat = azure.network.NatGateway(f"{name}-nat", **located, sku={"name": "Standard"},
                                       public_ip_addresses=[{"id": nat_address.id}], tags=tags, opts=child)
        self.node_subnet = azure.network.Subnet(f"{name}-nodes", resource_group_name=group,
                                                virtual_network_name=vnet.name, address_prefix=nodes_cidr,
                                                nat_gateway={"id": nat.id}, opts=child)

        ssh_rule = {"name": "ssh-from-operators", "priority": 100, "direction": "Inbound", "access": "Allow",
                    "protocol": "Tcp", "source_address_prefix": ingress_cidr, "source_port_range": "*",
                    "destination_address_prefix": "*", "destination_port_range": "22"}
        rules = [ssh_rule] if ingress_cidr else []
        security = azure.network.NetworkSecurityGroup(f"{name}-bastion", **located, security_rules=rules, tags=tags,
                                                      opts=child)
        bastion_subnet = azure.network.Subnet(f"{name}-bastion", resource_group_name=group,
                                              virtual_network_name=vnet.name, address_prefix=bastion_cidr,
                                              network_security_group={"id": security.id}, opts=child)
        bastion_address = self._public_ip(f"{name}-bastion-ip", located, tags, child)
        nic = azure.network.NetworkInterface(f"{name}-bastion", **located, ip_configurations=[{
            "name": "ip", "subnet": {"id": bastion_subnet.id}, "public_ip_address": {"id": bastion_address.id},
            "private_ip_allocation_method": "Dynamic"}], tags=tags, opts=child)
        self.bastion = azure.compute.VirtualMachine(
            f"{name}-bastion", **located,
            hardware_profile={"vm_size": settings.bastion_vm_size},
            os_profile={"computer_name": "bastion", "admin_username": settings.admin_username,
                        "linux_configuration": {"disable_password_authentication": True, "ssh": {"public_keys": [{
                            "path": f"/home/{settings.admin_username}/.ssh/authorized_keys",
                            "key_data": settings.ssh_public_key}]}}},
            storage_profile={"image_reference": BASTION_IMAGE,
                             "os_disk": {"create_option": "FromImage",
                                         "managed_disk": {"storage_account_type": "StandardSSD_LRS"}}},
            network_profile={"network_interfaces": [{"id": nic.id, "primary": True}]},
            tags=tags, opts=child)
        self.bastion_address: pulumi.Output[str] = bastion_address.ip_address.apply(str)
        self.register_outputs({"bastionAddress": self.bastion_address})

    @staticmethod
    def _public_ip(name: str, located: dict, tags: dict[str, str],
                   opts: pulumi.ResourceOptions) -> azure.network.PublicIPAddress:
        # Standard SKU: what a NAT gateway requires, and static, so the address in the inventory stays.
        return azure.network.PublicIPAddress(name, **located, sku={"name": "Standard"},
                                             public_ip_allocation_method="Static", tags=tags, opts=opts)
