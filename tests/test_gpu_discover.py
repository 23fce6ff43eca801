"""Discovery: the nvidia-smi parsers on the real captures, NVML through a fake binding, the no-GPU message."""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any

import pynvml
import pytest

from controlplane.gpu import devices
from controlplane.gpu import discover as d
from controlplane.gpu import nvidia_smi as smi
from controlplane.gpu import nvml as nvml_discovery
from controlplane.gpu.catalog import gpu_model

CAPTURES = Path(__file__).parent / "data" / "nvidia-smi"
LISTINGS = {
    ("mig", "-lgip"): "mig-lgip.txt",
    ("mig", "-lgipp"): "mig-lgipp.txt",
    ("mig", "-lgi"): "mig-lgi.txt",
    ("mig", "-lci"): "mig-lci.txt",
    ("-L",): "nvidia-smi-L.txt",
}

# MIG-enabled listings in NVIDIA's documented formats (the lent machines' MIG mode is never changed).
LGI_ENABLED = """\
+-------------------------------------------------------+
| GPU instances:                                        |
| GPU   Name             Profile  Instance   Placement  |
|                          ID       ID       Start:Size |
|=======================================================|
|   0  MIG 1g.10gb         19        7          0:1     |
+-------------------------------------------------------+
|   0  MIG 3g.40gb          9        2          4:4     |
+-------------------------------------------------------+
"""
LCI_ENABLED = """\
+--------------------------------------------------------------------+
| Compute instances:                                                 |
| GPU     GPU       Name             Profile   Instance   Placement  |
|       Instance                       ID        ID       Start:Size |
|         ID                                                         |
|====================================================================|
|   0      7       MIG 1g.10gb          0         0          0:1     |
+--------------------------------------------------------------------+
|   0      2       MIG 3g.40gb          2         0          0:3     |
+--------------------------------------------------------------------+
"""
LIST_ENABLED = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-9dded218-6c8c-2f64-539e-2799ffc8c75a)
  MIG 3g.40gb     Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
  MIG 1g.10gb     Device  1: (UUID: MIG-66666666-7777-8888-9999-000000000000)
