"""`AzureGpuNodePool`: ND-series GPU nodes with InfiniBand, as one VM scale set in a proximity placement group.

- The ND H100 v5 size (Standard_ND96isr_H100_v5) carries 8 x 400 Gb/s NDR InfiniBand; the IB fabric is
  only shared by VMs of ONE scale set with `single_placement_group`, so a pool is one scale set.
- The image is Microsoft's HPC image (microsoft-dsvm:ubuntu-hpc): MOFED, the NVIDIA driver, NCCL and the
  IB tooling come installed, which the Network Operator's host-MOFED mode and the Ansible RDMA checks expect.
- Accelerated networking on the Ethernet NIC (SR-IOV) for the control traffic; the IB VFs need no setting.
- Uniform orchestration without overprovisioning: instance ids are 0..count-1 on a new scale set, so host
  names (`<prefix><instance id in base 36, 6 digits>`) are known before the VMs exist and resolve through the
  virtual network's DNS; Ansible reaches the nodes by those names through the pool's bastion, and they
  reach the internet through its NAT gateway (`infra.azure_network`).
"""

from __future__ import annotations

import pulumi
import pulumi_azure_native as azure

from controlplane.names import dns_label
from infra.azure_network import AzureNetworkArgs, AzurePoolNetwork
from infra.pools import POOL_LABEL, GpuNodePool, NodePoolArgs, b64, cloud_init, proxy_jump_vars

HPC_IMAGE = {"publisher": "microsoft-dsvm", "offer": "ubuntu-hpc", "sku": "2204", "version": "latest"}
ND_H100_V5 = "Standard_ND96isr_H100_v5"

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def scale_set_hostname(prefix: str, instance_id: int) -> str:
    """The computer name Azure gives instance `instance_id` of a Uniform scale set."""
    digits = ""
    value = instance_id
    while True:
        value, rest = divmod(value, 36)
        digits = _BASE36[rest] + digits
        if value == 0:
            break
    return prefix + digits.rjust(6, "0")


class AzureGpuNodePool(GpuNodePool):
    """Resource group, network (vnet, NAT gateway, bastion), proximity placement group and the scale set."""

    def __init__(self, name: str, args: NodePoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("controlplane:infra:AzureGpuNodePool", name, None, opts)
        pool, settings = args.pool, args.settings.azure
        if not settings.ssh_public_key:
            raise ValueError(f"pool '{pool.name}': set controlplane:azure.sshPublicKey (the scale set allows SSH "
                             "keys only)")
        tags = {"controlplane.io-cluster": args.cluster, POOL_LABEL.replace("/", "-"): pool.name}

        provider = azure.Provider(f"{name}-azure", location=settings.location,
                                  subscription_id=settings.subscription_id, opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, provider=provider)

        group = azure.resources.ResourceGroup(f"{name}-rg", location=settings.location, tags=tags, opts=child)
        network = AzurePoolNetwork(f"{name}-net", AzureNetworkArgs(settings, group.name, tags),
                                   pulumi.ResourceOptions(parent=self, providers=[provider]))
        subnet = network.node_subnet
        placement = azure.compute.ProximityPlacementGroup(
            f"{name}-ppg",
            resource_group_name=group.name,
            location=settings.location,
            proximity_placement_group_type="Standard",
            intent={"vm_sizes": [pool.instance_type]},
            tags=tags,
            opts=child,
        )
        prefix = dns_label(pool.name).replace("-", "")[:9] or "node"
        scale_set = azure.compute.VirtualMachineScaleSet(
            f"{name}-vmss",
            resource_group_name=group.name,
            location=settings.location,
            sku={"name": pool.instance_type, "tier": "Standard", "capacity": pool.count},
            orchestration_mode="Uniform",
            overprovision=False,
            single_placement_group=True,
            platform_fault_domain_count=1,
            proximity_placement_group={"id": placement.id},
            upgrade_policy={"mode": "Manual"},
            virtual_machine_profile={
                "os_profile": {
                    "computer_name_prefix": prefix,
                    "admin_username": settings.admin_username,
                    "custom_data": b64(cloud_init(args, "true  # the scale set names the host")),
                    "linux_configuration": {
                        "disable_password_authentication": True,
                        "ssh": {"public_keys": [{
                            "path": f"/home/{settings.admin_username}/.ssh/authorized_keys",
                            "key_data": settings.ssh_public_key,
                        }]},
                    },
                },
                "storage_profile": {
                    "image_reference": HPC_IMAGE,
                    "os_disk": {"create_option": "FromImage", "caching": "ReadWrite",
                                "disk_size_gb": settings.os_disk_gib,
                                "managed_disk": {"storage_account_type": "Premium_LRS"}},
                },
                "network_profile": {
                    "network_interface_configurations": [{
                        "name": "nic",
                        "primary": True,
                        "enable_accelerated_networking": True,
                        "ip_configurations": [{"name": "ip", "subnet": {"id": subnet.id}}],
                    }],
                },
            },
            tags=tags,
            opts=child,
        )
        self.scale_set = scale_set
        self.placement_group = placement
        hostnames = [scale_set_hostname(prefix, i) for i in range(pool.count)]
        # The names resolve inside the virtual network; they are known once the scale set exists.
        self.network = network
        self._finish(args, hostnames, scale_set.name.apply(lambda _: hostnames),
                     proxy_jump_vars(settings.admin_username, network.bastion_address))
