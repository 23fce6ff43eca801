"""GPU discovery, read-only: NVML (`controlplane.gpu.nvml`) first; where nvidia-ml-py is missing or NVML
fails, nvidia-smi's output (`controlplane.gpu.nvidia_smi`); on a machine without an NVIDIA GPU, NoGpuError
says so in one line. Nothing here changes a GPU.

Only the standard library (plus nvidia-ml-py when present) is imported, so GPU hosts without the rest of
the project's dependencies can run `python3 -m controlplane.gpu.discover [--json]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import ModuleType

from controlplane.gpu.devices import HostGpus, NoGpuError
from controlplane.gpu.nvidia_smi import Runner, discover_nvidia_smi, run_nvidia_smi
from controlplane.gpu.nvml import discover_nvml, import_nvml


def discover(nvml: ModuleType | None = None, run: Runner = run_nvidia_smi) -> HostGpus:
    """The GPUs of this machine: NVML, else nvidia-smi; NoGpuError with both reasons when neither works."""
    nvml = nvml or import_nvml()
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


def format_text(found: HostGpus) -> str:
    """A plain-text report of the GPUs found (for hosts without Rich)."""
    lines = [f"source: {found.source}   driver: {found.driver_version or '?'}"]
    for g in found.gpus:
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
    parser.add_argument("--json", action="store_true", help="print the GPUs found as JSON")
    parser.add_argument("--nvidia-smi", action="store_true", help="read nvidia-smi output instead of NVML")
    args = parser.parse_args(argv)
    try:
        found = discover_nvidia_smi() if args.nvidia_smi else discover()
    except NoGpuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(found.to_dict(), indent=2) if args.json else format_text(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
