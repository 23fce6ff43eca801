"""What discovery reports about a host's GPUs: GPUs, MIG profiles, GPU and compute instances, MIG devices.

Filled by `controlplane.gpu.nvml` (NVML) or `controlplane.gpu.nvidia_smi` (nvidia-smi output); read by
`cpctl gpu`, the MIG reconcile (`controlplane.gpu.reconcile`) and `cpctl doctor`. Standard library only: GPU
hosts without the project's other dependencies import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class NoGpuError(RuntimeError):
    """No NVIDIA GPU could be read on this machine (no driver, no device, or no tool to ask)."""


@dataclass
class ProfileInfo:
    """A GPU instance profile as the driver reports it."""

    name: str
    profile_id: int
    free: int | None
    total: int
    memory_mib: int
    sms: int | None
    placements: list[tuple[int, int]] = field(default_factory=list)  # (start, size) in memory slots


@dataclass
class GpuInstanceInfo:
    gi_id: int
    profile_id: int
    profile: str
    start: int
    size: int


@dataclass
class ComputeInstanceInfo:
    gi_id: int
    ci_id: int
    profile_id: int
    profile: str


@dataclass
class MigDeviceInfo:
    """A MIG device (a compute instance as CUDA sees it), with the UUID for CUDA_VISIBLE_DEVICES."""

    uuid: str
    name: str | None = None
    gi_id: int | None = None
    ci_id: int | None = None
    memory_total_mib: int | None = None


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None
    mig_current: bool | None  # None: the GPU has no MIG
    mig_pending: bool | None
    catalog_model: str | None  # the spec's name for this GPU model, when the catalog knows it
    profiles: list[ProfileInfo] = field(default_factory=list)
    gpu_instances: list[GpuInstanceInfo] = field(default_factory=list)
    compute_instances: list[ComputeInstanceInfo] = field(default_factory=list)
    mig_devices: list[MigDeviceInfo] = field(default_factory=list)


@dataclass
class HostGpus:
    """The GPUs of one host as discovery found them (`cpctl gpu --json` prints `to_dict()`)."""

    source: str  # "nvml" or "nvidia-smi"
    driver_version: str | None
    gpus: list[GpuInfo]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostGpus:
        """The GPUs from `to_dict` output (`cpctl gpu --json` saved to a file)."""
        gpus = []
        for g in data["gpus"]:
            gpus.append(
                GpuInfo(
                    **{k: v for k, v in g.items()
                       if k not in ("profiles", "gpu_instances", "compute_instances", "mig_devices")},
                    profiles=[ProfileInfo(**{**p, "placements": [tuple(x) for x in p["placements"]]})
                              for p in g.get("profiles", [])],
                    gpu_instances=[GpuInstanceInfo(**x) for x in g.get("gpu_instances", [])],
                    compute_instances=[ComputeInstanceInfo(**x) for x in g.get("compute_instances", [])],
                    mig_devices=[MigDeviceInfo(**x) for x in g.get("mig_devices", [])],
                )
            )
        return cls(data["source"], data.get("driver_version"), gpus)
