"""The Azure node pool under Pulumi mocks: ND H100 v5 scale set, HPC image, placement and networking."""

from __future__ import annotations

import pytest

from infra.azure import scale_set_hostname
from tests.test_infra_support import inventory_addresses, inventory_of, k8s, only, required, run_stack, run_with

VMSS = "azure-native:compute:VirtualMachineScaleSet"


def test_scale_set_is_nd_h100_v5_with_the_pool_count() -> None:
    vmss = only(run_stack("azure"), VMSS).inputs
    assert required(vmss, "sku", "name") == "Standard_ND96isr_H100_v5"
    assert required(vmss, "sku", "capacity") == 2


def test_scale_set_uses_the_infiniband_ready_hpc_image() -> None:
    image = required(only(run_stack("azure"), VMSS).inputs, "virtualMachineProfile", "storageProfile",
                     "imageReference")
    assert (image["publisher"], image["offer"], image["sku"]) == ("microsoft-dsvm", "ubuntu-hpc", "2204")


def test_scale_set_keeps_one_infiniband_fabric_and_predictable_instances() -> None:
    vmss = only(run_stack("azure"), VMSS).inputs
    # IB is shared only inside one placement group; overprovisioning would add (and bill) surplus GPU VMs
    # and break the instance ids the host names are derived from.
    assert required(vmss, "singlePlacementGroup") is True
    assert required(vmss, "overprovision") is False
    assert required(vmss, "orchestrationMode") == "Uniform"


def test_scale_set_sits_in_the_proximity_placement_group() -> None:
    run = run_stack("azure")
    group = only(run, "azure-native:compute:ProximityPlacementGroup")
    assert required(group.inputs, "intent", "vmSizes") == ["Standard_ND96isr_H100_v5"]
    assert required(only(run, VMSS).inputs, "proximityPlacementGroup", "id") == f"{group.name}-offline-id"


def test_nic_has_accelerated_networking_on_the_pool_subnet() -> None:
    run = run_stack("azure")
    nic = required(only(run, VMSS).inputs, "virtualMachineProfile", "networkProfile",
                   "networkInterfaceConfigurations", 0)
    assert required(nic, "enableAcceleratedNetworking") is True
    assert required(nic, "ipConfigurations", 0, "subnet", "id") == "pool-ndh100-net-nodes-offline-id"


def test_ssh_keys_only() -> None:
    linux = required(only(run_stack("azure"), VMSS).inputs, "virtualMachineProfile", "osProfile",
                     "linuxConfiguration")
    assert required(linux, "disablePasswordAuthentication") is True
    assert required(linux, "ssh", "publicKeys", 0, "keyData").startswith("ssh-ed25519 ")


def test_a_stack_without_an_ssh_key_is_refused() -> None:
    with pytest.raises(ValueError, match="sshPublicKey"):
        run_with("azure", azure='{"location": "eastus"}')


def test_inventory_names_nodes_by_their_scale_set_host_names() -> None:
    # The inventory name is what `kubeadm join --node-name` registers, and what the label patches target.
    assert inventory_addresses(run_stack("azure")) == {"ndh100000000": "ndh100000000",
                                                       "ndh100000001": "ndh100000001"}
    assert scale_set_hostname("pool", 37) == "pool000011"


def test_node_labels_go_to_the_scale_set_host_names() -> None:
    patch = k8s(run_stack("azure"), "Node", "ndh100000001")
    assert required(patch, "metadata", "labels", "controlplane.io/pool") == "ndh100"


def test_infiniband_pools_get_the_network_operator_and_rdma_shared_device_plugin() -> None:
    import json

    run = run_stack("azure")
    policy = k8s(run, "NicClusterPolicy", "nic-cluster-policy")
    config = json.loads(required(policy, "spec", "rdmaSharedDevicePlugin", "config"))
    assert config["configList"][0]["resourceName"] == "rdma_shared_device_a"
    assert config["configList"][0]["selectors"]["linkTypes"] == ["infiniband"]
    charts = {r.inputs["chart"] for r in run.of_type("kubernetes:helm.sh/v3:Release")}
    assert charts == {"gpu-operator", "network-operator"}


def test_nodes_go_out_through_a_nat_gateway_and_ansible_jumps_through_the_bastion() -> None:
    run = run_stack("azure")
    ids = {r.name: f"{r.name}-offline-id" for r in run.resources}
    subnets = {r.name: r.inputs for r in run.of_type("azure-native:network:Subnet")}
    assert {n: s["addressPrefix"] for n, s in subnets.items()} == {"pool-ndh100-net-nodes": "10.43.0.0/17",
                                                                   "pool-ndh100-net-bastion": "10.43.128.0/17"}
    nat = only(run, "azure-native:network:NatGateway")
    assert subnets["pool-ndh100-net-nodes"]["natGateway"] == {"id": ids[nat.name]}
    assert nat.inputs["publicIpAddresses"] == [{"id": ids["pool-ndh100-net-nat-ip"]}]
    addresses = {r.name: r.inputs for r in run.of_type("azure-native:network:PublicIPAddress")}
    assert {a["sku"]["name"] for a in addresses.values()} == {"Standard"}  # a NAT gateway takes no Basic address
    # The bastion: a public address on its NIC, in its own subnet whose security group admits SSH only from
    # the stack's CIDR; the scale set's instances get no public address.
    nic = next(r.inputs for r in run.of_type("azure-native:network:NetworkInterface"))
    assert nic["ipConfigurations"][0]["publicIPAddress"] == {"id": ids["pool-ndh100-net-bastion-ip"]}
    assert nic["ipConfigurations"][0]["subnet"] == {"id": ids["pool-ndh100-net-bastion"]}
    vm = only(run, "azure-native:compute:VirtualMachine").inputs
    assert vm["networkProfile"]["networkInterfaces"][0]["id"] == ids["pool-ndh100-net-bastion"]
    security = only(run, "azure-native:network:NetworkSecurityGroup")
    assert subnets["pool-ndh100-net-bastion"]["networkSecurityGroup"] == {"id": ids[security.name]}
    assert [r["sourceAddressPrefix"] for r in security.inputs["securityRules"]] == ["198.51.100.0/24"]
    vmss_ip = required(only(run, VMSS).inputs, "virtualMachineProfile", "networkProfile",
                       "networkInterfaceConfigurations", 0, "ipConfigurations", 0)
    assert "publicIPAddressConfiguration" not in vmss_ip
    pool_vars = required(inventory_of(run), "all", "children", "gpu_nodes", "children", "pool_ndh100", "vars")
    bastion_address = "<address of pool-ndh100-net-bastion-ip after pulumi up>"  # the mock's public address
    assert pool_vars["ansible_ssh_common_args"] == f"-o ProxyJump=azureuser@{bastion_address}"


def test_every_tag_key_is_one_azure_accepts() -> None:
    # Azure refuses tag names holding < > % & \ ? / (and more than 512 characters).
    keys = set().union(*(set(r.inputs.get("tags") or {}) for r in run_stack("azure").resources
                         if r.type.startswith("azure-native:")))
    assert keys, "no tags recorded"
    assert not {k for k in keys if set(k) & set("<>%&\\?/") or len(k) > 512}, keys
