"""GPU discovery from nvidia-smi output, read-only: only listing commands are run.

The parsers follow the real captures in tests/data/nvidia-smi/ (from ../shared/data/nvidia-smi/); the
MIG-enabled listings (`mig -lgi`, `mig -lci`, MIG lines of `nvidia-smi -L`) follow NVIDIA's documented
formats, as the lent machines' MIG mode is never changed to capture them. The same parsers read output
fetched over SSH (the Ansible mig role's `mig_plan`, `cpctl doctor`): `discover_nvidia_smi` takes the
function that runs nvidia-smi.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

from controlplane.gpu.catalog import model_for_product
from controlplane.gpu.devices import (
    ComputeInstanceInfo,
    GpuInfo,
    GpuInstanceInfo,
    HostGpus,
    MigDeviceInfo,
    NoGpuError,
    ProfileInfo,
)

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


def discover_nvidia_smi(run: Runner = run_nvidia_smi) -> HostGpus:
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
    return HostGpus("nvidia-smi", rows[0].get("driver_version"), gpus)


# The MIG state in one round trip (the mig role's `mig_plan` runs it over SSH): the GPU list, then GPU and
# compute instances, separated by a marker; it exits with nvidia-smi's status when the GPU list fails.
MIG_STATE_FIELDS = "index,name,uuid,mig.mode.current,mig.mode.pending"
MIG_STATE_SEPARATOR = "@@cpctl-mig-state@@"
MIG_STATE_SCRIPT = (
    f"nvidia-smi --query-gpu={MIG_STATE_FIELDS} --format=csv,noheader; rc=$?; echo {MIG_STATE_SEPARATOR}; "
    f"[ $rc -eq 0 ] && nvidia-smi mig -lgi; echo {MIG_STATE_SEPARATOR}; [ $rc -eq 0 ] && nvidia-smi mig -lci; "
    "exit $rc"
)


def parse_mig_state(output: str) -> list[GpuInfo]:
    """The GPUs with their MIG mode, GPU instances and compute instances, from MIG_STATE_SCRIPT's output
    (memory and utilization are not read: 0 and None)."""
    query, lgi, lci = (output.split(MIG_STATE_SEPARATOR) + ["", ""])[:3]
    instances, computes = parse_lgi(lgi), parse_lci(lci)
    gpus = []
    for row in parse_query_gpu(query, MIG_STATE_FIELDS):
        index = int(row["index"])
        model = model_for_product(row["name"])
        gpus.append(GpuInfo(index, row["name"], row["uuid"], 0, 0, None, _mode(row["mig.mode.current"]),
                            _mode(row["mig.mode.pending"]), model.name if model else None,
                            gpu_instances=instances.get(index, []), compute_instances=computes.get(index, [])))
    return gpus
