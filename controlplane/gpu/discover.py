"""GPU discovery, read-only: GPUs, memory, utilization, MIG mode, MIG profiles and existing instances.

NVML (nvidia-ml-py) first; where it is missing or fails, the output of `nvidia-smi` is parsed instead; on a
machine without an NVIDIA GPU, NoGpuError says so in one line. Nothing here changes a GPU: only NVML
getters and nvidia-smi listing commands are used.

Only the standard library (plus nvidia-ml-py when present) is imported, so GPU hosts without the rest of
the project's dependencies can run `python3 -m controlplane.gpu.discover [--json]`.

The parsers follow the real captures in ../shared/data/nvidia-smi/ (copied to tests/data/nvidia-smi/); the
MIG-enabled listings (`mig -lgi`, `mig -lci`, MIG lines of `nvidia-smi -L`) follow NVIDIA's documented
formats, as the lent machines' MIG mode is never changed to capture them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from controlplane.gpu.catalog import model_for_product


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
class Inventory:
    source: str  # "nvml" or "nvidia-smi"
    driver_version: str | None
    gpus: list[GpuInfo]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        """An inventory from `to_dict` output (`cpctl gpu --json` saved to a file)."""
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


# ---------------------------------------------------------------------------------------------- NVML


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str or bytes depending on its version.
    return value.decode() if isinstance(value, bytes) else value


def _profile_constants(nvml: ModuleType) -> list[int]:
    """Every NVML_GPU_INSTANCE_PROFILE_* constant this binding knows; the driver reports which it supports."""
    names = sorted(n for n in dir(nvml) if n.startswith("NVML_GPU_INSTANCE_PROFILE_") and not n.endswith("COUNT"))
    return sorted({getattr(nvml, n) for n in names})


def discover_nvml(nvml: ModuleType) -> Inventory:
    """Read every GPU through NVML; the caller has checked that `nvml` imports. NVMLError propagates."""
    nvml.nvmlInit()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        return Inventory("nvml", driver, [_gpu_nvml(nvml, i) for i in range(nvml.nvmlDeviceGetCount())])
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
        array = (nvml.c_nvmlGpuInstance_t * max(profile.total, 1))()
        count = ctypes.c_uint(0)
        try:
            nvml.nvmlDeviceGetGpuInstances(handle, profile.profile_id, array, ctypes.byref(count))
        except nvml.NVMLError:
            continue
        for i in range(count.value):
            info = nvml.nvmlGpuInstanceGetInfo(array[i])
            out.append((array[i], GpuInstanceInfo(info.id, info.profileId, names.get(info.profileId, "?"),
                                                  info.placement.start, info.placement.size)))
    return out


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
        array = (nvml.c_nvmlComputeInstance_t * max(info.instanceCount, 1))()
        count = ctypes.c_uint(0)
        try:
            nvml.nvmlGpuInstanceGetComputeInstances(gi, info.id, array, ctypes.byref(count))
        except nvml.NVMLError:
            continue
        for i in range(count.value):
            ci = nvml.nvmlComputeInstanceGetInfo(array[i])
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


# ---------------------------------------------------------------------------------------- nvidia-smi

QUERY_FIELDS = (
    "index,name,uuid,memory.total,memory.used,utilization.gpu,mig.mode.current,mig.mode.pending,driver_version"
)

_LGIP_ROW = re.compile(
    r"^\|\s+(\d+)\s+MIG\s+(\S+)\s+(\d+)\s+(\d+)/(\d+)\s+([\d.]+)\s+\w+\s+(\d+)\s+\d+\s+\d+\s+\|"
)
_LGIPP_ROW = re.compile(r"^GPU\s+(\d+)\s+Profile ID\s+(\d+)\s+Placements?\s*:\s*\{([\d,\s]*)\}:(\d+)")
_LGI_ROW = re.compile(r"^\|\s+(\d+)\s+MIG\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+):(\d+)\s+\|")
_LCI_ROW = re.compile(r"^\|\s+(\d+)\s+(\d+)\s+MIG\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+):(\d+)\s+\|")
_L_GPU = re.compile(r"^GPU (\d+): (.+?) \(UUID: (\S+)\)")
_L_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (\S+)\)")


def _number(value: str) -> int | None:
    """An integer from a CSV field ('81559 MiB', '0 %', '[N/A]' -> None)."""
    match = re.match(r"\s*(\d+)", value)
    return int(match.group(1)) if match else None


def _mode(value: str) -> bool | None:
    value = value.strip().lower()
    return {"enabled": True, "disabled": False}.get(value)


def parse_query_gpu(text: str, fields: str | None = None) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv`, keyed by field name ('memory.total', ...).

    The header names the fields (units such as ' [MiB]' are dropped); for `noheader` output pass `fields`,
    the comma-separated list given to --query-gpu.
    """
    names = [f.strip() for f in fields.split(",")] if fields else None
    rows = []
    for line in text.splitlines():
        if line.startswith(("$ ", "[exit")):  # the command and exit lines of a capture
            continue
        cells = [c.strip() for c in line.split(",")]
        if names is None:
            names = [re.sub(r"\s*\[.*\]$", "", c) for c in cells]
            continue
        if len(cells) == len(names):
            rows.append(dict(zip(names, cells, strict=True)))
    return rows