"""


def capture_runner(folder: str) -> smi.Runner:
    def run(args: list[str]) -> str:
        if args[0].startswith("--query-gpu"):
            return (CAPTURES / folder / "query-gpu.csv").read_text()
        return (CAPTURES / folder / LISTINGS[tuple(args)]).read_text()

    return run


def test_nvidia_smi_fallback_reads_the_h100_capture() -> None:
    found = smi.discover_nvidia_smi(capture_runner("h100-80gb-hbm3"))
    [gpu] = found.gpus
    assert found.driver_version == "580.159.04"
    assert (gpu.name, gpu.catalog_model, gpu.memory_total_mib, gpu.utilization_pct) == (
        "NVIDIA H100 80GB HBM3", "H100-80GB", 81559, 0
    )
    assert gpu.mig_current is False and gpu.mig_pending is False
    assert gpu.gpu_instances == [] and gpu.compute_instances == []
    by_name = {p.name: p for p in gpu.profiles}
    assert by_name["3g.40gb"].placements == [(0, 4), (4, 4)]
    assert by_name["7g.80gb"].placements == [(0, 8)]
    assert (by_name["1g.10gb"].free, by_name["1g.10gb"].total) == (7, 7)


def test_nvidia_smi_fallback_reads_the_h200_capture() -> None:
    [gpu] = smi.discover_nvidia_smi(capture_runner("h200")).gpus
    assert gpu.catalog_model == "H200-141GB" and gpu.memory_total_mib == 143771
    assert [p.name for p in gpu.profiles] == [p.name for p in gpu_model("H200-141GB").profiles]


def test_query_gpu_without_header_takes_the_field_list() -> None:
    text = (CAPTURES / "h200" / "query-gpu-noheader.csv").read_text()
    [row] = smi.parse_query_gpu(text, "index,name,uuid,mig.mode.current")
    assert row == {"index": "0", "name": "NVIDIA H200", "uuid": "GPU-f4dd6640-491e-ed9c-c473-c39817740d97",
                   "mig.mode.current": "Disabled"}


def test_mig_disabled_listings_parse_to_nothing() -> None:
    for name in ("mig-lgi.txt", "mig-lci.txt"):
        text = (CAPTURES / "h100-80gb-hbm3" / name).read_text()
        assert "No MIG-enabled devices found." in text
        assert smi.parse_lgi(text) == {} and smi.parse_lci(text) == {}


def test_mig_enabled_listings_parse_in_nvidia_documented_format() -> None:
    assert smi.parse_lgi(LGI_ENABLED)[0] == [
        devices.GpuInstanceInfo(7, 19, "1g.10gb", 0, 1), devices.GpuInstanceInfo(2, 9, "3g.40gb", 4, 4)
    ]
    assert [(c.gi_id, c.ci_id, c.profile) for c in smi.parse_lci(LCI_ENABLED)[0]] == [
        (7, 0, "1g.10gb"), (2, 0, "3g.40gb")
    ]
    listed = smi.parse_list(LIST_ENABLED)[0]
    assert [(m.name, m.uuid[:12]) for m in listed] == [("3g.40gb", "MIG-11111111"), ("1g.10gb", "MIG-66666666")]


def test_nvidia_smi_fallback_lists_instances_when_mig_is_enabled() -> None:
    csv = "index, name, uuid, memory.total [MiB], memory.used [MiB], utilization.gpu [%], mig.mode.current, " \
          "mig.mode.pending, driver_version\n0, NVIDIA H100 80GB HBM3, GPU-1, 81559 MiB, 100 MiB, [N/A], Enabled, " \
          "Enabled, 580.159.04\n"
    listings = {("mig", "-lgi"): LGI_ENABLED, ("mig", "-lci"): LCI_ENABLED, ("-L",): LIST_ENABLED}

    def run(args: list[str]) -> str:
        if args[0].startswith("--query-gpu"):
            return csv
        return listings.get(tuple(args)) or capture_runner("h100-80gb-hbm3")(args)

    [gpu] = smi.discover_nvidia_smi(run).gpus
    assert gpu.mig_current is True and gpu.utilization_pct is None
    assert [(g.profile, g.start) for g in gpu.gpu_instances] == [("1g.10gb", 0), ("3g.40gb", 4)]
    assert len(gpu.mig_devices) == 2


# --------------------------------------------------------------------------- a fake NVML binding


class FakeNvmlError(Exception):
    pass


H100_PROFILES = {  # NVML constant -> (id, memory MiB, SMs, instances), as in the nvml.txt capture
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (19, 9984, 16, 7),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: (20, 9984, 16, 1),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: (15, 20096, 26, 4),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (14, 20096, 32, 3),
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (9, 40448, 60, 2),
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (5, 40448, 64, 1),
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (0, 81152, 132, 1),
}
NAMES = {19: "1g.10gb", 20: "1g.10gb+me", 15: "1g.20gb", 14: "2g.20gb", 9: "3g.40gb", 5: "4g.40gb", 0: "7g.80gb"}


def fake_nvml(mig_enabled_on_gpu0: bool = True, init_error: bool = False) -> types.ModuleType:
    """A stand-in for pynvml: two H100s; GPU 0 optionally in MIG mode with 1g.10gb@0 and 3g.40gb@4."""
    nvml = types.ModuleType("fake_nvml")
    nvml.NVMLError = FakeNvmlError
    for name in dir(pynvml):
        if name.startswith("NVML_GPU_INSTANCE_PROFILE_"):
            setattr(nvml, name, getattr(pynvml, name))
    nvml.c_nvmlGpuInstancePlacement_t = pynvml.c_nvmlGpuInstancePlacement_t
    for name in dir(pynvml):
        if name.startswith("NVML_COMPUTE_INSTANCE_"):
            setattr(nvml, name, getattr(pynvml, name))
    nvml.c_nvmlGpuInstance_t = ctypes.c_int  # the fake's GPU instance handles are GPU instance IDs
    nvml.c_nvmlComputeInstance_t = ctypes.c_int  # and its compute instance handles are their GI's ID
    instances = {0: [(7, 19, 0, 1), (2, 9, 4, 4)] if mig_enabled_on_gpu0 else [], 1: []}
    mig_devices = {0: [("MIG-aaaa", "NVIDIA H100 80GB HBM3 MIG 3g.40gb", 2, 0, 40192),
                       ("MIG-bbbb", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", 7, 0, 9728)]}
    calls: list[str] = []
    nvml.calls = calls

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNvmlError("Driver Not Loaded")

    def mig_mode(h: Any) -> list[int]:
        on = int(h == 0 and mig_enabled_on_gpu0)
        return [on, on]

    def utilization(h: Any) -> Any:
        if mig_mode(h)[0]:
            raise FakeNvmlError("Not Supported")
        return types.SimpleNamespace(gpu=3)

    def profile_info(h: Any, constant: int) -> Any:
        if constant not in H100_PROFILES:
            raise FakeNvmlError("Not Supported")
        pid, mib, sms, count = H100_PROFILES[constant]
        return types.SimpleNamespace(id=pid, name=f"MIG {NAMES[pid]}".encode(), memorySizeMB=mib,
                                     multiprocessorCount=sms, instanceCount=count,
                                     sliceCount=gpu_model("H100-80GB").profile_by_id(pid).compute_slices)

    def placements(h: Any, pid: int, array: Any, count_ref: Any) -> int:
        profile = gpu_model("H100-80GB").profile_by_id(pid)
        for i, start in enumerate(profile.starts):
            array[i].start, array[i].size = start, profile.size
        count_ref._obj.value = len(profile.starts)
        return 0

    def gpu_instances(h: Any, pid: int, array: Any, count_ref: Any) -> int:
        mine = [gi for gi in instances[h] if gi[1] == pid]
        for i, gi in enumerate(mine):
            array[i] = gi[0]
        count_ref._obj.value = len(mine)
        return 0

    def gi_info(gi_id: int) -> Any:
        gi = next(g for gs in instances.values() for g in gs if g[0] == gi_id)
        return types.SimpleNamespace(id=gi[0], profileId=gi[1],
                                     placement=types.SimpleNamespace(start=gi[2], size=gi[3]))

    def ci_profile_info(gi_id: int, constant: int, engine: int) -> Any:
        gi = gi_info(gi_id)
        if constant != {19: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE,
                        9: pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE}[gi.profileId]:
            raise FakeNvmlError("Not Supported")
        return types.SimpleNamespace(id=constant, instanceCount=1, name=f"MIG {NAMES[gi.profileId]}".encode())

    def compute_instances(gi_id: int, ci_profile: int, array: Any, count_ref: Any) -> int:
        array[0] = gi_id  # one default compute instance (CI 0) per GPU instance, as `-cgi ... -C` makes
        count_ref._obj.value = 1
        return 0

    def mig_handle(h: Any, i: int) -> Any:
        devices = mig_devices.get(h, [])
        if i >= len(devices) or not mig_mode(h)[0]:
            raise FakeNvmlError("Not Found")
        return ("mig", h, i)

    def field_of(handle: Any, k: int) -> Any:
        return mig_devices[handle[1]][handle[2]][k]

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlSystemGetDriverVersion = lambda: b"580.159.04"
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: field_of(h, 1) if isinstance(h, tuple) else b"NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetUUID = lambda h: field_of(h, 0) if isinstance(h, tuple) else f"GPU-{h}"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=(field_of(h, 4) if isinstance(h, tuple) else 81559) * 2**20, used=512 * 2**20
    )
    nvml.nvmlDeviceGetUtilizationRates = utilization
    nvml.nvmlDeviceGetMigMode = mig_mode
    nvml.nvmlDeviceGetGpuInstanceProfileInfo = profile_info
    nvml.nvmlDeviceGetGpuInstanceRemainingCapacity = lambda h, pid: 0 if mig_mode(h)[0] else 7
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements = placements
    nvml.nvmlDeviceGetGpuInstances = gpu_instances
    nvml.nvmlGpuInstanceGetInfo = gi_info
    nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo = ci_profile_info
    nvml.nvmlGpuInstanceGetComputeInstances = compute_instances
    nvml.nvmlComputeInstanceGetInfo = lambda gi_id: types.SimpleNamespace(id=0, profileId=2 if gi_id == 2 else 0)
    nvml.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nvml.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nvml.nvmlDeviceGetGpuInstanceId = lambda h: field_of(h, 2)
    nvml.nvmlDeviceGetComputeInstanceId = lambda h: field_of(h, 3)
    return nvml


def test_nvml_discovery_reads_profiles_placements_instances_and_mig_devices() -> None:
    nvml = fake_nvml()
    found = nvml_discovery.discover_nvml(nvml)
    assert nvml.calls == ["init", "shutdown"]
    gpu0, gpu1 = found.gpus
    assert (found.source, found.driver_version) == ("nvml", "580.159.04")
    assert gpu0.catalog_model == "H100-80GB" and gpu0.mig_current is True and gpu0.utilization_pct is None
    assert [(g.profile, g.start, g.size, g.gi_id) for g in gpu0.gpu_instances] == [
        ("1g.10gb", 0, 1, 7), ("3g.40gb", 4, 4, 2)
    ]
    assert [(c.gi_id, c.ci_id, c.profile) for c in gpu0.compute_instances] == [(7, 0, "1g.10gb"), (2, 0, "3g.40gb")]
    assert [(m.uuid, m.gi_id, m.memory_total_mib) for m in gpu0.mig_devices] == [
        ("MIG-aaaa", 2, 40192), ("MIG-bbbb", 7, 9728)
    ]
    catalog = gpu_model("H100-80GB")
    assert [p.name for p in gpu1.profiles] == [p.name for p in catalog.profiles]  # nvidia-smi's order
    for p in gpu1.profiles:
        assert p.placements == [(s, catalog.profile(p.name).size) for s in catalog.profile(p.name).starts]
    assert gpu1.mig_current is False and gpu1.utilization_pct == 3 and gpu1.gpu_instances == []


def test_discover_falls_back_to_nvidia_smi_when_nvml_fails() -> None:
    found = d.discover(fake_nvml(init_error=True), run=capture_runner("h100-80gb-hbm3"))
    assert found.source == "nvidia-smi" and found.gpus[0].catalog_model == "H100-80GB"


def test_no_gpu_gives_one_clear_message_with_both_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tool(args: list[str]) -> str:
        raise devices.NoGpuError("nvidia-smi is not installed")

    monkeypatch.setattr(d, "import_nvml", lambda: None)
    with pytest.raises(devices.NoGpuError) as err:
        d.discover(run=no_tool)
    message = str(err.value)
    assert message.startswith("no NVIDIA GPU found on this machine")
    assert "nvidia-ml-py is not installed" in message and "nvidia-smi is not installed" in message
    assert "\n" not in message


def test_host_gpus_round_trip_through_json() -> None:
    found = nvml_discovery.discover_nvml(fake_nvml())
    again = devices.HostGpus.from_dict(json.loads(json.dumps(found.to_dict())))
    assert again == found


def test_module_entry_point_prints_text_and_json(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(d, "import_nvml", lambda: fake_nvml())
    assert d.main([]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: NVIDIA H100 80GB HBM3 [H100-80GB]" in text and "GPU instance 2: 3g.40gb at 4:4" in text
    assert d.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"][1]["mig_current"] is False
