"""GPU discovery through NVML (nvidia-ml-py), read-only: only NVML getters are called.

`discover_nvml` fills `controlplane.gpu.devices`; `import_nvml` is None where nvidia-ml-py is missing.
The out-parameter calls follow the real capture in tests/data/nvidia-smi/*/nvml.txt.
"""

from __future__ import annotations

import ctypes
from types import ModuleType
from typing import Any

from controlplane.gpu.catalog import model_for_product
from controlplane.gpu.devices import (
    ComputeInstanceInfo,
    GpuInfo,
    GpuInstanceInfo,
    HostGpus,
    MigDeviceInfo,
    ProfileInfo,
)


def import_nvml() -> ModuleType | None:
    """The pynvml module of nvidia-ml-py, or None where it is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str or bytes depending on its version.
    return value.decode() if isinstance(value, bytes) else value


def _profile_constants(nvml: ModuleType) -> list[int]:
    """Every NVML_GPU_INSTANCE_PROFILE_* constant this binding knows; the driver reports which it supports."""
    names = sorted(n for n in dir(nvml) if n.startswith("NVML_GPU_INSTANCE_PROFILE_") and not n.endswith("COUNT"))
    return sorted({getattr(nvml, n) for n in names})


def discover_nvml(nvml: ModuleType) -> HostGpus:
    """Read every GPU through NVML; the caller has checked that `nvml` imports. NVMLError propagates."""
    nvml.nvmlInit()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        return HostGpus("nvml", driver, [_gpu_nvml(nvml, i) for i in range(nvml.nvmlDeviceGetCount())])
    finally:
        nvml.nvmlShutdown()


def _gpu_nvml(nvml: ModuleType, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: int | None = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except nvml.NVMLError:  # not supported while MIG is enabled
        utilization = None
    try:
        current, pending = nvml.nvmlDeviceGetMigMode(handle)
        mig_current: bool | None = bool(current)
        mig_pending: bool | None = bool(pending)
    except nvml.NVMLError:  # a GPU without MIG
        mig_current = mig_pending = None
    model = model_for_product(name)
    gpu = GpuInfo(
        index, name, _text(nvml.nvmlDeviceGetUUID(handle)), memory.total // 2**20, memory.used // 2**20,
        utilization, mig_current, mig_pending, model.name if model else None,
    )
    if mig_current is None:
        return gpu
    gpu.profiles = _profiles_nvml(nvml, handle)
    if mig_current:
        handles = _gpu_instance_handles_nvml(nvml, handle, gpu.profiles)
        gpu.gpu_instances = sorted((info for _, info in handles), key=lambda g: g.start)
        gpu.compute_instances = [ci for gi, info in handles for ci in _compute_instances_nvml(nvml, gi, info)]
        gpu.mig_devices = _mig_devices_nvml(nvml, handle)
    return gpu


def _profiles_nvml(nvml: ModuleType, handle: Any) -> list[ProfileInfo]:
    profiles: dict[int, ProfileInfo] = {}
    order: dict[int, tuple[int, int]] = {}
    for constant in _profile_constants(nvml):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, constant)
        except nvml.NVMLError:  # profiles this GPU does not have
            continue
        if info.id in profiles:
            continue
        try:
            free: int | None = nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, info.id)
        except nvml.NVMLError:
            free = None
        profiles[info.id] = ProfileInfo(
            _text(info.name).removeprefix("MIG "), info.id, free, info.instanceCount, info.memorySizeMB,
            info.multiprocessorCount, _placements_nvml(nvml, handle, info.id),
        )
        order[info.id] = (info.sliceCount, info.memorySizeMB)
    # nvidia-smi's order: by compute slices, then memory (1g.10gb, 1g.10gb+me, 1g.20gb, 2g.20gb, ...).
    return sorted(profiles.values(), key=lambda p: (*order[p.profile_id], p.profile_id))


def _placements_nvml(nvml: ModuleType, handle: Any, profile_id: int) -> list[tuple[int, int]]:
    # This binding wants caller-allocated out-parameters (the capture shows the TypeError without them).
    # A GPU has 8 memory slots, so 8 placements at most; `count` is the array size in, the number out.
    array = (nvml.c_nvmlGpuInstancePlacement_t * 8)()
    count = ctypes.c_uint(8)
    try:
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, array, ctypes.byref(count))
    except nvml.NVMLError:
        return []
    return [(array[i].start, array[i].size) for i in range(count.value)]


def _gpu_instance_handles_nvml(
    nvml: ModuleType, handle: Any, profiles: list[ProfileInfo]
) -> list[tuple[Any, GpuInstanceInfo]]:
    names = {p.profile_id: p.name for p in profiles}
    out = []
    for profile in profiles:
        for gi in _listed(nvml, nvml.nvmlDeviceGetGpuInstances, handle, profile.profile_id, profile.total,
                          nvml.c_nvmlGpuInstance_t):
            info = nvml.nvmlGpuInstanceGetInfo(gi)
            out.append((gi, GpuInstanceInfo(info.id, info.profileId, names.get(info.profileId, "?"),
                                            info.placement.start, info.placement.size)))
    return out


def _listed(nvml: ModuleType, list_call: Any, owner: Any, profile_id: int, capacity: int, handle_type: Any
            ) -> list[Any]:
    """The handles an NVML list call fills in (the GPU or compute instances of one profile); none where the
    call refuses (a profile the device does not offer)."""
    array = (handle_type * max(capacity, 1))()
    count = ctypes.c_uint(0)
    try:
        list_call(owner, profile_id, array, ctypes.byref(count))
    except nvml.NVMLError:
        return []
    return [array[i] for i in range(count.value)]


def _compute_instances_nvml(nvml: ModuleType, gi: Any, gi_info: GpuInstanceInfo) -> list[ComputeInstanceInfo]:
    out = []
    constants = sorted({getattr(nvml, n) for n in dir(nvml)
                        if n.startswith("NVML_COMPUTE_INSTANCE_PROFILE_") and not n.endswith("COUNT")})
    seen: set[int] = set()
    for constant in constants:
        try:
            info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, constant, nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED
            )
        except nvml.NVMLError:  # compute profiles this GPU instance does not offer
            continue
        if info.id in seen:
            continue
        seen.add(info.id)
        for handle in _listed(nvml, nvml.nvmlGpuInstanceGetComputeInstances, gi, info.id, info.instanceCount,
                              nvml.c_nvmlComputeInstance_t):
            ci = nvml.nvmlComputeInstanceGetInfo(handle)
            name = _text(info.name).removeprefix("MIG ")
            out.append(ComputeInstanceInfo(gi_info.gi_id, ci.id, ci.profileId, name))
    return out


def _mig_devices_nvml(nvml: ModuleType, handle: Any) -> list[MigDeviceInfo]:
    out = []
    for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            device = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except nvml.NVMLError:  # an index with no MIG device behind it
            continue
        out.append(
            MigDeviceInfo(
                _text(nvml.nvmlDeviceGetUUID(device)),
                _text(nvml.nvmlDeviceGetName(device)),
                nvml.nvmlDeviceGetGpuInstanceId(device),
                nvml.nvmlDeviceGetComputeInstanceId(device),
                nvml.nvmlDeviceGetMemoryInfo(device).total // 2**20,
            )
        )
    return out
