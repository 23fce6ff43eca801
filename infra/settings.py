"""Stack settings: what a Pulumi stack adds to cluster.yaml (regions, credentials references, images, scaling).

cluster.yaml says WHAT runs (pools, shards, classes); a stack says WHERE and WITH WHAT (cloud region, the
AWS profile or Azure subscription to use, image references, the gateway's replica bounds). Secrets (the
registry password, a kubeconfig) are read with `require_secret`/`get_secret`, so they stay Pulumi secrets in
state and in every resource that uses them.

Every key lives in the `controlplane:` namespace of the stack file (infra/stacks/Pulumi.STACK.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from pydantic import ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from controlplane.spec import StrictModel

CONFIG_NAMESPACE = "controlplane"
# The Pulumi project's folder, where Pulumi.yaml says `main: infra/`: relative paths in a stack's config are
# relative to it, in a checkout and in the copy a wheel carries alike (controlplane/resources.py).
PULUMI_PROJECT_DIR = Path(__file__).resolve().parent.parent


class StackSection(StrictModel):
    """A `controlplane:` config object, validated like the spec (unknown keys are errors, not typos ignored);
    its keys are camelCase, as Pulumi stack files write them."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class AwsSettings(StackSection):
    """Where and as whom AWS pools are created (`controlplane:aws`)."""

    region: str = "us-east-1"
    # EFA traffic cannot cross availability zones, and a cluster placement group lives in one: one zone.
    availability_zone: str = "us-east-1a"
    # A named profile of the AWS shared credentials file: a reference, never keys in the stack.
    profile: str | None = None
    # Split in two: the GPU nodes' private subnet and the public one (NAT gateway, bastion).
    vpc_cidr: str = "10.42.0.0/16"
    # Who may SSH to the bastion (the nodes themselves take SSH from inside the VPC only); unset: nobody.
    ssh_ingress_cidr: str | None = None
    bastion_instance_type: str = "t3.small"
    ssh_key_name: str | None = None
    # Overrides the Deep Learning AMI lookup (pin an AMI for reproducible nodes).
    ami_id: str | None = None
    # For instance types missing from infra.aws.EFA_INTERFACES.
    efa_interfaces: int | None = None
    root_volume_gib: int = 500


class AzureSettings(StackSection):
    """Where and as whom Azure pools are created (`controlplane:azure`)."""

    location: str = "eastus"
    # The subscription to bill; credentials come from `az login`, a managed identity or OIDC, not the stack.
    subscription_id: str | None = None
    admin_username: str = "azureuser"
    ssh_public_key: str = ""
    # Split in two: the nodes' subnet (behind the NAT gateway) and the bastion's.
    vnet_cidr: str = "10.43.0.0/16"
    # Who may SSH to the bastion; unset: nobody (the nodes have no public address).
    ssh_ingress_cidr: str | None = None
    bastion_vm_size: str = "Standard_B2s"
    os_disk_gib: int = 256


class GatewayScaling(StackSection):
    """The gateway's Deployment, Service and HPA (`controlplane:gateway`); the spec has no such fields yet."""

    replicas: int = 2
    min_replicas: int = 2
    max_replicas: int = 8
    target_cpu_utilization: int = 70
    service_type: str = "ClusterIP"
    cpu: str = "2"
    memory: str = "512Mi"


class KubernetesSettings(StackSection):
    """The serving layer (`controlplane:kubernetes`)."""

    # Off for the first `pulumi up` of a cloud stack: the nodes must have joined the cluster (Ansible)
    # before node labels can be patched onto them.
    enabled: bool = True
    namespace: str = "serving"
    shard_image: str = "ghcr.io/example/controlplane-triton-shard:0.1.0"
    controlplane_image: str = "ghcr.io/example/controlplane:0.1.0"
    # A PersistentVolumeClaim holding the model repository; without one, the repository baked into the shard
    # image is copied into the pod's volume at start.
    model_repository_claim: str | None = None
    gpu_operator_version: str = "v26.3.3"
    network_operator_version: str = "26.4.0"
    # Driver, container toolkit and MOFED are installed on the hosts by the Ansible playbooks (or come with
    # the cloud image), so the operators must not install their own.
    preinstalled_driver: bool = True
    gateway: GatewayScaling = Field(default_factory=GatewayScaling)


@dataclass(frozen=True)
class RegistryCredentials:
    """An image pull secret for the shard and control-plane images; the password is a Pulumi secret."""

    server: str
    username: str
    password: pulumi.Output[str]


@dataclass(frozen=True)
class StackSettings:
    spec_path: Path
    aws: AwsSettings
    azure: AzureSettings
    kubernetes: KubernetesSettings
    # An Ansible inventory (YAML) naming the hosts of `existing` pools, instead of the spec's `hosts`.
    inventory_path: Path | None = None
    kubeconfig: pulumi.Output[str] | None = None
    registry: RegistryCredentials | None = None


def _section(cls: type[StackSection], data: dict[str, Any] | None, key: str) -> Any:
    """One config object, or ValueError naming each wrong key as `controlplane:KEY.FIELD: WHAT`."""
    try:
        return cls.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(f"{CONFIG_NAMESPACE}:{'.'.join(map(str, (key, *error['loc'])))}: {error['msg']}"
                             for error in exc.errors())
        raise ValueError(problems) from None


def _resolve(path: str) -> Path:
    candidate = Path(path)
    return candidate if candidate.is_absolute() else PULUMI_PROJECT_DIR / candidate


def read_settings(config: pulumi.Config | None = None) -> StackSettings:
    """The stack's settings from `controlplane:*` config keys."""
    config = config or pulumi.Config(CONFIG_NAMESPACE)
    registry = None
    server = config.get("registryServer")
    if server:
        registry = RegistryCredentials(server, config.require("registryUsername"),
                                       config.require_secret("registryPassword"))
    inventory = config.get("inventory")
    return StackSettings(
        spec_path=_resolve(config.require("spec")),
        aws=_section(AwsSettings, config.get_object("aws"), "aws"),
        azure=_section(AzureSettings, config.get_object("azure"), "azure"),
        kubernetes=_section(KubernetesSettings, config.get_object("kubernetes"), "kubernetes"),
        inventory_path=_resolve(inventory) if inventory else None,
        kubeconfig=config.get_secret("kubeconfig"),
        registry=registry,
    )
