"""The fake nvidia-smi of the test hosts stays honest: real capture output, the driver's MIG rules, parseable
by controlplane's own parsers. Runs the fake directly (FAKE_NVIDIA_ROOT) without any test host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from controlplane.gpu.nvidia_smi import discover_nvidia_smi

FAKES = Path(__file__).parent / "fakes"
CAPTURES = Path(__file__).parent / "data" / "nvidia-smi"


@pytest.fixture
def smi(tmp_path: Path):  # noqa: ANN201 - a small runner function
    """Run the fake nvidia-smi on a simulated host with 2 H100s: returns (exit code, output)."""
    shutil.copytree(CAPTURES, tmp_path / "usr/share/fake-nvidia/captures")
    (tmp_path / "etc/fake-nvidia").mkdir(parents=True)
    (tmp_path / "etc/fake-nvidia/hardware.json").write_text(json.dumps({"model": "h100-80gb-hbm3", "count": 2}))

    def run(*args: str) -> tuple[int, str]:
        result = subprocess.run([str(FAKES / "nvidia-smi"), *args], capture_output=True, text=True,
                                env={**os.environ, "FAKE_NVIDIA_ROOT": str(tmp_path)})
        return result.returncode, result.stdout + result.stderr

    return run


def capture(name: str) -> str:
    lines = (CAPTURES / "h100-80gb-hbm3" / name).read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith(("$ ", "[exit")))


def test_listings_with_mig_disabled_match_the_real_capture_for_gpu_0(smi) -> None:  # noqa: ANN001
    _, lgipp = smi("mig", "-lgipp", "-i", "0")
    assert lgipp.strip() == capture("mig-lgipp.txt")
    _, lgip = smi("mig", "-lgip", "-i", "0")
    real = [line for line in capture("mig-lgip.txt").splitlines() if "MIG" in line]
    assert [line for line in lgip.splitlines() if "MIG" in line] == real
    assert smi("mig", "-lgi") == (0, "No MIG-enabled devices found.\n")


def test_driver_rules_placement_capacity_and_order_of_destruction(smi) -> None:  # noqa: ANN001
    assert smi("mig", "-i", "0", "-cgi", "9:0", "-C")[0] != 0  # MIG disabled
    assert smi("-i", "0", "-mig", "1")[0] == 0
    assert smi("mig", "-i", "0", "-cgi", "5:4", "-C")[0] != 0  # 4g.40gb may only start at slot 0
    code, out = smi("mig", "-i", "0", "-cgi", "9:4,9:0,19:0", "-C")  # the third overlaps: stops there
    assert code != 0 and "Insufficient Resources" in out and out.count("Successfully created GPU instance") == 2
    assert smi("mig", "-i", "0", "-gi", "1", "-dgi")[0] != 0  # it still has a compute instance
    assert smi("-i", "0", "-mig", "0")[0] != 0  # GPU instances exist
    assert smi("mig", "-i", "0", "-gi", "1", "-dci")[0] == 0
    assert smi("mig", "-i", "0", "-gi", "1", "-dgi")[0] == 0


def test_controlplane_discovery_reads_the_fake_like_a_real_gpu(smi) -> None:  # noqa: ANN001
    smi("-i", "0", "-mig", "1")
    smi("mig", "-i", "0", "-cgi", "9:4,14:0,19:2,19:3", "-C")
    inventory = discover_nvidia_smi(lambda args: smi(*args)[1])
    gpu0, gpu1 = inventory.gpus
    assert (gpu0.catalog_model, gpu0.mig_current, gpu1.mig_current) == ("H100-80GB", True, False)
    assert sorted(f"{gi.profile}@{gi.start}" for gi in gpu0.gpu_instances) == [
        "1g.10gb@2", "1g.10gb@3", "2g.20gb@0", "3g.40gb@4"]
    assert len(gpu0.compute_instances) == 4 and len(gpu0.mig_devices) == 4
    free = {p.name: p.free for p in gpu0.profiles}
    assert free["3g.40gb"] == 0 and free["1g.10gb"] == 0  # the GPU is full
    assert {p.name: p.free for p in gpu1.profiles}["1g.10gb"] == 7


def test_without_hardware_it_fails_like_nvidia_smi_without_a_driver(smi, tmp_path: Path) -> None:  # noqa: ANN001
    (tmp_path / "etc/fake-nvidia/hardware.json").unlink()
    code, out = smi("-L")
    assert code == 9 and "couldn't communicate with the NVIDIA driver" in out


def test_on_a_cloud_vm_a_mig_mode_change_stays_pending_until_a_reboot(smi, tmp_path: Path) -> None:  # noqa: ANN001
    hardware = tmp_path / "etc/fake-nvidia/hardware.json"
    hardware.write_text(json.dumps({"model": "h100-80gb-hbm3", "count": 1, "mig_needs_reboot": True}))
    code, out = smi("-i", "0", "-mig", "1")
    assert code == 0 and "pending enable state" in out and "Reboot the system" in out
    assert smi("--query-gpu=mig.mode.current,mig.mode.pending", "--format=csv,noheader")[1] == "Disabled, Enabled\n"
    assert smi("mig", "-i", "0", "-cgi", "9:0", "-C")[0] != 0  # not in MIG mode yet
    smi("--fake-host-reboot")
    boot_id = (tmp_path / "var/lib/fake-nvidia/boot_id").read_text()
    assert smi("--query-gpu=mig.mode.current,mig.mode.pending", "--format=csv,noheader")[1] == "Enabled, Enabled\n"
    assert smi("mig", "-i", "0", "-cgi", "9:0", "-C")[0] == 0
    smi("--fake-host-reboot")  # instances do not survive a reboot; the boot id changes
    assert smi("mig", "-lgi")[1].count("3g.40gb") == 0
    assert (tmp_path / "var/lib/fake-nvidia/boot_id").read_text() != boot_id