def parse_lgip(text: str) -> dict[int, list[ProfileInfo]]:
    """GPU index -> profiles, from `nvidia-smi mig -lgip`."""
    out: dict[int, list[ProfileInfo]] = {}
    for line in text.splitlines():
        match = _LGIP_ROW.match(line)
        if match:
            gpu, name, pid, free, total, gib, sms = match.groups()
            out.setdefault(int(gpu), []).append(
                ProfileInfo(name, int(pid), int(free), int(total), round(float(gib) * 1024), int(sms))
            )
    return out


def parse_lgipp(text: str) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """GPU index -> profile ID -> placements (start, size), from `nvidia-smi mig -lgipp`."""
    out: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for line in text.splitlines():
        match = _LGIPP_ROW.match(line.strip())
        if match:
            gpu, pid, starts, size = match.groups()
            out.setdefault(int(gpu), {})[int(pid)] = [
                (int(s), int(size)) for s in starts.replace(" ", "").split(",") if s
            ]
    return out


def parse_lgi(text: str) -> dict[int, list[GpuInstanceInfo]]:
    """GPU index -> GPU instances, from `nvidia-smi mig -lgi` (empty when no MIG-enabled device)."""
    out: dict[int, list[GpuInstanceInfo]] = {}
    for line in text.splitlines():
        match = _LGI_ROW.match(line)
        if match:
            gpu, name, pid, gi, start, size = match.groups()
            out.setdefault(int(gpu), []).append(GpuInstanceInfo(int(gi), int(pid), name, int(start), int(size)))
    return out


def parse_lci(text: str) -> dict[int, list[ComputeInstanceInfo]]:
    """GPU index -> compute instances, from `nvidia-smi mig -lci`."""
    out: dict[int, list[ComputeInstanceInfo]] = {}
    for line in text.splitlines():
        match = _LCI_ROW.match(line)
        if match:
            gpu, gi, name, pid, ci, _start, _size = match.groups()
            out.setdefault(int(gpu), []).append(ComputeInstanceInfo(int(gi), int(ci), int(pid), name))
    return out


def parse_list(text: str) -> dict[int, list[MigDeviceInfo]]:
    """GPU index -> MIG devices with their UUIDs, from `nvidia-smi -L`."""
    out: dict[int, list[MigDeviceInfo]] = {}
    gpu = None
    for line in text.splitlines():
        if match := _L_GPU.match(line):
            gpu = int(match.group(1))
            out[gpu] = []
        elif (match := _L_MIG.match(line)) and gpu is not None:
            out[gpu].append(MigDeviceInfo(match.group(3), match.group(1)))
    return out


Runner = Callable[[list[str]], str]


def run_nvidia_smi(args: list[str]) -> str:
    """stdout of `nvidia-smi ARGS`; NoGpuError when the tool is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise NoGpuError("nvidia-smi is not installed")
    result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise NoGpuError(f"`nvidia-smi {' '.join(args)}` failed: {(result.stdout + result.stderr).strip()[:200]}")
    return result.stdout


def discover_nvidia_smi(run: Runner = run_nvidia_smi) -> Inventory:
    """Read every GPU from nvidia-smi's listings (`run` returns a command's stdout)."""
    rows = parse_query_gpu(run([f"--query-gpu={QUERY_FIELDS}", "--format=csv"]))
    if not rows:
        raise NoGpuError("nvidia-smi lists no GPU")
    mig_capable = any(_mode(r["mig.mode.current"]) is not None for r in rows)
    profiles = parse_lgip(run(["mig", "-lgip"])) if mig_capable else {}
    placements = parse_lgipp(run(["mig", "-lgipp"])) if mig_capable else {}
    mig_on = any(_mode(r["mig.mode.current"]) for r in rows)
    gis = parse_lgi(run(["mig", "-lgi"])) if mig_on else {}
    cis = parse_lci(run(["mig", "-lci"])) if mig_on else {}
    devices = parse_list(run(["-L"])) if mig_on else {}
    gpus = []
    for row in rows:
        index = int(row["index"])
        model = model_for_product(row["name"])
        gpu_profiles = profiles.get(index, [])
        for p in gpu_profiles:
            p.placements = placements.get(index, {}).get(p.profile_id, [])
        gpus.append(
            GpuInfo(
                index, row["name"], row["uuid"], _number(row["memory.total"]) or 0, _number(row["memory.used"]) or 0,
                _number(row.get("utilization.gpu", "")), _mode(row["mig.mode.current"]),
                _mode(row.get("mig.mode.pending", "")),
                model.name if model else None, gpu_profiles, gis.get(index, []), cis.get(index, []),
                devices.get(index, []),
            )
        )
    return Inventory("nvidia-smi", rows[0].get("driver_version"), gpus)


# ------------------------------------------------------------------------------------------ discovery


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def discover(nvml: ModuleType | None = None, run: Runner = run_nvidia_smi) -> Inventory:
    """The GPUs of this machine: NVML, else nvidia-smi; NoGpuError with both reasons when neither works."""
    nvml = nvml or _import_nvml()
    reasons = []
    if nvml is None:
        reasons.append("nvidia-ml-py is not installed")
    else:
        try:
            return discover_nvml(nvml)
        except nvml.NVMLError as exc:
            reasons.append(f"NVML: {exc}")
    try:
        return discover_nvidia_smi(run)
    except NoGpuError as exc:
        reasons.append(str(exc))
    raise NoGpuError("no NVIDIA GPU found on this machine (" + "; ".join(reasons) + ")")


def format_text(inventory: Inventory) -> str:
    """A plain-text report of an inventory (for hosts without Rich)."""
    lines = [f"source: {inventory.source}   driver: {inventory.driver_version or '?'}"]
    for g in inventory.gpus:
        mig = {None: "n/a", True: "Enabled", False: "Disabled"}
        util = "n/a" if g.utilization_pct is None else f"{g.utilization_pct}%"
        pending = f" (pending {mig[g.mig_pending]})" if g.mig_pending != g.mig_current else ""
        lines.append(
            f"GPU {g.index}: {g.name} [{g.catalog_model or 'not in catalog'}] {g.uuid}\n"
            f"  memory {g.memory_used_mib}/{g.memory_total_mib} MiB, utilization {util}, "
            f"MIG {mig[g.mig_current]}{pending}"
        )
        for p in g.profiles:
            starts = ",".join(str(s) for s, _ in p.placements)
            size = p.placements[0][1] if p.placements else "?"
            free = "?" if p.free is None else p.free
            lines.append(
                f"  profile {p.name:<14} id {p.profile_id:>2}  {free}/{p.total}  {p.memory_mib:>6} MiB  "
                f"{p.sms} SMs  placements {{{starts}}}:{size}"
            )
        for gi in g.gpu_instances:
            lines.append(f"  GPU instance {gi.gi_id}: {gi.profile} at {gi.start}:{gi.size}")
        for ci in g.compute_instances:
            lines.append(f"  compute instance {ci.ci_id} of GPU instance {ci.gi_id}: {ci.profile}")
        for d in g.mig_devices:
            lines.append(f"  MIG device {d.uuid} {d.name or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m controlplane.gpu.discover", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the inventory as JSON")
    parser.add_argument("--nvidia-smi", action="store_true", help="read nvidia-smi output instead of NVML")
    args = parser.parse_args(argv)
    try:
        inventory = discover_nvidia_smi() if args.nvidia_smi else discover()
    except NoGpuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(inventory.to_dict(), indent=2) if args.json else format_text(inventory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
